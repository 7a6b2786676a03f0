"""Sharded full fine-tuning on CPU (gloo), under torchrun with 2 processes as the chart launches a multi-device
profile: DeepSpeed ZeRO-3 and PyTorch FSDP2 (``training.sharding``) train a tiny Llama to the losses one process
reaches with the same global batch, save one consolidated model, and resume exactly after a SIGTERM.

The runs are shared by the tests (one module fixture): each launch costs seconds of imports per process."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

import deepspeed  # noqa: F401  (a test dependency: a missing DeepSpeed fails here rather than skipping)
import pytest
import torch
from safetensors.torch import load_file

from support import Job, experiment, mlflow_client, toy_rows, write_jsonl, write_values

pytestmark = pytest.mark.slow

STEPS = 6
TORCHRUN = ["-m", "torch.distributed.run", "--nproc-per-node", "2"]
ENV = {"OMP_NUM_THREADS": "1"}  # every process the same: a thread count may change reduction order
ARMS = {  # name: (processes, training settings)
    "one": (1, {}),
    "accumulated": (1, {"gradient_accumulation_steps": 2}),
    "zero3": (2, {"zero_stage": 3}),
    "fsdp": (2, {"zero_stage": 3, "sharding": "fsdp"}),
}


def _values(tmp: Path, name: str) -> Path:
    processes, training = ARMS[name]
    data = {"train": str(write_jsonl(tmp / "train.jsonl", toy_rows(48, seed=1))),
            "validation": str(write_jsonl(tmp / "validation.jsonl", toy_rows(16, seed=2)))}
    # The same global batch of 8 rows in every arm; the rows of a step are the same set (accelerate hands each
    # process whole batches of one sampler), so the step's mean loss is too, up to summation order. No length
    # grouping: its mega-batches depend on the per-process batch size.
    doc = experiment(Path(os.environ["TINY_LLAMA"]), data, tmp, runs={"full": {"method": {"name": "full"}}},
                     training={"max_steps": STEPS, "per_device_train_batch_size":
                               8 // processes // training.get("gradient_accumulation_steps", 1), "logging_steps": 1,
                               "learning_rate": 1e-3, "group_by_length": False, "eval_strategy": "no",
                               "save_strategy": "steps", "save_steps": 2, **training})
    return write_values(tmp, doc)


def _launch(values: Path, tmp: Path, processes: int) -> Job:
    return Job(values, tmp, env=ENV, launcher=TORCHRUN if processes > 1 else None)


def _losses(tmp: Path) -> tuple[Any, list[float]]:
    client = mlflow_client(tmp)
    (run,) = client.search_runs([client.get_experiment_by_name("toy").experiment_id])
    history = sorted(client.get_metric_history(run.info.run_id, "loss"), key=lambda m: m.step)
    assert [m.step for m in history] == list(range(1, STEPS + 1)), "every step logged once"
    return run, [m.value for m in history]


@pytest.fixture(scope="module")
def arms(tiny_llama, tmp_path_factory) -> dict[str, dict[str, Any]]:
    """Each arm uninterrupted; each sharded arm again, stopped by a SIGTERM after step 3 and resumed."""
    os.environ["TINY_LLAMA"] = str(tiny_llama)
    out: dict[str, dict[str, Any]] = {}
    for name, (processes, _) in ARMS.items():
        tmp = tmp_path_factory.mktemp(name)
        job = _launch(_values(tmp, name), tmp, processes)
        assert job.finish() == 0, job.log[-5000:]
        run, losses = _losses(tmp)
        out[name] = {"dir": tmp, "log": job.log, "run": run, "losses": losses}
        if processes == 1:
            continue
        tmp = tmp_path_factory.mktemp(f"{name}-resumed")
        values = _values(tmp, name)
        first = _launch(values, tmp, processes)
        assert first.wait_for(f"step 3/{STEPS} "), first.log[-5000:]
        first.proc.send_signal(signal.SIGTERM)
        code = first.finish()
        second = _launch(values, tmp, processes)
        assert second.finish() == 0, second.log[-5000:]
        run, losses = _losses(tmp)
        out[f"{name}-resumed"] = {"dir": tmp, "log": first.log + second.log, "first_code": code,
                                  "resumed_log": second.log, "run": run, "losses": losses}
    return out


@pytest.mark.parametrize("name", ["zero3", "fsdp", "accumulated"])
def test_the_same_global_batch_reaches_the_losses_of_one_process(arms, name: str):
    """Two sharded processes, or two accumulated half batches. A classifier's loss is its batch's mean, which
    transformers multiplied by the process count and left undivided by the accumulation steps (its
    classification heads take the item count they are given and ignore it)."""
    assert arms[name]["losses"] == pytest.approx(arms["one"]["losses"], abs=1e-4)
    assert arms[name]["run"].info.status == "FINISHED"


def test_each_backend_shards_as_asked(arms):
    assert "processes: 2 (DEEPSPEED, backend gloo), DeepSpeed ZeRO stage 3" in arms["zero3"]["log"]
    assert "processes: 2 (FSDP, backend gloo), FSDP2 full shard" in arms["fsdp"]["log"]
    assert "processes: 1 (NO, backend None)" in arms["one"]["log"]
    for name in ("zero3", "fsdp"):  # only rank 0 wrote results and logged: one progress stream
        assert "[rank 1] lora_exp.progress: step" not in arms[name]["log"]


@pytest.mark.parametrize("name", ["zero3", "fsdp"])
def test_the_shards_are_saved_as_one_model_that_loads_alone(arms, name: str, tiny_llama):
    from transformers import AutoModelForSequenceClassification

    final = arms[name]["dir"] / "outputs/toy/full/final"
    state = load_file(final / "model.safetensors")
    reference = AutoModelForSequenceClassification.from_pretrained(tiny_llama, num_labels=2)
    expected = {n: p.shape for n, p in reference.state_dict().items()}
    assert {n: state[n].shape for n in expected if n in state} == expected
    model = AutoModelForSequenceClassification.from_pretrained(final)
    # ... holding the trained weights, as the one-process run trained them (to the losses' tolerance).
    one = load_file(arms["one"]["dir"] / "outputs/toy/full/final/model.safetensors")
    for n, p in model.state_dict().items():
        if n in one:
            torch.testing.assert_close(p, one[n], atol=1e-4, rtol=1e-3, msg=n)
    assert "validation_accuracy" in arms[name]["run"].data.metrics


@pytest.mark.parametrize("name", ["zero3", "fsdp"])
def test_a_sharded_run_stopped_by_sigterm_resumes_exactly(arms, name: str):
    resumed, whole = arms[f"{name}-resumed"], arms[name]
    # torchrun passed the SIGTERM on; each worker saved a checkpoint and stopped (torchrun itself exits 1 on a
    # signal: the chart's Job retries the pod, and the next attempt resumes).
    assert resumed["first_code"] != 0, resumed["log"][-5000:]
    for rank in (0, 1):
        line = f"[rank {rank}] lora_exp: run full: SIGTERM; stopped after step"
        assert line in resumed["log"], resumed["log"][-5000:]
    assert "resuming from" in resumed["resumed_log"]
    assert resumed["losses"] == whole["losses"]  # bit for bit, step by step
    final = "outputs/toy/full/final/model.safetensors"
    a, b = load_file(resumed["dir"] / final), load_file(whole["dir"] / final)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    assert resumed["run"].info.run_id and resumed["run"].info.status == "FINISHED"


@pytest.mark.parametrize("method,label", [("qlora", "QLoRA"), ("lora", "LoRA")])
def test_fsdp_under_an_adapter_method_is_refused_before_any_model_loads(tmp_path, tiny_llama, toy_data, method,
                                                                         label):
    from support import run_cli

    values = write_values(tmp_path, experiment(tiny_llama, toy_data, tmp_path, runs={"q": {
        "method": {"name": method}, "training": {"zero_stage": 3, "sharding": "fsdp"}}}))
    proc = run_cli("validate", "-f", str(values), cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"training.sharding: fsdp does not shard {label} here" in proc.stdout + proc.stderr
    assert not (tmp_path / "mlflow.db").exists()


def test_fsdp_without_a_stage_is_a_spec_error(tmp_path, tiny_llama, toy_data):
    from support import run_cli

    values = write_values(tmp_path, experiment(tiny_llama, toy_data, tmp_path, runs={"f": {
        "method": {"name": "full"}, "training": {"sharding": "fsdp"}}}))
    proc = run_cli("validate", "-f", str(values), cwd=tmp_path)
    assert proc.returncode == 2 and "sharding fsdp shards at zero_stage 2" in proc.stdout + proc.stderr


def test_the_plan_shards_what_each_backend_shards(tiny_llama, toy_data, tmp_path):
    """Per device, over 2 processes: both backends halve gradients and optimizer state; FSDP2 keeps its sharded
    weights in fp32 with no master copy (ZeRO: 16-bit weights plus a sharded fp32 master copy)."""
    from transformers import AutoConfig

    from lora_exp.config.loading import resolve_runs
    from lora_exp.planning.memplan import estimate

    config = AutoConfig.from_pretrained(tiny_llama, num_hidden_layers=8)  # deep enough for a block to be a part
    values = write_values(tmp_path, experiment(tiny_llama, toy_data, tmp_path, runs={"full": {
        "method": {"name": "full"}}}, training={"precision": "bf16"}))
    (run,) = resolve_runs(values)
    plans = {}
    for sharding, stage, gpus in (("zero", 0, 1), ("zero", 3, 2), ("fsdp", 3, 1), ("fsdp", 3, 2), ("fsdp", 2, 2)):
        training = run.spec.training.model_copy(update={"zero_stage": stage, "sharding": sharding})
        plans[sharding, stage, gpus] = estimate(run.spec.model_copy(update={"training": training}), "gpu",
                                                gpus=gpus, config=config).breakdown
    one, two = plans["fsdp", 3, 1], plans["fsdp", 3, 2]
    assert two["gradients"] == pytest.approx(one["gradients"] / 2)
    assert two["optimizer"] == pytest.approx(one["optimizer"] / 2)
    assert two["weights"] < one["weights"]
    assert plans["fsdp", 2, 2]["weights"] > two["weights"]  # stage 2 keeps every block gathered
    assert plans["zero", 3, 2]["optimizer"] > two["optimizer"]  # ZeRO's master copy


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
