"""Peak memory of a run, estimated before anything loads: the plan behind ``lora-exp plan``.

Nothing is modelled that can be run instead. The run's model is built from its config on PyTorch's meta
device (shapes and dtypes, no weights, no memory: what accelerate's ``estimate-memory`` does) and the run's
method is applied to it, so the dtypes, the quantized weights and the trainable parameters are the run's
own. Then one training step runs on it, through the formulation's own loss at the run's full batch
(``per_device_train_batch_size`` rows of ``max_length`` tokens), backward (with gradient checkpointing's
recomputation when it is on) and an AdamW step, while :class:`LiveBytes` follows every tensor storage that
is alive: activations autograd keeps, transients, gradients and optimizer state. Its peak, plus the
weights, is the estimate; an evaluation forward at ``per_device_eval_batch_size`` is measured the same way.
Meta tensors cost nothing, so this takes about a second for a 1B model.

What no library gives, and is written here, is the rest of the arithmetic:

* ZeRO (not runnable on the meta device): gradients and optimizer state sharded over the run's GPUs
  (stage 2, 3) and the weights too (3), plus DeepSpeed's fp32 master copy; offload moves them to the host;
* GPU mixed precision: activations in 16 bits (the step runs in the autocast dtype), frozen matmul weights
  stored in bf16 as the trainer stores them (``precast_frozen_weights``); a fixed CUDA context;
* CPU: the checkpoint stays memory-mapped after loading, so where a method converts the weights (QLoRA)
  the mapped pages count besides the converted copies; and the resident set follows the live bytes as the
  process's C allocator keeps them (:data:`CPU_RESIDENT_FACTOR`, measured; lora_exp.core.allocator).
"""

from __future__ import annotations

import logging
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lora_exp.core.allocator import SYSTEM, TCMALLOC, in_use
from lora_exp.formulations import formulation_type
from lora_exp.methods import get_method
from lora_exp.planning.architectures import model_config
from lora_exp.tasks import get_task

if TYPE_CHECKING:
    from lora_exp.config.schema import RunSpec

log = logging.getLogger(__name__)

MB = 2**20
# A CPU training process's resident set over its live tensor bytes, by the process's C allocator (measured
# over the 12 runs of tests/test_memplan.py, three models x four methods; docs/planning.md). tcmalloc reuses
# freed spans: the resident set is the live bytes (0.9-1.04x, repeatable to a few MiB). glibc's heap grows
# past blocks it cannot reuse: 1.1-2.0x, varying between repetitions of the same run; 1.3 is its middle.
CPU_RESIDENT_FACTOR = {TCMALLOC: 1.0, SYSTEM: 1.3}
MASTER_BYTES = 4  # DeepSpeed's fp32 master copy of 16-bit trainable weights
# Fixed costs of a training process beyond its tensors (autograd and oneDNN workspaces, the data loader,
# the tracker's spool, library pages first touched), measured as the growth of a run of a model with next to
# no parameters at one row of 8 tokens: 120-129 MiB with either allocator.
CPU_RUNTIME_MB = 125.0
GPU_RUNTIME_MB = 400.0  # the CUDA context and cuBLAS/cuDNN workspaces, outside max_memory_allocated


@dataclass
class MemoryPlan:
    """A run's estimated peak memory per device, in MiB, and what it is made of."""

    device: str  # "gpu" or "cpu"
    breakdown: dict[str, float]  # weights ... runtime: weights + mapped + master + max(step, eval) + runtime
    peak_mb: float
    notes: list[str] = field(default_factory=list)
    trainable: int = 0  # parameters the method trains (as its ``apply`` made them on the meta device)

    def metrics(self) -> dict[str, float]:
        """As MLflow metrics: ``plan_peak_memory_mb`` and ``plan_<part>_mb``."""
        return {"plan_peak_memory_mb": self.peak_mb, **{f"plan_{k}_mb": v for k, v in self.breakdown.items()}}


class LiveBytes:
    """Bytes of tensor storage alive at each moment of what runs under it (``with LiveBytes() as live``), and the
    peak: every operator's outputs are counted when created and uncounted when their storage is freed (a
    ``TorchDispatchMode``; a storage's Python object lives exactly as long as the storage). Storages alive
    before (weights, buffers) are not counted. Run on the meta device, it times nothing and allocates nothing,
    and what it sees is what the same code keeps alive on a real device: activations autograd saves, the
    gradients, AdamW's state, and the transients of every operator, backward and recomputation included."""

    def __init__(self, exclude: list[Any]) -> None:
        self.live = self.peak = 0
        # Storages by their C++ address: known ones are skipped; an entry leaves when its storage is freed
        # (an address can be reused). The excluded (weights, buffers) stay, counted as 0.
        self._known: dict[int, int] = {t.untyped_storage()._cdata: 0 for t in exclude}

    def _free(self, key: int, n: int) -> None:
        self.live -= n
        self._known.pop(key, None)

    def track(self, t: Any) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self._known:
            return
        n = storage.nbytes()
        self._known[key] = n
        self.live += n
        if self.live > self.peak:
            self.peak = self.live
        weakref.finalize(storage, self._free, key, n).atexit = False

    def __enter__(self) -> LiveBytes:
        import torch
        from torch.utils._python_dispatch import TorchDispatchMode

        tracker = self

        cache = _MetaResults()

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
                out = cache.call(func, args, kwargs or {})
                if isinstance(out, torch.Tensor):
                    tracker.track(out)
                elif isinstance(out, (tuple, list)):
                    for t in out:
                        if isinstance(t, torch.Tensor):
                            tracker.track(t)
                return out

        self._mode = _Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._mode.__exit__(*exc)


class _MetaResults:
    """The shapes an operator returns on the meta device, remembered by its inputs' shapes, strides and dtypes.

    Why: PyTorch computes most meta outputs in Python (``torch._refs``/``_prims``), about 0.2 ms per
    operator, and a 36-layer model repeats the same few hundred calls per layer: ``plan`` took 11 s for
    values/mnli.yaml, mostly here. Only operators that neither mutate nor alias their inputs are
    remembered (their outputs are fresh storages, made again here with the same size), and only for plain
    meta tensors and hashable scalar arguments; anything else is computed as before.
    """

    def __init__(self) -> None:
        self._results: dict[Any, Any] = {}
        self._pure: dict[Any, bool] = {}

    def call(self, func: Any, args: Any, kwargs: dict[str, Any]) -> Any:
        key = self._key(func, args, kwargs)
        if key is None:
            return func(*args, **kwargs)
        spec = self._results.get(key)
        if spec is not None:
            return _build(spec)
        out = func(*args, **kwargs)
        spec = _spec(out)
        if spec is not None and _fresh(out, args, kwargs):
            self._results[key] = spec
        return out

    def _key(self, func: Any, args: Any, kwargs: dict[str, Any]) -> Any:
        pure = self._pure.get(func)
        if pure is None:
            schema = func._schema
            pure = self._pure[func] = not schema.is_mutable and all(r.alias_info is None for r in schema.returns)
        if not pure:
            return None
        try:
            return func, _freeze(args), _freeze(kwargs)
        except _Unhashable:
            return None


class _Unhashable(Exception):
    pass


_SCALARS = (int, float, bool, str, type(None))


def _freeze(x: Any) -> Any:
    import torch

    if isinstance(x, torch.Tensor):
        if type(x) not in (torch.Tensor, torch.nn.Parameter) or x.device.type != "meta":
            raise _Unhashable
        return "T", tuple(x.shape), x.stride(), x.dtype, x.storage_offset()
    if isinstance(x, (tuple, list)):
        return type(x).__name__, tuple(_freeze(v) for v in x)
    if isinstance(x, dict):
        return "D", tuple((k, _freeze(v)) for k, v in x.items())
    if isinstance(x, (*_SCALARS, torch.dtype, torch.device, torch.layout, torch.memory_format)):
        return type(x).__name__, x  # 1, 1.0 and True are equal keys otherwise, and type promotion tells them apart
    raise _Unhashable


def _spec(out: Any) -> Any:
    """What rebuilds ``out`` (None: not rebuildable): plain meta tensors that own exactly their storage."""
    import torch

    if isinstance(out, torch.Tensor):
        if type(out) is not torch.Tensor or out.device.type != "meta" or out.storage_offset() != 0:
            return None
        spec = (tuple(out.shape), out.stride(), out.dtype)
        return spec if _build(spec).untyped_storage().nbytes() == out.untyped_storage().nbytes() else None
    if isinstance(out, (tuple, list)) and out:
        parts = [None if o is None else _spec(o) for o in out]
        if any(p is None and o is not None for p, o in zip(parts, out, strict=True)):
            return None
        return type(out), parts
    return None


def _fresh(out: Any, args: Any, kwargs: dict[str, Any]) -> bool:
    """Every output owns a storage of its own: none is an input's, none is shared with another output (a
    rebuilt result would count such memory twice)."""
    import torch
    from torch.utils._pytree import tree_leaves

    def storages(x: Any) -> list[int]:
        return [t.untyped_storage()._cdata for t in tree_leaves(x) if isinstance(t, torch.Tensor)]

    made = storages(out)
    return len(set(made)) == len(made) and not set(made) & set(storages((args, kwargs)))


def _build(spec: Any) -> Any:
    import torch

    if isinstance(spec[0], type):
        kind, parts = spec
        return kind(None if p is None else _build(p) for p in parts)
    shape, stride, dtype = spec
    return torch.empty_strided(shape, stride, dtype=dtype, device="meta")


@dataclass
class StepPeaks:
    """Live bytes of one training step: at the peak of forward and backward, at the peak of the optimizer
    step, and what outlives the step (the optimizer state; zero_grad frees the gradients)."""

    forward_backward: float
    optimizer_step: float
    kept: float

    @property
    def steady(self) -> float:
        """The peak of every later step: the optimizer state made by the first step is alive during their
        forward and backward too."""
        return max(self.optimizer_step, self.forward_backward + self.kept)


def training_peak(model: Any, step: Callable[[], Any], optimizer: Any) -> StepPeaks:
    """One training step (forward, backward, optimizer step, zero_grad) under :class:`LiveBytes`."""
    with LiveBytes([*model.parameters(), *model.buffers()]) as live:
        loss = step()
        loss.backward()
        del loss
        forward_backward = live.peak
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return StepPeaks(float(forward_backward), float(live.peak), float(live.live))


def eval_peak(model: Any, step: Callable[[], Any]) -> LiveBytes:
    """One evaluation forward (no autograd: only transients) under :class:`LiveBytes`."""
    import torch

    model.eval()
    try:
        with torch.no_grad(), LiveBytes([*model.parameters(), *model.buffers()]) as live:
            step()
    finally:
        model.train()
    return live


def activation_dtype(spec: RunSpec, device: str) -> str:
    """The dtype the activations are kept in: 16-bit under mixed precision on GPU, else fp32 (the CPU runs
    fp32 unless it has bf16 units, and the plan cannot know the node's CPU: the larger figure)."""
    if device == "gpu" and spec.training.precision in ("auto", "fp16", "bf16"):
        return "bfloat16" if spec.training.precision in ("auto", "bf16") else "float16"
    return "float32"


FUSED_ATTENTION = "lora_exp_fused_attention_probe"


def register_fused_attention_probe() -> str:
    """An attention function with the memory of flash/memory-efficient attention, for the meta probe on GPU.

    On the meta device PyTorch's SDPA takes its math path, which keeps the (heads x length x length) score
    matrix that the fused GPU kernels (flash attention, SDPA's flash and memory-efficient backends) never
    materialise; they keep the output and a float32 log-sum-exp per query for backward. This registers (once,
    with transformers' AttentionInterface) a function whose autograd saves exactly that."""
    import torch
    from transformers import AttentionInterface

    class FusedAttentionMemory(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, q: Any, k: Any, v: Any) -> Any:  # (batch, heads, length, head_dim)
            out = torch.empty_like(q)
            lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
            ctx.save_for_backward(q, k, v, out, lse)
            return out

        @staticmethod
        def backward(ctx: Any, grad: Any) -> Any:
            q, k, v, _, _ = ctx.saved_tensors
            return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

    def attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, **kwargs: Any) -> Any:
        return FusedAttentionMemory.apply(query, key, value).transpose(1, 2).contiguous(), None

    AttentionInterface.register(FUSED_ATTENTION, attention)
    return FUSED_ATTENTION


def weights_dtype(spec: RunSpec, config: Any) -> str:
    """The dtype the base weights load in: the spec's, or for ``auto`` the checkpoint's (fp32 if unknown)."""
    if spec.model.dtype != "auto":
        return spec.model.dtype
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return str(dtype).removeprefix("torch.") if dtype else "float32"


def meta_model(spec: RunSpec, config: Any, dtype: str, train: bool = True, device: str = "cpu") -> Any:
    """The run's model as it trains (method applied), on the meta device: shapes and dtypes, no data. Its
    attention is what the run uses on ``device``: eager on CPU (``attn_implementation`` auto picks it there),
    and on GPU, unless eager is asked for, a fused kernel's footprint (:func:`fused_attention_probe`)."""
    import torch
    import transformers

    task = get_task(spec)
    form = formulation_type(spec, task)
    method = get_method(spec.method.name)
    cls = getattr(transformers, form.model_class)
    labels = getattr(task, "labels", ())
    kwargs: dict[str, Any] = {}
    if form.model_class == "AutoModelForSequenceClassification":
        config.num_labels = len(labels)
        config.pad_token_id = config.pad_token_id if config.pad_token_id is not None else 0
    wanted = spec.model.attn_implementation
    if device == "gpu" and wanted != "eager":
        config._attn_implementation = register_fused_attention_probe()
    else:
        config._attn_implementation = "eager" if wanted in ("auto", "eager") else "sdpa"
    with torch.device("meta"):
        model = cls.from_config(config, dtype=getattr(torch, dtype), trust_remote_code=spec.model.trust_remote_code,
                                **kwargs)
    if train:
        model = method.plan_model(model, spec, form.peft_task_type)
    model.train()
    return model, form, method


def step_peaks(spec: RunSpec, device: str, train: bool, model: Any, form: Any,
               length: int | None = None) -> tuple[float, StepPeaks]:
    """(evaluation peak, training-step peaks) in live bytes of ``model`` (the run's, on the meta device, built
    with ``form``): one evaluation forward and one training step, in the activation dtype of the run on
    ``device``.

    Autocast cannot run on meta tensors, so GPU mixed precision is probed with the whole model in 16 bits and
    corrected after: the trainable weights' gradients and AdamW moments are kept in their own dtype (fp32),
    and autocast caches a 16-bit copy of each trainable weight through forward and backward."""
    import torch

    t = spec.training
    trainable = [p for p in model.parameters() if p.requires_grad] if train else []
    real = float(sum(p.numel() * p.element_size() for p in trainable))
    act_dtype = getattr(torch, activation_dtype(spec, device))
    if device == "gpu" and act_dtype != torch.float32:
        model.to(act_dtype)
    probed = float(sum(p.numel() * p.element_size() for p in trainable))
    b, s = t.per_device_train_batch_size, length or spec.model.max_length
    ev = float(eval_peak(model, lambda: form.memory_probe(model, t.per_device_eval_batch_size, s)).peak)
    if not train:
        return ev, StepPeaks(0.0, 0.0, 0.0)
    if t.gradient_checkpointing:
        model.config.use_cache = False  # as the Trainer does; else transformers says so on every probe
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # foreach (multi-tensor) AdamW is PyTorch's default on GPU: its temporaries count there.
    opt = torch.optim.AdamW(trainable, foreach=device == "gpu")
    peaks = training_peak(model, lambda: form.memory_probe(model, b, s), opt)
    grads, moments, cache = real - probed, 2 * (real - probed), probed if real != probed else 0.0
    accumulated = real if t.gradient_accumulation_steps > 1 else 0.0  # gradients live across micro-batches
    return ev, StepPeaks(peaks.forward_backward + grads + cache + accumulated,
                         peaks.optimizer_step + grads + moments, peaks.kept + moments)


def estimate(spec: RunSpec, device: str = "cpu", gpus: int = 1, config: Any = None, train: bool = True,
             allocator: str | None = None, length: int | None = None) -> MemoryPlan:
    """The run's peak memory per device (``device``: "cpu" or "gpu"; ``gpus``: the GPUs sharing ZeRO state).
    ``train=False``: evaluation only (an eval job; a distillation's teacher pass), the base model as it loads.
    ``allocator`` (CPU): ``tcmalloc`` or ``system``; by default this process's (a run estimating itself);
    ``lora-exp plan`` passes what the CPU job image runs on. ``length``: the tokens of a batch's rows (default
    ``model.max_length``, the worst case a plan must size for; a run estimating itself passes its data's
    longest row, :func:`longest_row`, which is what its batches really reach).

    Leaves every random number generator as it found it: a train run estimates itself between seeding and
    training, and initialising the meta model draws from them, which would change the run's results."""
    import random

    import numpy as np
    import torch

    states = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            return _estimate(spec, device, gpus, config, train, allocator or in_use(), length)
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])


def longest_row(spec: RunSpec, train_ds: Any) -> int:
    """The longest training row in tokens, at most ``model.max_length``: the longest padded batch a run makes
    (packed batches: the batch's rows end to end, at most a batch of the longest rows)."""
    lengths = [len(ids) for ids in train_ds["input_ids"]] if train_ds is not None and len(train_ds) else []
    return min(max(lengths, default=spec.model.max_length), spec.model.max_length)


def _estimate(spec: RunSpec, device: str, gpus: int, config: Any, train: bool, allocator: str,
              length: int | None) -> MemoryPlan:
    import copy

    import torch

    notes: list[str] = []
    if config is None:
        config, where = model_config(spec.model)
        if where:
            notes.append(where)
    config = copy.deepcopy(config)
    t = spec.training
    model, form, method = meta_model(spec, config, weights_dtype(spec, config), train, device)
    sixteen = device == "gpu" and t.precision != "fp32"
    if sixteen and t.precision in ("auto", "bf16") and not t.zero_stage and train:
        from lora_exp.methods.weights import precast_frozen_weights

        precast_frozen_weights(model, torch.bfloat16)  # as the trainer stores them

    checkpoint = float(sum(p.numel() * p.element_size() for p in model.parameters()))
    weights = method.weight_bytes(model, spec) if train else checkpoint
    # On CPU the checkpoint stays memory-mapped after loading; where the method converted the weights
    # (QLoRA's 4-bit copies), the mapped pages it read count in the resident set besides the copies.
    mapped = checkpoint if device == "cpu" and weights < checkpoint else 0.0
    trainable = [p for p in model.parameters() if p.requires_grad] if train else []
    grads = float(sum(p.numel() * p.element_size() for p in trainable))
    optim = grads * 2  # AdamW: two moments per trainable parameter, in its dtype

    # The whole model is probed: shallow copies extrapolated by depth were tried and were wrong where the
    # phase holding the peak (start of backward: activations; its end: gradients) changes with depth.
    with warnings.catch_warnings():  # transformers' deprecation notes on checkpointing
        warnings.simplefilter("ignore", FutureWarning)
        ev, steps = step_peaks(spec, device, train, model, form, length)
    train_peak, kept = steps.steady, steps.kept
    activations = max(0.0, steps.forward_backward - grads) if train else 0.0
    # ZeRO and FSDP2 shard what the probe saw whole: gradients and optimizer state (stage 2, 3) and the weights
    # (3) over the run's processes; offload moves the optimizer state (and the weights) to host memory.
    master = 0.0
    if train and t.zero_stage:
        shards = max(1, gpus)
        numel = sum(p.numel() for p in trainable)
        probed = grads + optim
        # Both keep fp32 gradient partitions and fp32 moments whatever the model's dtype.
        grads, optim = numel * 4 / shards, numel * 8 / shards
        if t.sharding == "fsdp":
            # FSDP2 keeps each parameter sharded in fp32 (accelerate upcasts it under mixed precision: no
            # separate master copy) and gathers it in the compute dtype: a block at a time plus the prefetched
            # next one (stage 3), or every block from forward to backward (stage 2).
            total = float(sum(p.numel() for p in model.parameters()))
            layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None) or 1
            gathered = total * (2 if sixteen else 4) * (min(1.0, 2 / layers) if t.zero_stage == 3 else 1.0)
            weights = (0.0 if t.zero_offload else total * 4 / shards) + gathered
        else:
            # DeepSpeed holds 16-bit weights beside an fp32 master copy (sharded) of them.
            half = sixteen or any(p.element_size() < 4 for p in trainable)
            master = numel * MASTER_BYTES / shards if half else 0.0
            if sixteen:
                weights = float(sum(p.numel() for p in model.parameters())) * 2
            if t.zero_stage == 3:
                weights = 0.0 if t.zero_offload else weights / shards
        state = grads + optim
        if t.zero_offload:
            state, optim, master = grads, 0.0, 0.0
            notes.append("offload: optimizer state and master weights in host memory")
        train_peak = max(0.0, train_peak - probed) + state
        kept = optim
    if device == "cpu":  # the resident set as the allocator keeps the live bytes
        factor = CPU_RESIDENT_FACTOR[allocator]
        train_peak *= factor
        ev *= factor
        notes.append(f"CPU allocator {'tcmalloc' if allocator == TCMALLOC else 'glibc malloc'}: resident set "
                     f"{factor:g}x the live bytes" + ("" if allocator == TCMALLOC else " (varies ±30%)"))
    runtime = (CPU_RUNTIME_MB if device == "cpu" else GPU_RUNTIME_MB) * MB
    # In-training evaluation runs while the optimizer state is alive.
    peak = weights + mapped + master + max(train_peak, ev + kept) + runtime
    parts = {"weights": weights, "checkpoint_mapped": mapped, "gradients": grads, "optimizer": optim + master,
             "activations": activations, "training_step": train_peak, "eval": ev, "runtime": runtime}
    if t.gradient_checkpointing and train:
        notes.append("gradient checkpointing (layers recomputed in backward)")
    return MemoryPlan(device, {k: v / MB for k, v in parts.items()}, peak / MB, notes,
                      sum(p.numel() for p in model.parameters() if p.requires_grad))
