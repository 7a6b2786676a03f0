"""Resume is exact: a run interrupted again and again (SIGTERM and SIGKILL at seeded random moments: mid-step,
inside an evaluation, inside a checkpoint save, during the final evaluation) and resumed each time ends with the
same adapter, bit for bit, the same metrics and predictions as an uninterrupted run, in exactly one MLflow run
that logged every step once.

Moments are chosen from the job's own log lines: a line says where the job is, and a random delay after it
lands the signal in the work that follows (the evaluation and checkpoint save of an eval/save step)."""

from __future__ import annotations

import json
import os
import random
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lora_exp.core.errors import PREEMPTED
from support import Job, experiment, mlflow_client, write_values

pytestmark = pytest.mark.slow

MAX_STEPS = 32  # 2 epochs of 16 steps; evaluation and a checkpoint every 8 steps
SEED = 20261130
THREADS = {"OMP_NUM_THREADS": "1"}  # every attempt the same: a thread count may change reduction order


def _values(tmp: Path, out: str, group_by_length: bool = True) -> Path:
    doc = experiment(Path(os.environ["TINY_MODEL"]), json.loads(os.environ["TOY_DATA"]), tmp, training={
        "max_steps": MAX_STEPS, "per_device_train_batch_size": 4, "learning_rate": 5e-3, "logging_steps": 1,
        "eval_strategy": "steps", "eval_steps": 8, "save_strategy": "steps", "save_steps": 8,
        "save_total_limit": 2, "group_by_length": group_by_length,
    }, runs={"lora": {"method": {"name": "lora", "r": 4, "dropout": 0.1}}})
    doc["experiment"]["defaults"]["output_root"] = str(tmp / out)
    return write_values(tmp, doc, name=f"{out}.yaml")


KINDS = ["startup", "mid", "eval-save", "mid", "loop-start", "eval-save", "mid", "mid", "eval-save", "final",
         "finishing"]


def _moment(kind: str, done: int, rng: random.Random) -> tuple[str, int, float] | None:
    """(log line to wait for, signal, delay after it) for a kind of moment, given the steps already saved.
    The line of an eval/save step (8, 16, 24, 32) is printed just before its evaluation and checkpoint save,
    so a short delay after it lands inside them."""
    sig = rng.choice([signal.SIGTERM, signal.SIGKILL])
    if kind == "startup":
        return "MLflow run", signal.SIGKILL, rng.uniform(0.0, 0.5)
    if kind == "loop-start":
        return "training: ", signal.SIGTERM, rng.uniform(0.0, 0.3)
    if kind == "mid":
        step = done + rng.randint(1, 3)
        return (f"step {step}/{MAX_STEPS} ", sig, rng.uniform(0.0, 0.05)) if step < MAX_STEPS else None
    if kind == "eval-save":
        step = (done // 8 + 1) * 8
        return (f"step {step}/{MAX_STEPS} ", sig, rng.uniform(0.0, 0.25)) if step < MAX_STEPS else None
    if kind == "final":
        return "final evaluation: validation", signal.SIGTERM, rng.uniform(0.0, 0.1)
    return "validation: accuracy", signal.SIGKILL, rng.uniform(0.0, 0.2)  # finishing: uploads, final status


def _steps_done(out: Path) -> int:
    done = [int(p.name.split("-")[1]) for p in out.glob("checkpoint-*") if (p / "trainer_state.json").exists()]
    return max(done, default=0)


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "final" / "adapter_model.safetensors"))


@pytest.fixture
def env(tiny_gpt2, toy_data, monkeypatch):
    monkeypatch.setenv("TINY_MODEL", str(tiny_gpt2))
    monkeypatch.setenv("TOY_DATA", json.dumps(toy_data))


def test_interrupted_at_random_moments_equals_uninterrupted(env, tmp_path):
    reference = Job(_values(tmp_path, "reference"), tmp_path, THREADS)
    assert reference.finish() == 0, reference.log[-3000:]
    ref_out = tmp_path / "reference" / "toy" / "lora"

    values = _values(tmp_path, "interrupted")
    out = tmp_path / "interrupted" / "toy" / "lora"
    rng = random.Random(SEED)
    interruptions = []
    for kind in KINDS:
        moment = _moment(kind, _steps_done(out), rng)
        if moment is None or (out / "metrics.json").exists():
            continue
        text, sig, delay = moment
        job = Job(values, tmp_path, THREADS)
        if not job.wait_for(text):
            assert job.finish() == 0, job.log[-3000:]  # the moment never came: the job finished first
            break
        time.sleep(delay)
        job.proc.send_signal(sig)
        code = job.finish()
        if code == 0 or (code == -signal.SIGTERM and (out / "metrics.json").exists()):
            break  # it finished within the delay (a SIGTERM during interpreter exit kills it as a pod would)
        expected = PREEMPTED if sig == signal.SIGTERM else -signal.SIGKILL
        assert code == expected, (text, sig, job.log[-3000:])
        interruptions.append((kind, text.strip(), sig.name, round(delay, 3), _steps_done(out)))
    print("\nINTERRUPTIONS", interruptions)
    assert len(interruptions) >= 8, interruptions
    kinds = {i[0] for i in interruptions}
    assert {"startup", "mid", "eval-save", "final"} <= kinds and {i[2] for i in interruptions} == {"SIGTERM", "SIGKILL"}
    if not (out / "metrics.json").exists():
        final = Job(values, tmp_path, THREADS)
        assert final.finish() == 0, final.log[-3000:]

    # Bit-identical adapter, identical metrics and predictions.
    ref, got = _adapter(ref_out), _adapter(out)
    assert ref.keys() == got.keys()
    assert all(torch.equal(ref[k], got[k]) for k in ref), interruptions
    assert json.loads((out / "metrics.json").read_text()) == json.loads((ref_out / "metrics.json").read_text())
    assert (out / "eval/validation/predictions.csv").read_text() == \
        (ref_out / "eval/validation/predictions.csv").read_text()

    # One MLflow run for the interrupted experiment, every step logged exactly once.
    client = mlflow_client(tmp_path)
    exp = client.get_experiment_by_name("toy")
    runs = client.search_runs([exp.experiment_id])
    mine = [r for r in runs if str(out) in r.data.params.get("output_root", "") or
            r.data.params.get("output_root") == str(tmp_path / "interrupted")]
    assert len(mine) == 1, [(r.info.run_id, r.data.params.get("output_root")) for r in runs]
    (run,) = mine
    assert run.info.status == "FINISHED"
    for key in ("loss", "learning_rate", "progress"):
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert sorted(steps) == list(range(1, MAX_STEPS + 1)), (key, sorted(steps), interruptions)
    evals = sorted(m.step for m in client.get_metric_history(run.info.run_id, "eval_loss"))
    assert evals == [8, 16, 24, 32]
    ref_run = next(r for r in runs if r.info.run_id != run.info.run_id)
    ref_loss = {m.step: m.value for m in client.get_metric_history(ref_run.info.run_id, "loss")}
    got_loss = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "loss")}
    assert got_loss == ref_loss  # the same curve, value for value


@pytest.mark.parametrize("group_by_length", [False])
def test_random_sampler_resumes_exactly_too(env, tmp_path, group_by_length):
    reference = Job(_values(tmp_path, "reference", group_by_length), tmp_path, THREADS)
    assert reference.finish() == 0, reference.log[-3000:]
    values = _values(tmp_path, "interrupted", group_by_length)
    job = Job(values, tmp_path, THREADS)
    assert job.wait_for(f"step 11/{MAX_STEPS} ")
    job.proc.send_signal(signal.SIGTERM)
    assert job.finish() == PREEMPTED, job.log[-3000:]
    again = Job(values, tmp_path, THREADS)
    assert again.finish() == 0, again.log[-3000:]
    ref, got = _adapter(tmp_path / "reference/toy/lora"), _adapter(tmp_path / "interrupted/toy/lora")
    assert all(torch.equal(ref[k], got[k]) for k in ref)
