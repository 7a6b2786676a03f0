"""The Trainer set-up every job shares: TrainingArguments from the spec (precision, ZeRO, cadence, seed),
our callbacks, SIGTERM handling, and a predict-only Trainer for evaluation and teacher logits."""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer
from transformers.trainer_pt_utils import LengthGroupedSampler

from lora_exp.config.schema import RunSpec, TrainingSpec
from lora_exp.core.errors import UserError
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
    """The stock Trainer with a reproducible length-grouped sampler, the formulation's own forward where the
    plain one computes more than is scored (``form.scorer``), and padding-free training batches
    (``train_collator``; evaluation keeps padded batches, whose per-example outputs it gathers)."""

    def __init__(self, *args: Any, form: Formulation | None = None, train_collator: Any = None,
                 compile_blocks: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.form = form
        self.train_collator = train_collator
        self.compile_blocks = compile_blocks
        self.compiled = 0
        if self.args.bf16 and not self.is_deepspeed_enabled:  # DeepSpeed keeps its own bf16 copies
            n = precast_frozen_weights(self.model, torch.bfloat16)
            if n:
                log.info("bf16 autocast: %d frozen matmul weights stored in bf16 (cast once, not per call)", n)

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
        if dtype is None or self.is_deepspeed_enabled:
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


def precast_frozen_weights(model: Any, dtype: Any) -> int:
    """Store frozen matmul weights in the autocast dtype: the same numbers, without the cast per call.

    Under bf16 autocast every Linear casts its fp32 weight to bf16 on each call, and autocast caches casts
    only for weights that train; for LoRA and head-only runs, whose base is frozen, that is a copy of the
    whole model per forward (about a fifth of a CPU training step for SmolLM2). Casting once gives the
    matmuls bit-identical inputs. Only Linear/Conv1D weights: embeddings, norms and the residual stream keep
    their precision (a weight tied to an embedding is left alone), so nothing outside the matmuls changes.
    Returns the number of weights cast."""
    from transformers.pytorch_utils import Conv1D

    tied = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    cast = 0
    for module in model.modules():
        if not isinstance(module, (torch.nn.Linear, Conv1D)):
            continue
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad and param.dtype == torch.float32 and id(param) not in tied:
                param.data = param.data.to(dtype)
                cast += name == "weight"
    return cast


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


def ready_for_inference(trainer: Any) -> list[str]:
    """Before the final evaluation: the model as a plain forward. LoRA adapters are merged into the weights
    they adapt (PEFT's ``merge_and_unload``; not for 4-bit bases, whose re-quantization would change them),
    so evaluation runs the base model's operations alone; every weight is frozen and the matmul weights are
    stored in the autocast dtype (:func:`precast_frozen_weights`, bit-identical to autocast's own casts).
    On a GPU the forward of a batch is bound by the host's per-operation cost, which this roughly halves for
    LoRA. Eval jobs do the same, so a train run's final evaluation and an eval job of its artifact agree.
    Not under DeepSpeed (its weights are partitioned). Returns what was done."""
    if getattr(trainer, "is_deepspeed_enabled", False):
        return []
    done = []
    model = trainer.model
    if merge_lora(model):
        done.append("LoRA adapters merged")
    dtype = torch.bfloat16 if trainer.args.bf16 else torch.float16 if trainer.args.fp16 else None
    for param in model.parameters():
        param.requires_grad_(False)
    if dtype is not None and precast_frozen_weights(model, dtype):
        done.append(f"matmul weights stored in {str(dtype).removeprefix('torch.')}")
    return done


def merge_lora(model: Any) -> bool:
    """Merge a PEFT LoRA model's adapters into its (unquantized) base weights, in place."""
    try:
        from peft import PeftModel
        from peft.tuners.lora import LoraLayer, LoraModel
    except ImportError:
        return False
    if not isinstance(model, PeftModel) or not isinstance(model.base_model, LoraModel):
        return False
    if not any(isinstance(m, LoraLayer) for m in model.modules()):  # merged already
        return False
    base = model.base_model.model
    if getattr(base, "is_loaded_in_4bit", False) or getattr(base, "is_loaded_in_8bit", False):
        return False
    model.base_model.merge_and_unload()
    return True


def describe_parallelism(trainer: Any) -> None:
    state = trainer.accelerator.state
    plugin = getattr(state, "deepspeed_plugin", None)
    zero = f", DeepSpeed ZeRO stage {plugin.zero_stage}" if plugin is not None else ""
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


@contextlib.contextmanager
def fresh_process_state() -> Iterator[None]:
    """Leave the process as a fresh one would be for the next run: the environment as it was, and none of the
    process-wide state a run's Trainer leaves behind.

    Why: accelerate keeps the distributed type and the DeepSpeed plugin in process-wide singletons and sets
    ``ACCELERATE_USE_DEEPSPEED`` in the environment; transformers keeps the DeepSpeed config in a module
    global; ``single_process_launch`` writes a launcher's variables. After a ZeRO-3 run, the next run of the
    same ``lora-exp run`` loaded its model partitioned (zero-sized weights) and trained under DeepSpeed
    although its spec had no ZeRO (seed 001's glue.yaml: mrpc-full, then sst2-lora).
    """
    before = dict(os.environ)
    had_group = torch.distributed.is_available() and torch.distributed.is_initialized()
    reset_peak_rss()  # this run's peak memory is its own, not the largest earlier run's
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:
        yield
    finally:
        # Each step alone, and none may replace the run's own exception (its exit code drives the chart).
        for step in (lambda: _restore_environment(before), _forget_deepspeed_state,
                     lambda: _destroy_own_world(before, had_group)):
            try:
                step()
            except Exception as e:  # noqa: BLE001 - cleaning up after a run must not fail it
                log.warning("releasing the run's process state: %s", e)


def _restore_environment(before: dict[str, str]) -> None:
    """Only the variables the run changed: the others are never unset, even for a moment (threads of a
    launcher's process group may be reading the environment)."""
    for key in [k for k in os.environ if k not in before]:
        del os.environ[key]
    for key, value in before.items():
        if os.environ.get(key) != value:
            os.environ[key] = value


def _forget_deepspeed_state() -> None:
    import gc

    from accelerate.state import AcceleratorState, GradientState
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    gc.collect()


def _destroy_own_world(before: dict[str, str], had_group: bool) -> None:
    """The world of one a run made (``single_process_launch``), not a launcher's or the caller's; through
    DeepSpeed when it made it, which keeps references to its groups that a later ZeRO run would find stale."""
    if had_group or "WORLD_SIZE" in before or not torch.distributed.is_initialized():
        return
    ds = sys.modules.get("deepspeed.comm.comm")
    if ds is not None and ds.cdb is not None and ds.cdb.is_initialized():
        ds.destroy_process_group()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


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


def _status_mb(field: str) -> float | None:
    """A ``/proc/self/status`` memory field (VmRSS, VmHWM) in MiB; None where there is no procfs."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


class MemoryWatch:
    """The memory a run adds while it loads and trains, for the plan's estimate to be checked against.

    On Linux the peak resident set (VmHWM) is reset where the run starts (``/proc/self/clear_refs``), so
    an earlier run of the same process (``lora-exp run``, a sweep) does not hide this one's; the growth is
    the peak minus the resident set at the start. GPU: PyTorch's peak allocation, reset likewise."""

    def __init__(self) -> None:
        self.base = _status_mb("VmRSS")
        if not reset_peak_rss() and self.base is not None:
            log.info("peak resident set cannot be reset here: peak_memory_growth_mb is measured from the "
                         "process's lifetime peak (an earlier, larger run in this process would overstate it)")
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def metrics(self) -> dict[str, float]:
        """``peak_memory_growth_mb`` (CPU, where procfs has it) and ``peak_gpu_memory_mb`` since the start."""
        out = {}
        hwm = _status_mb("VmHWM")
        if self.base is not None and hwm is not None:
            out["peak_memory_growth_mb"] = hwm - self.base
        out.update({k: v for k, v in peak_memory().items() if k == "peak_gpu_memory_mb"})
        return out


def reset_peak_rss() -> bool:
    """Restart the peak resident set (VmHWM) from the current one (Linux); False where it cannot be."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_memory() -> dict[str, float]:
    """``peak_cpu_memory_mb``: the peak resident set since this run started (VmHWM, reset at each job's start by
    :func:`fresh_process_state`; elsewhere the process's lifetime peak, which in ``lora-exp run`` would give
    every run after the largest that run's figure); ``peak_gpu_memory_mb``: PyTorch's peak allocation."""
    hwm = _status_mb("VmHWM")
    rss = hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (
        2**20 if sys.platform == "darwin" else 2**10)
    out = {"peak_cpu_memory_mb": rss}
    if torch.cuda.is_available():
        out["peak_gpu_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
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
