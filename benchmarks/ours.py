"""lora-exp's side of the benchmark: the same workload as a lora-exp spec, run by lora-exp's own training path
(``prepare`` -> ``build_trainer`` -> train -> the formulation's evaluation), without MLflow (the reference logs
nowhere either)."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from reference import SUFFIX, TEMPLATE
from workloads import LABELS, Workload


def spec(w: Workload, files: dict[str, str], tmp: Path) -> dict[str, Any]:
    defaults: dict[str, Any] = {
        "model": {"name": w.model, "max_length": w.max_length},
        "data": {"data_files": files},
        "method": {"name": "lora", "r": w.lora_r, "alpha": w.lora_alpha, "dropout": w.lora_dropout,
                   **w.extra.get("method", {})} if w.method == "lora" else {"name": "full"},
        "training": {"max_steps": w.steps, "per_device_train_batch_size": w.batch_size,
                     "per_device_eval_batch_size": w.eval_batch_size, "learning_rate": w.learning_rate,
                     "seed": w.seed, "eval_strategy": "no", "save_strategy": "no", "logging_steps": 10,
                     "gradient_accumulation_steps": w.gradient_accumulation_steps, "precision": w.precision,
                     "gradient_checkpointing": w.gradient_checkpointing, **w.extra.get("training", {})},
        "tracking": {"tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}"},
        "output_root": str(tmp / "outputs"),
    }
    if w.formulation == "causal_lm":
        defaults["task"] = {"name": "wikitext"}
        defaults["eval"] = {"generation_samples": 0}
    else:
        defaults["task"] = {"name": "custom", "text_fields": ["text"], "labels": LABELS}
        defaults["formulation"] = {"kind": w.formulation, "template": TEMPLATE, "prompt_suffix": SUFFIX}
    defaults["model"].update(w.extra.get("model", {}))
    return {"experiment": {"name": "bench", "defaults": defaults, "runs": {w.name: {}}}}


def run(w: Workload, files: dict[str, str]) -> dict[str, Any]:
    from timing import StepTimer, warm_steps

    from lora_exp import plugins
    from lora_exp.config.loading import resolve_runs
    from lora_exp.engine.evaluation import evaluate_splits
    from lora_exp.engine.prepare import prepare
    from lora_exp.engine.trainer import build_trainer
    from lora_exp.tracking.spool import Tracker

    plugins.load()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        values = tmp / "values.yaml"
        values.write_text(yaml.safe_dump(spec(w, files, tmp)))
        (run,) = resolve_runs(values)
        p = prepare(run)
        trainer, _ = build_trainer(run.spec, p.model, p.form, p.tokenizer, tmp / "trainer", p.train_ds, None,
                                   Tracker(None))
        timer = StepTimer(warm_steps(w.steps), f"ours-{w.label or w.name}")
        trainer.add_callback(timer)
        plan = plan_estimate(run, p.train_ds)
        settings = {"torch_compile": bool(trainer.compile_blocks), "liger": bool(trainer.args.use_liger_kernel),
                    "precision": "bf16" if trainer.args.bf16 else "fp16" if trainer.args.fp16 else "fp32",
                    "attention": getattr(p.model.config, "_attn_implementation", None)}
        t0 = time.perf_counter()
        trainer.train()
        train_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        metrics = evaluate_splits(trainer, p.form, p.evals_raw, tmp / "eval", Tracker(None))
        eval_s = time.perf_counter() - t0
        lengths = [len(x) for x in p.train_ds["input_ids"]]
        eval_rows = sum(len(ds) for ds in p.evals_raw.values())
        if w.formulation == "causal_lm":
            eval_rows = int(metrics.get("validation_blocks", eval_rows))
        samples = w.steps * w.batch_size * w.gradient_accumulation_steps
        return {"train_seconds": train_s, "train_samples": samples, "eval_seconds": eval_s,
                "eval_samples": eval_rows, "train_tokens": sum(lengths) / len(lengths) * samples,
                "eval_loss": metrics.get("validation_loss"), "accuracy": metrics.get("validation_accuracy"),
                **timer.result(w.batch_size * w.gradient_accumulation_steps), **plan, "settings": settings}


def plan_estimate(run: Any, train_ds: Any) -> dict[str, float]:
    """The memory plan's estimate for this run on this device at its data's longest row (what the run's own
    ``plan_peak_memory_mb`` records), beside the measured peak; on GPU without the CUDA context (not in
    PyTorch's peak allocation)."""
    import torch

    from lora_exp.planning.memplan import estimate, longest_row

    device = "gpu" if torch.cuda.is_available() else "cpu"
    try:
        plan = estimate(run.spec, device, length=longest_row(run.spec, train_ds))
    except Exception as e:  # noqa: BLE001 - a record, not the measurement
        return {"plan_error": str(e)}
    return {"plan_peak_mb": plan.peak_mb - plan.breakdown["runtime"]}
