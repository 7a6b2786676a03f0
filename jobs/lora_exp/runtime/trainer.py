"""The Trainer set-up every job shares: TrainingArguments from the spec (precision, ZeRO, cadence, seed),
our callbacks, SIGTERM handling, and a predict-only Trainer for evaluation and teacher logits."""

from __future__ import annotations

import logging
import os
import resource
import socket
import sys
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer
from transformers.trainer_pt_utils import LengthGroupedSampler

from lora_exp.config.schema import RunSpec, TrainingSpec
from lora_exp.formulations import Formulation
from lora_exp.runtime.callbacks import MlflowMetrics, Preemption, ProgressLogger
from lora_exp.runtime.tracking import Tracker

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    from transformers import set_seed

    set_seed(seed)


class EpochSeededLengthGroupedSampler(LengthGroupedSampler):
    """transformers' length-grouped sampler, seeded per epoch.

    transformers builds it without a generator, so each epoch's order comes from the global RNG at the moment
    iteration starts; a resumed run restores a later RNG state, reshuffles the epoch it resumes, and skips the
    wrong batches. Seeded from (seed, epoch), an epoch has one order, whoever iterates it."""

    def __init__(self, *args: Any, seed: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seed = seed
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.generator = torch.Generator().manual_seed(self.seed + epoch)


class LoraExpTrainer(Trainer):
    """The stock Trainer with a reproducible length-grouped sampler (the only thing changed)."""

    def _get_train_sampler(self, train_dataset: Any = None) -> Any:
        sampler = super()._get_train_sampler(train_dataset)
        if isinstance(sampler, LengthGroupedSampler) and not isinstance(sampler, EpochSeededLengthGroupedSampler):
            seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
            return EpochSeededLengthGroupedSampler(sampler.batch_size, lengths=sampler.lengths, seed=seed)
        return sampler


def build_trainer(spec: RunSpec, model: Any, form: Formulation, tokenizer: Any, out: Path, train_ds: Any,
                  val_ds: Any, tracker: Tracker) -> tuple[Any, Preemption]:
    """A Trainer configured from the spec, and its preemption callback (``stopped_at`` after a SIGTERM)."""
    from transformers import EarlyStoppingCallback
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    args = training_arguments(spec, out, has_eval=val_ds is not None)
    args.prediction_loss_only = form.prediction_loss_only
    samples_per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    preemption = Preemption()
    callbacks: list[Any] = [ProgressLogger(samples_per_step, tracker), MlflowMetrics(tracker), preemption]
    if spec.training.early_stopping:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=spec.training.early_stopping.patience))
    trainer = LoraExpTrainer(
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
    return trainer, preemption


def describe_parallelism(trainer: Any) -> None:
    state = trainer.accelerator.state
    plugin = getattr(state, "deepspeed_plugin", None)
    zero = f", DeepSpeed ZeRO stage {plugin.zero_stage}" if plugin is not None else ""
    log.info("processes: %d (%s, backend %s)%s", state.num_processes, state.distributed_type.value,
             state.backend, zero)


def _cuda() -> bool:
    return torch.cuda.is_available()


def resolve_precision(precision: str) -> str:
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


def single_process_launch() -> None:
    """DeepSpeed needs a launcher's environment; without torchrun (a single-GPU Job, a laptop) it would look
    for MPI. One process is a world of one: say so the way torchrun would."""
    if "WORLD_SIZE" in os.environ or "LOCAL_RANK" in os.environ:
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "LOCAL_RANK": "0",
                       "WORLD_SIZE": "1"})
    log.info("DeepSpeed without a launcher: running as a single-process world")


def training_arguments(spec: RunSpec, out: Path, has_eval: bool) -> Any:
    from transformers import TrainingArguments

    t = spec.training
    if t.zero_stage:
        single_process_launch()
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
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {"peak_cpu_memory_mb": rss / (2**20 if sys.platform == "darwin" else 2**10)}
    if torch.cuda.is_available():
        out["peak_gpu_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def prediction_trainer(model: Any, form: Formulation, tokenizer: Any, batch_size: int, tmp: Path) -> Any:
    """A Trainer used only to predict (eval jobs, teacher logits): batching, devices and gathering for free."""
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir=str(tmp / "trainer"), per_device_eval_batch_size=batch_size, report_to="none",
                             disable_tqdm=True, dataloader_pin_memory=_cuda(), use_cpu=not _cuda())
    return Trainer(model=model, args=args, processing_class=tokenizer, data_collator=form.collator(),
                   preprocess_logits_for_metrics=form.preprocess_logits)
