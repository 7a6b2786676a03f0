"""The memory plan (``lora-exp plan``, lora_exp.planning.memplan): its estimate against the peak that real CPU
runs measure, for every method on tiny GPT-2 and Llama models and on SmolLM2-135M; and the command's
verdicts, profile choice and exit codes on the shipped values files."""

from __future__ import annotations

import concurrent.futures
import json
import re
from pathlib import Path

import pytest
import yaml

from lora_exp.core import allocator, tags
from support import (
    ROOT,
    SMOLLM2_DIR,
    experiment,
    mlflow_client,
    run_cli,
    save_tiny_model,
    toy_rows,
    write_jsonl,
    write_values,
)

METHODS = {
    "lora": {"method": {"name": "lora"}},
    "qlora": {"method": {"name": "qlora"}},
    "head_only": {"method": {"name": "head_only"}},
    "full": {"method": {"name": "full"}},
}
# The bound on CPU, for every run on tcmalloc (what CPU jobs run on where it is installed; `make test`
# installs it). On glibc's malloc the tiny models' resident set varies between repetitions of the same run by
# more than that (1.1-2.0x the live bytes, docs/planning.md): there only SmolLM2's runs are held to it.
TOLERANCE = 0.20


def measure(tiny_tokenizer_dir: Path, smollm2: Path, tmp: Path, gpu: bool) -> dict[str, dict[str, float]]:
    """Every method on three models, each run in a process of its own (the resident set of a process that ran
    something before holds freed memory the next run reuses): the estimate each run logged, and what it
    measured (CPU: the growth of its resident set from before its model loaded to the end of its final
    evaluation; GPU: PyTorch's peak allocation), and the allocator it ran on."""
    # Wide enough that the model's own memory, not the interpreter's, is what is measured.
    models = {
        "tiny-gpt2": (save_tiny_model("gpt2", tiny_tokenizer_dir, tmp / "gpt2", width=256, layers=4, positions=256),
                      256, 16),
        "tiny-llama": (save_tiny_model("llama", tiny_tokenizer_dir, tmp / "llama", width=256, layers=4,
                                       positions=256), 256, 16),
        "smollm2": (smollm2, 96, 8),
    }
    rows = [{"text": (r["text"] + " ") * 40, "label": r["label"]} for r in toy_rows(48)]
    from transformers import AutoTokenizer

    for name, (model, length, _) in models.items():  # the plan counts max_length tokens a row: so must the runs
        tok = AutoTokenizer.from_pretrained(model)
        assert min(len(tok(r["text"])["input_ids"]) for r in rows) >= length, name
    data = {"train": str(write_jsonl(tmp / "train.jsonl", rows)),
            "validation": str(write_jsonl(tmp / "validation.jsonl", rows[:16]))}
    jobs = []
    for name, (model, length, batch) in models.items():
        # CPU: fp32 (as every CPU test); GPU: the precision users get (auto: bf16 autocast where supported).
        doc = experiment(model, data, tmp / name, runs=METHODS, formulation={"kind": "classifier"},
                         training={"max_steps": 2, "per_device_train_batch_size": batch, "eval_strategy": "no",
                                   "save_strategy": "no", "logging_steps": 1, **({"precision": "auto"} if gpu else {})})
        doc["experiment"]["defaults"]["model"]["max_length"] = length
        doc["experiment"]["defaults"]["tracking"]["system_metrics"] = False
        values = write_values(tmp, doc, f"{name}.yaml")
        jobs += [(name, method, values) for method in METHODS]

    def one(job: tuple[str, str, Path]) -> tuple[str, str, Path]:
        name, method, values = job
        proc = run_cli("train", "-f", str(values), "--run", method, env={"LD_PRELOAD": ""})
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return job

    out: dict[str, dict[str, float]] = {}
    # CPU: two processes at a time, one per core; GPU: one, alone on the device.
    with concurrent.futures.ThreadPoolExecutor(1 if gpu else 2) as pool:
        for name, method, _ in pool.map(one, jobs):
            client = mlflow_client(tmp / name)
            (run,) = [r for r in client.search_runs([client.get_experiment_by_name("toy").experiment_id])
                      if r.info.run_name == method]
            out[f"{name}/{method}"] = {**run.data.metrics, "allocator": run.data.tags[tags.ALLOCATOR]}
    return out


@pytest.fixture(scope="module")
def measured(tiny_tokenizer_dir, smollm2, tmp_path_factory) -> dict[str, dict[str, float]]:
    return measure(tiny_tokenizer_dir, smollm2, tmp_path_factory.mktemp("memplan"), gpu=False)


@pytest.mark.parametrize("model", ["tiny-gpt2", "tiny-llama", "smollm2"])
@pytest.mark.parametrize("method", list(METHODS))
def test_estimate_is_close_to_the_measured_peak_on_cpu(measured, model: str, method: str, monkeypatch):
    m = measured[f"{model}/{method}"]
    # Each run restarted itself on the allocator a job here gets (tcmalloc where installed).
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    assert m["allocator"] == allocator.wanted()
    if m["allocator"] != allocator.TCMALLOC and model != "smollm2":
        pytest.skip("glibc malloc: the tiny models' resident set varies by more than 20% between repetitions "
                    "(apt-get install libtcmalloc-minimal4)")
    estimate, actual = m["plan_peak_memory_mb"], m["peak_memory_growth_mb"]
    parts = {k.removeprefix("plan_").removesuffix("_mb"): round(v) for k, v in m.items() if k.startswith("plan_")}
    assert abs(estimate - actual) <= TOLERANCE * actual, (
        f"{model} {method}: estimated {estimate:.0f} MiB, measured {actual:.0f} MiB ({parts})")


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU")
def test_estimate_is_close_to_the_measured_peak_on_gpu(tiny_tokenizer_dir, smollm2, tmp_path: Path):
    """The issue's GPU bound, 15%, where a GPU is available: PyTorch's peak allocation against the estimate
    without the fixed CUDA context (which max_memory_allocated does not see). Every run is checked before any
    assertion, so one failure shows all twelve figures."""
    measured = measure(tiny_tokenizer_dir, smollm2, tmp_path, gpu=True)
    lines, bad = [], []
    for key, m in measured.items():
        estimate, actual = m["plan_peak_memory_mb"] - m["plan_runtime_mb"], m["peak_gpu_memory_mb"]
        error = (estimate - actual) / actual
        lines.append(f"{key}: estimated {estimate:.0f} MiB, measured {actual:.0f} MiB ({error:+.0%})")
        if abs(error) > 0.15:
            bad.append(key)
    print("\n".join(lines))  # pytest -s: the figures for docs/planning.md
    assert not bad, "\n".join(lines)


def test_the_estimate_follows_the_method(measured):
    """The parts move as the methods say: QLoRA's 4-bit weights are ~1/6 of LoRA's fp32 ones (plus the
    mapped checkpoint on CPU); full fine-tuning has fp32 gradients the size of the weights and AdamW twice
    that; head-only trains next to nothing."""
    lora, qlora, full, head = (measured[f"smollm2/{m}"] for m in ("lora", "qlora", "full", "head_only"))
    assert qlora["plan_weights_mb"] < lora["plan_weights_mb"] / 2.5
    assert qlora["plan_checkpoint_mapped_mb"] == pytest.approx(lora["plan_weights_mb"], rel=0.05)
    assert full["plan_gradients_mb"] == pytest.approx(full["plan_weights_mb"], rel=0.01)
    assert full["plan_optimizer_mb"] == pytest.approx(2 * full["plan_gradients_mb"], rel=0.01)
    assert head["plan_gradients_mb"] < 1 and lora["plan_gradients_mb"] < full["plan_gradients_mb"] / 20


@pytest.fixture
def plan(capfd, caplog, monkeypatch):
    """``lora-exp plan`` in this process (the libraries imported once): exit code, and what it printed (the
    table) followed by its log."""
    from lora_exp import cli

    monkeypatch.chdir(ROOT)

    def _plan(*args: str) -> tuple[int, str]:
        capfd.readouterr()
        caplog.clear()
        rc = cli.main(["plan", *args])
        out = capfd.readouterr()
        return rc, out.out + "\n" + out.err + "\n" + caplog.text

    return _plan


def table(text: str) -> dict[str, dict[str, str]]:
    """The plan's table, by run."""
    lines = [line for line in text.splitlines() if line.strip()]
    start = next(i for i, line in enumerate(lines) if line.startswith("run "))
    header = re.split(r"\s{2,}", lines[start].strip())
    rows = {}
    for line in lines[start + 1:]:
        cells = re.split(r"\s{2,}", line.strip())
        if len(cells) == len(header):
            rows[cells[0]] = dict(zip(header, cells, strict=True))
    return rows


SHIPPED = ["mnli", "glue", "squad_v2", "imdb", "wikitext", "cola", "demo", "demo-kd", "smoke", "smoke-offline"]


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_values_files_fit_their_own_profiles(name: str, smollm2, plan):
    """Offline: hub models' configs come from the cache or, failing that, their published architectures."""
    args = ["-f", f"values/{name}.yaml"]
    if name == "smoke-offline":  # its model sits where k8s/prepare-model.yaml puts it in the cluster
        args += ["--set", f"model.name={SMOLLM2_DIR}"]
    rc, out = plan(*args)
    assert rc == 0, out
    rows = table(out)
    own = yaml.safe_load((ROOT / "values" / f"{name}.yaml").read_text())
    assert {run.split("/seed-", 1)[0] for run in rows} == set(own["experiment"]["runs"])  # repeats: each seed
    for run, row in rows.items():
        assert row["verdict"] == "fits", f"{name}: {run} {row}"
        assert int(row["peak MiB"].replace(",", "")) > 0


def test_check_fails_with_exit_2_and_the_breakdown_before_anything_runs(tmp_path: Path, tiny_gpt2: Path, toy_data,
                                                                       plan):
    """--check against a profile the run cannot fit: exit 2, the table names the parts, nothing is written."""
    values = write_values(tmp_path, experiment(tiny_gpt2, toy_data, tmp_path))
    profiles = tmp_path / "profiles.yaml"
    profiles.write_text(yaml.safe_dump({"profiles": {
        "small": {"gpus": 1, "gpuMemoryGiB": 0.05, "nodes": 1, "training": {"precision": "bf16"}},
        "big": {"gpus": 1, "gpuMemoryGiB": 16, "nodes": 1, "training": {"precision": "bf16"}}}}))
    rc, out = plan("-f", str(values), "--profiles", str(profiles), "--profile", "small", "--check")
    assert rc == 2, out
    row = table(out)["lora"]
    assert row["verdict"] == "DOES NOT FIT" and row["smallest fit"] == "big"
    assert {"weights", "gradients", "optimizer", "activations", "eval", "runtime"} <= set(row)
    assert "lora: estimated peak memory does not fit the profile" in out
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "mlflow.db").exists()
    rc, out = plan("-f", str(values), "--profiles", str(profiles), "--profile", "big", "--check")
    assert rc == 0 and table(out)["lora"]["verdict"] == "fits", out
    # A profile that does not say its memory is not a reason to stop a run.
    profiles.write_text(yaml.safe_dump({"profiles": {"mystery": {"gpus": 1, "nodes": 1}}}))
    rc, out = plan("-f", str(values), "--profiles", str(profiles), "--profile", "mystery", "--check")
    assert rc == 0 and table(out)["lora"]["verdict"] == "unknown capacity", out


def test_gpu_attention_is_planned_as_the_fused_kernels_keep_it(tiny_llama: Path, toy_data, tmp_path: Path):
    """On GPU the fused attention kernels (flash, SDPA's) keep no (length x length) score matrix; eager
    attention does, and the plan sees the difference grow with the square of the length."""
    from lora_exp.config.loading import resolve_runs
    from lora_exp.planning.memplan import estimate

    doc = experiment(tiny_llama, toy_data, tmp_path, training={"precision": "bf16"})
    doc["experiment"]["defaults"]["model"]["max_length"] = 128
    (run,) = resolve_runs(write_values(tmp_path, doc))
    act = {}
    for attn in ("auto", "eager"):
        spec = run.spec.model_copy(update={"model": run.spec.model.model_copy(update={"attn_implementation": attn})})
        act[attn] = estimate(spec, "gpu").breakdown["activations"]
    # Eager keeps softmax scores (batch 8 x 2 heads x 128 x 128 in bf16 = 0.5 MiB) and more per layer.
    assert act["eager"] > act["auto"] + 1.0, act


def test_auto_keeps_the_runs_pinned_to_a_profile(tmp_path: Path, plan):
    """--auto chooses for the runs without a profile of their own; job.runProfiles pins are kept."""
    src = yaml.safe_load((ROOT / "values" / "glue.yaml").read_text())
    src["job"] = {"runProfiles": {"mrpc-full": "a100-80g-x8"}}
    values = tmp_path / "pinned.yaml"
    values.write_text(yaml.safe_dump(src))
    overlay = tmp_path / "auto.yaml"
    rc, out = plan("-f", str(values), "--auto", str(overlay))
    assert rc == 0, out
    doc = yaml.safe_load(overlay.read_text())
    assert doc["job"]["runProfiles"]["mrpc-full"] == "a100-80g-x8"
    assert doc["profile"] != "a100-80g-x8"


def test_auto_writes_the_smallest_fitting_profile_as_a_helm_overlay(tmp_path: Path, plan):
    """--auto: each run's smallest fitting GPU profile; the most common one as `profile`, the others under
    job.runProfiles. Every pick fits, and the next smaller GPU profile does not fit the run that chose it."""
    overlay = tmp_path / "auto.yaml"
    rc, out = plan("-f", "values/glue.yaml", "--auto", str(overlay))
    assert rc == 0, out
    doc = yaml.safe_load(overlay.read_text())
    runs = list(yaml.safe_load((ROOT / "values" / "glue.yaml").read_text())["experiment"]["runs"])
    picks = {run: (doc.get("job", {}).get("runProfiles", {}).get(run) or doc["profile"]) for run in runs}
    for run, profile in picks.items():
        rc, out = plan("-f", "values/glue.yaml", "--run", run, "--profile", profile, "--json", str(tmp_path / "p.json"))
        assert rc == 0, out
        (row,) = json.loads((tmp_path / "p.json").read_text())
        assert row["verdict"] == "fits", row
        assert row["smallest fit"] == profile


def test_unknown_profile_is_a_clear_error(plan):
    rc, out = plan("-f", "values/mnli.yaml", "--profile", "no-such-gpu")
    assert rc == 2 and "profile 'no-such-gpu' is not defined" in out


@pytest.mark.parametrize("name", ["mnli", "squad_v2"])
def test_remembered_meta_results_leave_every_estimate_as_it_was(name: str, monkeypatch):
    """The probe remembers operator results by input shapes (plan takes seconds, not tens of seconds); a
    remembered result must count exactly the memory a computed one does. squad_v2's evaluation has an operator
    whose outputs share one storage: rebuilt apart, they were counted twice (1 MiB more)."""
    from lora_exp.config.loading import resolve_runs
    from lora_exp.planning import memplan

    runs = resolve_runs(str(ROOT / "values" / f"{name}.yaml"), None, [])
    remembered = [memplan.estimate(r.spec, "gpu").breakdown for r in runs]
    monkeypatch.setattr(memplan._MetaResults, "call", lambda self, func, args, kwargs: func(*args, **kwargs))
    assert [memplan.estimate(r.spec, "gpu").breakdown for r in runs] == remembered
