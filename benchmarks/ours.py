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
        "method": {"name": "lora", "r": w.lora_r, "alpha": w.lora_alpha, "dropout": w.lora_dropout}
        if w.method == "lora" else {"name": "full"},
        "training": {"max_steps": w.steps, "per_device_train_batch_size": w.batch_size,
                     "per_device_eval_batch_size": w.eval_batch_size, "learning_rate": w.learning_rate,
                     "seed": w.seed, "eval_strategy": "no", "save_strategy": "no", "logging_steps": 10,
                     **w.extra.get("training", {})},
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
    from lora_exp.config.loading import resolve_runs
    from lora_exp.runtime.evaluation import evaluate_splits
    from lora_exp.runtime.prepare import prepare
    from lora_exp.runtime.tracking import Tracker
    from lora_exp.runtime.trainer import build_trainer

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        values = tmp / "values.yaml"
        values.write_text(yaml.safe_dump(spec(w, files, tmp)))
        (run,) = resolve_runs(values)
        p = prepare(run)
        trainer, _ = build_trainer(run.spec, p.model, p.form, p.tokenizer, tmp / "trainer", p.train_ds, None,
                                   Tracker(None))
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
        return {"train_seconds": train_s, "train_samples": w.steps * w.batch_size, "eval_seconds": eval_s,
                "eval_samples": eval_rows, "train_tokens": sum(lengths) / len(lengths) * w.steps * w.batch_size,
                "eval_loss": metrics.get("validation_loss"), "accuracy": metrics.get("validation_accuracy")}
