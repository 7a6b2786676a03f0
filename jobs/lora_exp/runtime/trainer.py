"""The Trainer set-up every job shares: TrainingArguments from the spec (precision, ZeRO, cadence, seed),
our callbacks, SIGTERM handling, and a predict-only Trainer for evaluation and teacher logits."""

from __future__ import annotations

import contextlib
import logging
import resource
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

from lora_exp.config.schema import RunSpec, TrainingSpec
from lora_exp.formulations import Formulation
from lora_exp.runtime.callbacks import MlflowMetrics, ProgressLogger
from lora_exp.runtime.tracking import Tracker

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    from transformers import set_seed

    set_seed(seed)


def build_trainer(spec: RunSpec, model: Any, form: Formulation, tokenizer: Any, out: Path, train_ds: Any,
                  val_ds: Any, tracker: Tracker) -> tuple[Any, Callable[[], bool]]:
    """A transformers Trainer configured from the spec; returns it and a ``preempted()`` probe."""
    from transformers import EarlyStoppingCallback, Trainer
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    args = training_arguments(spec, out, has_eval=val_ds is not None)
    args.prediction_loss_only = form.prediction_loss_only
    samples_per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    callbacks: list[Any] = [ProgressLogger(samples_per_step, tracker), MlflowMetrics(tracker)]
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


def _watch_sigterm() -> Callable[[], bool]:
    """Chain onto the SIGTERM handler (the Trainer's JIT checkpointing) to know the job was preempted."""
    hit = {"sigterm": False}
    previous = signal.getsignal(signal.SIGTERM)

    def handler(signum: int, frame: FrameType | None) -> None:
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


def deepspeed_config(t: TrainingSpec) -> dict[str, Any] | None:
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


def training_arguments(spec: RunSpec, out: Path, has_eval: bool) -> Any:
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


def best_losses(history: list[dict[str, Any]]) -> dict[str, float]:
    """Lowest logged training and in-training validation loss (seed 003's comparison columns)."""
    out = {}
    for key, name in (("loss", "best_train_loss"), ("eval_loss", "best_eval_loss")):
        values = [h[key] for h in history if key in h]
        if values:
            out[name] = min(values)
    return out


def peak_memory() -> dict[str, float]:
    import torch

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {"peak_cpu_memory_mb": rss / (2**20 if sys.platform == "darwin" else 2**10)}
    if torch.cuda.is_available():
        out["peak_gpu_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def prediction_trainer(model: Any, form: Formulation, tokenizer: Any, batch_size: int, tmp: Path) -> Any:
    """A Trainer used only to predict (eval jobs, teacher logits): batching, devices and gathering for free."""
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=str(tmp / "trainer"), per_device_eval_batch_size=batch_size, report_to="none",
                             disable_tqdm=True, dataloader_pin_memory=_cuda(), use_cpu=not _cuda())
    return Trainer(model=model, args=args, processing_class=tokenizer, data_collator=form.collator(),
                   preprocess_logits_for_metrics=form.preprocess_logits)
