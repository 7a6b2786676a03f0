"""The Trainer set-up every job shares: TrainingArguments from the spec (precision, ZeRO, cadence, seed),
our callbacks, SIGTERM handling, and a predict-only Trainer for evaluation and teacher logits."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer
from transformers.trainer_pt_utils import LengthGroupedSampler

from lora_exp.config.schema import RunSpec, TrainingSpec
from lora_exp.core.errors import UserError
from lora_exp.engine.callbacks import MlflowMetrics, Preemption, ProgressLogger
from lora_exp.engine.process import single_process_launch
from lora_exp.formulations import Formulation
from lora_exp.methods import get_method
from lora_exp.methods.weights import precast_frozen_weights
from lora_exp.tracking.spool import Tracker

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
    """The stock Trainer with a reproducible length-grouped sampler, the formulation's own forward where the
    plain one computes more than is scored (``form.scorer``), and padding-free training batches
    (``train_collator``; evaluation keeps padded batches, whose per-example outputs it gathers)."""

    def __init__(self, *args: Any, form: Formulation | None = None, train_collator: Any = None,
                 compile_blocks: bool = False, make_optimizer: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.form = form
        self.train_collator = train_collator
        self.compile_blocks = compile_blocks
        self.make_optimizer = make_optimizer  # (model, optimizer class, its kwargs) -> an optimizer, or None
        self.compiled = 0
        if form is not None and not form.loss_counts_items:
            # transformers infers this from the forward's **kwargs; a classification head takes them and ignores
            # the count, and its loss came out multiplied by the process count (and by the accumulation steps).
            self.model_accepts_loss_kwargs = False
        if self.args.bf16 and not self.sharded:  # DeepSpeed and FSDP keep their own copies
            n = precast_frozen_weights(self.model, torch.bfloat16)
            if n:
                log.info("bf16 autocast: %d frozen matmul weights stored in bf16 (cast once, not per call)", n)

    @property
    def sharded(self) -> bool:
        """DeepSpeed or FSDP holds the weights (partitioned, in its own dtypes): nothing may recast them."""
        return bool(self.is_deepspeed_enabled or self.is_fsdp_enabled)

    def create_accelerator_and_postprocess(self) -> None:
        """accelerate turns FSDP on only for accelerator devices; on CPU processes (gloo) it silently falls
        back to DDP. PyTorch's FSDP2 runs there as it does on GPUs, so a CPU world gets it as asked (what the
        tests, and a CPU pod, run): the same plugin, set on the shared state as accelerate would set it."""
        super().create_accelerator_and_postprocess()
        from accelerate.state import PartialState
        from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

        state = self.accelerator.state
        if self.args.fsdp_plugin_args is None or state.distributed_type != DistributedType.MULTI_CPU:
            return
        plugin = FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args)
        if state.mixed_precision != "no":
            plugin.set_mixed_precision(state.mixed_precision)
        state.distributed_type, state.fsdp_plugin = DistributedType.FSDP, plugin
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # as accelerate does: both states
        self.is_fsdp_enabled = True

    def create_optimizer(self, model: Any = None) -> Any:
        """The method's own optimizer where it has one (LoRA+), else the Trainer's."""
        current: Any = self.optimizer  # type: ignore[has-type]
        if current is None and self.make_optimizer is not None:
            cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(self.args, self.model)
            current = self.optimizer = self.make_optimizer(self.model, cls, kwargs)
        if current is None:
            return super().create_optimizer(model)
        return current

    def train(self, *args: Any, **kwargs: Any) -> Any:
        if self.compile_blocks and not self.compiled:
            self.compiled = compile_repeated_blocks(self.model)
            log.info("torch.compile: %d repeated blocks compiled in place (regional compilation; the first steps "
                     "include the compile)", self.compiled)
        return super().train(*args, **kwargs)

    def evaluation_loop(self, *args: Any, **kwargs: Any) -> Any:
        """Evaluation runs the blocks eagerly: the compiled training graphs do not fit evaluation (no autograd,
        no dropout), and compiling again would cost more than a short evaluation takes."""
        if not self.compiled:
            return super().evaluation_loop(*args, **kwargs)
        with torch.compiler.set_stance("force_eager"):
            return super().evaluation_loop(*args, **kwargs)

    def autocast_smart_context_manager(self, cache_enabled: bool | None = True) -> Any:
        """The run's mixed precision around every forward this Trainer runs. transformers 5 returns a null
        context here and relies on accelerate, which autocasts ``model.forward`` only once ``train`` or
        ``predict`` has prepared the model: a forward before that (sanity's gradient check) or through the
        unwrapped model (causal_lm's generation samples) would run without autocast, where the frozen
        weights stored in bf16 (``precast_frozen_weights``) need it. DeepSpeed manages its own dtypes."""
        dtype = torch.bfloat16 if self.args.bf16 else torch.float16 if self.args.fp16 else None
        if dtype is None or self.sharded:
            return contextlib.nullcontext()
        return torch.autocast(self.args.device.type, dtype=dtype, cache_enabled=cache_enabled)

    def _get_eval_sampler(self, eval_dataset: Any) -> Any:
        """Evaluation in the dataset's order. transformers 5 length-groups evaluation batches whenever training
        does, so predictions come back shuffled against the rows they belong to (metrics survive, as the
        labels travel along; a predictions file does not). Callers that want length order sort the rows
        themselves and restore the order (``predict_by_length``)."""
        from torch.utils.data import SequentialSampler

        if eval_dataset is None or self.args.world_size > 1:
            return None  # distributed: accelerate shards the dataset in order
        return SequentialSampler(eval_dataset)

    def get_train_dataloader(self) -> Any:
        if self.train_collator is None:
            return super().get_train_dataloader()
        padded: Any = self.data_collator  # type: ignore[has-type]
        self.data_collator = self.train_collator
        try:
            return super().get_train_dataloader()
        finally:
            self.data_collator = padded

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        with self.autocast_smart_context_manager():
            return self._compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def _compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool,
                      num_items_in_batch: Any) -> Any:
        packed = "position_ids" in inputs and "attention_mask" not in inputs
        scorer = self.form.scorer(packed) if self.form is not None else None
        if scorer is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        # What the stock compute_loss does around the model's loss: num_items_in_batch reaches the loss only
        # for models that take loss kwargs, and a loss so normalised is scaled back up by the process count.
        items = num_items_in_batch if self.model_accepts_loss_kwargs else None
        loss, scores = scorer(model, inputs, items)
        if self.args.average_tokens_across_devices and self.model_accepts_loss_kwargs and items is not None:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        return (loss, {"logits": scores}) if return_outputs else loss

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
        form=form,
        train_collator=form.packing_collator() if spec.training.packing else None,
        compile_blocks=spec.training.torch_compile,
        make_optimizer=lambda m, cls, kw: get_method(spec.method.name).optimizer(m, cls, kw, spec),
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


def repeated_blocks(model: Any) -> list[Any]:
    """The model's repeated blocks: the children of each ``ModuleList`` whose members are all of one class
    (the transformer's layers: ``model.layers`` in Llama, ``transformer.h`` in GPT-2), outermost lists only."""
    blocks: list[Any] = []
    inside: set[int] = set()
    for module in model.modules():
        if id(module) in inside or not isinstance(module, torch.nn.ModuleList) or len(module) < 2:
            continue
        if len({type(child) for child in module}) == 1:
            blocks.extend(module)
            inside.update(id(m) for child in module for m in child.modules())
    return blocks


def compile_repeated_blocks(model: Any) -> int:
    """Compile each repeated block in place (``nn.Module.compile``): the blocks share one code object, so
    Dynamo compiles one block and reuses the result for the others (seconds, not the minutes a whole model
    takes), and the model's parameter names and state dict stay as they are (checkpoints, adapters, PEFT).
    Shapes are dynamic from the start: padded batches change length at every step. Returns the count."""
    import torch._dynamo

    blocks = repeated_blocks(model)
    for name in ("cache_size_limit", "recompile_limit"):  # one entry per block instance may be kept
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 8 * len(blocks)))
    for block in blocks:
        block.compile(dynamic=True)
    return len(blocks)


def describe_parallelism(trainer: Any) -> None:
    state = trainer.accelerator.state
    plugin = getattr(state, "deepspeed_plugin", None)
    zero = f", DeepSpeed ZeRO stage {plugin.zero_stage}" if plugin is not None else ""
    fsdp = getattr(state, "fsdp_plugin", None)
    if fsdp is not None:
        from torch.distributed.fsdp import CPUOffloadPolicy

        offload = isinstance(fsdp.cpu_offload, CPUOffloadPolicy)
        zero = (f", FSDP{fsdp.fsdp_version} {'full shard' if fsdp.reshard_after_forward else 'shard grad op'}"
                f"{' with CPU offload' if offload else ''}")
    log.info("processes: %d (%s, backend %s)%s", state.num_processes, state.distributed_type.value,
             state.backend, zero)


def _cuda() -> bool:
    return torch.cuda.is_available()


def check_accelerator(spec: RunSpec) -> None:
    """GPU-only kernels asked for where there is no CUDA GPU: stop before any model loads (exit 2)."""
    if _cuda():
        return
    wants = [f for f, on in (("training.liger_kernels", spec.training.liger_kernels is True),
                             (f"model.attn_implementation {spec.model.attn_implementation}",
                              spec.model.attn_implementation.startswith("flash"))) if on]
    if wants:
        raise UserError(f"{', '.join(wants)}: needs a CUDA GPU and this machine has none; turn it off (or use "
                        "attn_implementation auto) to run here")


def cpu_bf16() -> bool:
    """The CPU has bf16 matrix instructions (AMX or AVX512-BF16), which oneDNN uses under bf16 autocast."""
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_precision(precision: str) -> str:
    if not _cuda():
        if precision == "auto":
            return "bf16" if cpu_bf16() else "fp32"
        if precision == "fp16" or (precision == "bf16" and not cpu_bf16()):
            log.warning("training.precision %s needs a GPU or a CPU with bf16 units; running fp32", precision)
            return "fp32"
        return precision
    if precision == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return precision


def fsdp_config(t: TrainingSpec) -> dict[str, Any] | None:
    """FSDP2 settings for the Trainer's accelerate integration: the stage says whether parameters reshard after
    forward; each of the model's repeated blocks (its ``_no_split_modules``) is one shard unit; the full state
    dict is saved, so the artifact is one model as with ZeRO-3. Gradient checkpointing is FSDP's own."""
    if not t.zero_stage or t.sharding != "fsdp":
        return None
    return {"version": 2, "reshard_after_forward": t.zero_stage == 3, "cpu_offload": t.zero_offload,
            "state_dict_type": "FULL_STATE_DICT", "activation_checkpointing": t.gradient_checkpointing}


def deepspeed_config(t: TrainingSpec) -> dict[str, Any] | None:
    """ZeRO settings for the Trainer's DeepSpeed integration; "auto" lets the Trainer fill in the rest."""
    if not t.zero_stage or t.sharding != "zero":
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
    if t.zero_stage:
        single_process_launch()
    precision = resolve_precision(t.precision)
    fsdp = fsdp_config(t)
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
        activation_checkpointing=t.gradient_checkpointing and not fsdp,
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
        fsdp=fsdp is not None,
        fsdp_config=fsdp,
        dataloader_num_workers=0,
        use_liger_kernel=t.liger_kernels,
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


def prediction_trainer(model: Any, form: Formulation, tokenizer: Any, training: TrainingSpec, tmp: Path) -> Any:
    """A Trainer used only to predict (eval jobs, teacher logits): batching, devices and gathering for free;
    the run's precision (autocast), so an eval job scores as the training run's final evaluation did."""
    from transformers import TrainingArguments

    precision = resolve_precision(training.precision)
    args = TrainingArguments(
        output_dir=str(tmp / "trainer"), per_device_eval_batch_size=training.per_device_eval_batch_size,
        report_to="none", disable_tqdm=True, dataloader_pin_memory=_cuda(), use_cpu=not _cuda(),
        bf16=precision == "bf16", fp16=precision == "fp16",
    )
    return LoraExpTrainer(form=form, model=model, args=args, processing_class=tokenizer,
                          data_collator=form.collator(), preprocess_logits_for_metrics=form.preprocess_logits)
