"""Evaluation: the eval job (baseline, trained artifact, or an MLflow run's model) and the per-split outputs
shared with the train job's final evaluation."""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

from lora_exp.errors import UserError
from lora_exp.spec import Run, RunSpec

log = logging.getLogger(__name__)


def evaluate_splits(trainer: Any, form: Any, evals_raw: dict[str, Any], out_dir: Path, tracker: Any):
    """Evaluate every eval split; log metrics and the split's output files.

    Metric names are ``<split>_<metric>`` in every job, so baseline, trained and re-evaluated runs line
    up column by column in the MLflow UI.
    """
    flat: dict[str, float] = {}
    trainer.args.prediction_loss_only = False  # in-training evaluation may be loss-only; this one is not
    for split, raw in evals_raw.items():
        metrics = form.evaluate(trainer, raw, split, out_dir / split)
        if not trainer.is_world_process_zero():
            continue
        log.info("%s: %s", split, " ".join(f"{k} {v:.4f}" for k, v in metrics.items()
                                           if isinstance(v, float) and not k.endswith("samples")))
        named = {f"{split}_{k}": v for k, v in metrics.items()}
        tracker.log_metrics(named)
        tracker.log_artifacts(out_dir / split, f"eval/{split}")
        flat.update(named)
    return flat


def resolve_artifact(run: Run, tmp: Path) -> Path | None:
    """Where the model to evaluate lives: eval.model_path, eval.mlflow_run_id, this train run's own
    artifact, or None for the base model (the baseline)."""
    from lora_exp.tracking import locate_artifact
    from lora_exp.train import FINAL_DIR

    e = run.spec.eval
    if e.model_path or e.mlflow_run_id:
        return locate_artifact(e.model_path, e.mlflow_run_id, tmp)
    if run.spec.job == "distill":
        raise UserError(f"run {run.name}: a distill job evaluates its student itself; see {run.output_dir / 'eval'}")
    if run.spec.job == "train":
        own = run.output_dir / FINAL_DIR
        if not own.is_dir():
            raise UserError(f"run {run.name}: no trained model at {own}; train it first (lora-exp train)")
        return own
    return None


def build_kind(spec: RunSpec, task: Any) -> str:
    from lora_exp.tasks.base import require_formulation

    return require_formulation(spec, task.name, task.formulations)


def load_for_eval(spec: RunSpec, artifact: Path | None, form: Any, tokenizer: Any, task: Any,
                  quantized: bool = True) -> tuple[Any, str]:
    """The base model (baseline) or the trained model an artifact describes, and a label for logs/tags.

    ``quantized=False`` loads a QLoRA artifact's base unquantized (to merge the adapter into it)."""
    from lora_exp.methods import get_method
    from lora_exp.models import load_model
    from lora_exp.tracking import read_spec

    def load_base(path: str | None, run_spec: RunSpec = spec, extra: dict | None = None) -> Any:
        labels = getattr(task, "labels", ())
        return load_model(run_spec.model, form.model_class, tokenizer, labels, path=path, **(extra or {}))

    if artifact is None:
        return load_base(None), "base"
    trained = read_spec(artifact)
    trained_kind = build_kind(trained, task)
    if trained_kind != form.kind:
        raise UserError(f"{artifact}: trained with formulation {trained_kind!r}, but this eval uses {form.kind!r}")
    from lora_exp.tasks import get_task

    trained_labels = getattr(get_task(trained), "labels", ())
    if trained_labels != getattr(task, "labels", ()):
        raise UserError(f"{artifact}: trained for labels {trained_labels}, evaluating {getattr(task, 'labels', ())}")
    method = get_method(trained.method.name)
    extra = method.load_kwargs(trained) if quantized else {}
    model = method.load(lambda p: load_base(p, trained, extra), str(artifact))
    return model, f"{trained.method.name}:{artifact}"


def evaluate_run(run: Run) -> dict[str, float]:
    """The eval job: load data (checked first), the model, predict each eval split, log a new MLflow run."""
    from lora_exp.data import load_splits, subsample
    from lora_exp.formulation import build_formulation
    from lora_exp.models import load_tokenizer
    from lora_exp.tasks import get_task
    from lora_exp.tracking import mlflow_run

    spec = run.spec
    task = get_task(spec)
    eval_spec = spec.model_copy(update={"job": "eval"})
    _, _, evals_raw = subsample(eval_spec, task, load_splits(eval_spec, task))
    with tempfile.TemporaryDirectory(prefix="lora-exp-eval-") as tmp:
        artifact = resolve_artifact(run, Path(tmp))
        tokenizer = load_tokenizer(spec.model)
        form = build_formulation(spec, task, tokenizer)
        model, source = load_for_eval(spec, artifact, form, tokenizer, task)
        log.info("evaluating %s on %s (%s)", source, task.name, ", ".join(evals_raw))
        out = run.output_dir / "eval-job"
        trainer = prediction_trainer(model, form, tokenizer, spec.training.per_device_eval_batch_size, Path(tmp))
        with mlflow_run(run, "eval") as tracker:
            tracker.set_tags({"eval.source": source})
            metrics = evaluate_splits(trainer, form, evals_raw, out, tracker)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def prediction_trainer(model: Any, form: Any, tokenizer: Any, batch_size: int, tmp: Path) -> Any:
    """A Trainer used only to predict (eval jobs, teacher logits): batching, devices and gathering for free."""
    import torch
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=str(tmp / "trainer"), per_device_eval_batch_size=batch_size, report_to="none",
                             disable_tqdm=True, dataloader_pin_memory=torch.cuda.is_available(),
                             use_cpu=not torch.cuda.is_available())
    return Trainer(model=model, args=args, processing_class=tokenizer, data_collator=form.collator(),
                   preprocess_logits_for_metrics=form.preprocess_logits)


def print_summary(results: dict[str, dict[str, float]]) -> None:
    """A plain table of each run's headline metrics (runs x metrics), printed after ``lora-exp run``."""
    keys = sorted({k for m in results.values() for k in m if not k.endswith(("_samples", "_loss"))})
    if not keys:
        return
    width = max(len(n) for n in results) + 2
    print("\n" + "run".ljust(width) + "".join(k.rjust(max(len(k), 8) + 2) for k in keys))
    for name, m in results.items():
        print(name.ljust(width) + "".join(
            (f"{m[k]:.4f}" if k in m else "-").rjust(max(len(k), 8) + 2) for k in keys))
    print()
