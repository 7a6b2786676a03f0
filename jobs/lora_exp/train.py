"""The train job: one path for every task, formulation and method.

    data (checked) -> tokenizer + formulation -> model + method -> Trainer -> artifact -> evaluation -> MLflow

Re-running the same command resumes from the latest complete checkpoint in the run's output dir and
logs into the same MLflow run; a finished run is not trained again.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_exp.errors import Preempted
from lora_exp.spec import Run, RunSpec

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"  # written last: its presence marks a finished run
FINAL_DIR = "final"


@dataclass
class Prepared:
    """Everything a run needs before its Trainer: checked data, tokenizer, formulation, model with method."""

    task: Any
    tokenizer: Any
    form: Any
    method: Any
    model: Any
    train_ds: Any
    val_ds: Any
    evals_raw: dict[str, Any]
    tags: dict[str, str] = field(default_factory=dict)  # extra MLflow tags (e.g. the distillation teacher)


def prepare(run: Run) -> Prepared:
    """Data first (a bad file fails before any model loads), then tokenizer, formulation, model + method."""
    from lora_exp.data import load_splits, subsample
    from lora_exp.formulation import build_formulation
    from lora_exp.methods import get_method
    from lora_exp.models import load_model, load_tokenizer
    from lora_exp.tasks import get_task

    spec = run.spec
    task = get_task(spec)
    train_raw, val_raw, evals_raw = subsample(spec, task, load_splits(spec, task))
    seed_everything(spec.training.seed)  # new heads and LoRA matrices initialise from this seed
    log.info("run %s: %s on %s, %d train / %d in-training eval rows", run.name, spec.method.name, task.name,
             len(train_raw), len(val_raw))
    tokenizer = load_tokenizer(spec.model)
    form = build_formulation(spec, task, tokenizer)
    method = get_method(spec.method.name)
    model = load_model(spec.model, form.model_class, tokenizer, getattr(task, "labels", ()),
                       **method.load_kwargs(spec))
    model = method.apply(model, spec, form.peft_task_type)
    return Prepared(task, tokenizer, form, method, model, form.tokenize(train_raw), form.tokenize(val_raw), evals_raw)


def seed_everything(seed: int) -> None:
    from transformers import set_seed

    set_seed(seed)


def train(run: Run) -> dict[str, float]:
    from lora_exp.evaluate import evaluate_splits
    from lora_exp.methods import count_parameters
    from lora_exp.tracking import mlflow_run

    spec, out = run.spec, run.output_dir
    if (out / METRICS_FILE).is_file():
        log.info("run %s already finished (%s); delete %s to run it again", run.name, out / METRICS_FILE, out)
        return json.loads((out / METRICS_FILE).read_text())

    if spec.job == "distill":
        from lora_exp.distill import prepare_distill

        p = prepare_distill(run)
    else:
        p = prepare(run)
    trainable, total = count_parameters(p.model)
    log.info("parameters: %d trainable of %d (%.3f%%)", trainable, total, 100 * trainable / total)
    out.mkdir(parents=True, exist_ok=True)
    with mlflow_run(run, spec.job, state_dir=out) as tracker:
        tracker.set_tags(p.tags)
        tracker.log_metrics({"trainable_params": trainable, "total_params": total,
                             "trainable_share": trainable / total})
        trainer, preempted = build_trainer(spec, p.model, p.form, p.tokenizer, out, p.train_ds, p.val_ds, tracker)
        describe_parallelism(trainer)
        result = trainer.train(resume_from_checkpoint=latest_checkpoint(out))
        if preempted():
            raise Preempted(f"run {run.name}: SIGTERM at step {trainer.state.global_step}; checkpoint saved in {out}")
        tracker.log_metrics({**result.metrics, **peak_memory(), **best_losses(trainer.state.log_history)},
                            step=trainer.state.global_step)
        save_artifact(run, trainer, p.method, tracker)
        metrics = evaluate_splits(trainer, p.form, p.evals_raw, out / "eval", tracker)
        if trainer.is_world_process_zero():
            (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2))
    return metrics


def save_artifact(run: Run, trainer: Any, method: Any, tracker: Any) -> Path:
    """Write ``<out>/final`` atomically (all ranks take part: ZeRO-3 gathers shards) and log it as ``model``."""
    from lora_exp.tracking import SPEC_FILE, write_spec

    out = run.output_dir
    final, tmp = out / FINAL_DIR, out / (FINAL_DIR + ".tmp")
    if trainer.is_world_process_zero():
        shutil.rmtree(tmp, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    method.save(trainer, str(tmp))
    if trainer.is_world_process_zero():
        write_spec(run, tmp / SPEC_FILE)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        tracker.log_artifacts(final, "model")
        size_mb = sum(f.stat().st_size for f in final.rglob("*") if f.is_file()) / 2**20
        tracker.log_metrics({"artifact_size_mb": size_mb})
    trainer.accelerator.wait_for_everyone()
    return final


def build_trainer(spec: RunSpec, model: Any, form: Any, tokenizer: Any, out: Path, train_ds: Any, val_ds: Any,
                  tracker: Any):
    """A transformers Trainer configured from the spec; returns it and a ``preempted()`` probe."""
    from transformers import EarlyStoppingCallback, Trainer
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from lora_exp.callbacks import MlflowMetrics, ProgressLogger

    args = training_arguments(spec, out, has_eval=val_ds is not None)
    args.prediction_loss_only = form.prediction_loss_only
    samples_per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    callbacks = [ProgressLogger(samples_per_step, tracker), MlflowMetrics(tracker)]
    if spec.training.early_stopping:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=spec.training.early_stopping.patience))
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=val_ds,
        processing_class=tokenizer,
        data_collator=form.collator(),
        compute_metrics=None if form.prediction_loss_only else form.compute_metrics,
        preprocess_logits_for_metrics=None if form.prediction_loss_only else form.preprocess_logits,
        callbacks=callbacks,
    )
    for cb in (PrinterCallback, ProgressCallback):  # our ProgressLogger prints the one line per interval
        trainer.remove_callback(cb)
    return trainer, _watch_sigterm()


def describe_parallelism(trainer: Any) -> None:
    state = trainer.accelerator.state
    plugin = getattr(state, "deepspeed_plugin", None)
    zero = f", DeepSpeed ZeRO stage {plugin.zero_stage}" if plugin is not None else ""
    log.info("processes: %d (%s, backend %s)%s", state.num_processes, state.distributed_type.value,
             state.backend, zero)


def _watch_sigterm():
    """Chain onto the SIGTERM handler (the Trainer's JIT checkpointing) to know the job was preempted."""
    hit = {"sigterm": False}
    previous = signal.getsignal(signal.SIGTERM)

    def handler(signum, frame):
        hit["sigterm"] = True
        logging.getLogger(__name__).warning("SIGTERM: saving a checkpoint, then stopping")
        if callable(previous):
            previous(signum, frame)

    # Outside the main thread (e.g. a notebook worker) signals cannot be caught: no preemption handling.
    with contextlib.suppress(ValueError):
        signal.signal(signal.SIGTERM, handler)
    return lambda: hit["sigterm"]


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def resolve_precision(precision: str) -> str:
    import torch

    if not _cuda():
        if precision in ("fp16", "bf16"):
            log.warning("training.precision %s needs a GPU; running fp32 on CPU", precision)
        return "fp32"
    if precision == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return precision


def deepspeed_config(t: Any) -> dict[str, Any] | None:
    """ZeRO settings for the Trainer's DeepSpeed integration; "auto" lets the Trainer fill in the rest."""
    if not t.zero_stage:
        return None
    zero: dict[str, Any] = {"stage": t.zero_stage, "overlap_comm": True, "contiguous_gradients": True}
    if t.zero_offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        if t.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    if t.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True  # save a consolidated model
    return {
        "zero_optimization": zero,
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto"},
    }


def training_arguments(spec: RunSpec, out: Path, has_eval: bool):
    from transformers import TrainingArguments

    t = spec.training
    precision = resolve_precision(t.precision)
    es = t.early_stopping
    return TrainingArguments(
        output_dir=str(out),
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        learning_rate=t.learning_rate,
        per_device_train_batch_size=t.per_device_train_batch_size,
        per_device_eval_batch_size=t.per_device_eval_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        weight_decay=t.weight_decay,
        warmup_steps=t.warmup_ratio,
        lr_scheduler_type=t.lr_scheduler,
        max_grad_norm=t.max_grad_norm,
        fp16=precision == "fp16",
        bf16=precision == "bf16",
        activation_checkpointing=t.gradient_checkpointing,
        train_sampling_strategy="group_by_length" if t.group_by_length else "random",
        eval_strategy=t.eval_strategy if has_eval else "no",
        eval_steps=t.eval_steps,
        save_strategy=t.save_strategy,
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        logging_strategy="steps",
        logging_steps=t.logging_steps,
        load_best_model_at_end=es is not None,
        metric_for_best_model=f"eval_{es.metric}" if es else None,
        greater_is_better=es.greater_is_better if es else None,
        seed=t.seed,
        report_to="none",
        disable_tqdm=True,
        enable_jit_checkpoint=True,  # SIGTERM (preemption, eviction) -> checkpoint, then stop
        deepspeed=deepspeed_config(t),
        dataloader_num_workers=0,
        dataloader_pin_memory=_cuda(),
        # Without a GPU, say so: accelerate then sets up multi-process CPU (gloo) correctly, DeepSpeed included.
        use_cpu=not _cuda(),
    )


def latest_checkpoint(out: Path) -> str | None:
    """The newest *complete* checkpoint: a JIT save cut short leaves a sentinel and no trainer_state.json."""
    candidates = []
    for d in out.glob("checkpoint-*"):
        step = d.name.removeprefix("checkpoint-")
        complete = (d / "trainer_state.json").is_file() and not (d / "checkpoint-is-incomplete.txt").exists()
        if step.isdigit() and complete:
            candidates.append((int(step), d))
    if not candidates:
        return None
    step, path = max(candidates)
    log.info("resuming from %s (step %d)", path, step)
    return str(path)


def best_losses(history: list[dict[str, Any]]) -> dict[str, float]:
    """Lowest logged training and in-training validation loss (seed 003's comparison columns)."""
    out = {}
    for key, name in (("loss", "best_train_loss"), ("eval_loss", "best_eval_loss")):
        values = [h[key] for h in history if key in h]
        if values:
            out[name] = min(values)
    return out


def peak_memory() -> dict[str, float]:
    import resource
    import sys

    import torch

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {"peak_cpu_memory_mb": rss / (2**20 if sys.platform == "darwin" else 2**10)}
    if torch.cuda.is_available():
        out["peak_gpu_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out
