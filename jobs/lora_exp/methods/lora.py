"""LoRA through PEFT: low-rank adapters on the projections; the artifact is the adapter alone.

The variants the literature moved on to are fields of the same method, each one PEFT switch: DoRA
(``use_dora``), rsLoRA (``use_rslora``), PiSSA/OLoRA/orthogonal/gaussian initialisation (``init``), per-layer
ranks and alphas (``rank_pattern``, ``alpha_pattern``) and LoRA+ (``loraplus_lr_ratio``, PEFT's
``create_loraplus_optimizer``). QLoRA has them too (its spec extends :class:`LoraFields`)."""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, cast

from pydantic import Field

from lora_exp.config.schema import MethodSpec
from lora_exp.core.errors import SpecError
from lora_exp.methods.base import LoadBase, Method, TrainableRule, register_method

if TYPE_CHECKING:
    from lora_exp.config.schema import RunSpec

# Default targets: PEFT's "all-linear", every Linear/Conv1D layer of the model but its output layer (the LM head,
# a classification head): GPT-2's c_attn, c_proj, c_fc; Llama's q, k, v, o, gate, up, down projections; any
# other architecture's own layers, with no table here to keep up to date.
ALL_LINEAR = "all-linear"
# all-linear spares the LM head but not a task head (a classifier's score, QA's qa_outputs): PEFT trains those
# whole (modules_to_save), so they are kept out of the adapted layers.
TASK_HEADS = ["score", "classifier", "qa_outputs"]
# The Trainer also saves the tokenizer; the artifact reuses the base model's, so only the adapter is kept.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "chat_template.jinja", "training_args.bin")


class LoraFields(MethodSpec):
    """The adapter settings LoRA and QLoRA share."""

    r: int = Field(8, ge=1, description="Adapter rank: higher = more capacity, more memory.")
    alpha: int = Field(16, ge=1, description="Scaling numerator; the update is scaled by alpha/r.")
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] | None = Field(
        None,
        description="Module names to adapt. Default: every linear layer but the output layer (PEFT's "
        "'all-linear'): GPT-2 c_attn, c_proj, c_fc; Llama q, k, v, o, gate, up, down _proj; any architecture.",
    )
    use_dora: bool = Field(
        False, description="DoRA (Liu et al., 2024): each adapted weight split into a magnitude vector and a "
        "direction that LoRA updates; often better at low rank, each step slower.")
    use_rslora: bool = Field(
        False, description="rsLoRA (Kalajdzievski, 2023): scale the update by alpha/sqrt(r) instead of alpha/r, so "
        "that higher ranks keep learning.")
    init: Literal["default", "gaussian", "pissa", "olora", "orthogonal", "eva"] = Field(
        "default", description="How the adapter starts. default: B = 0 (the model unchanged at step 0); gaussian; "
        "pissa (Meng et al., 2024: the weight's principal singular directions, the base keeps the rest); olora "
        "(QR); orthogonal; eva (Paischer et al., 2024: A from the principal directions of each layer's inputs on "
        "the training data, ranks kept uniform). PiSSA and OLoRA change the base weights: the saved adapter is "
        "converted to load onto the original base.")
    rank_pattern: dict[str, int] = Field(
        default_factory=dict, description="Per-layer ranks by module name or regex, e.g. {'down_proj': 16}.")
    alpha_pattern: dict[str, int] = Field(
        default_factory=dict, description="Per-layer alphas by module name or regex.")
    loraplus_lr_ratio: float | None = Field(
        None, ge=1.0, description="LoRA+ (Hayou et al., 2024): B's learning rate this many times A's (the paper: "
        "16); training.learning_rate is A's.")


class LoraSpec(LoraFields):
    """LoRA adapters (PEFT) on the attention/MLP projections; the base stays frozen."""

    name: Literal["lora"]


# PiSSA and OLoRA move the weight's principal part into the adapter: the base is changed, and an adapter saved
# as trained only fits that changed base. PEFT converts it at save time against the adapter as initialised.
CONVERTED_INITS = ("pissa", "olora")
INITIAL_ADAPTER = "lora_exp_initial_adapter"  # attribute of the PeftModel: where its initial adapter is saved


def task_heads(model: Any) -> list[str] | None:
    """The task heads this model has (none for a causal LM: all-linear spares its LM head itself)."""
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    return [h for h in TASK_HEADS if h in names] or None


def targets(model: Any, modules: list[str] | None) -> dict[str, Any]:
    """``target_modules``/``exclude_modules`` for a PEFT config: the spec's modules, else all-linear without the
    task heads (PEFT trains those whole, as modules_to_save)."""
    if modules:
        return {"target_modules": list(modules)}
    return {"target_modules": ALL_LINEAR, "exclude_modules": task_heads(model)}


class Lora(Method):
    name: ClassVar[str] = "lora"
    spec: ClassVar[type[MethodSpec]] = LoraSpec
    label: ClassVar[str] = "LoRA"
    report_order: ClassVar[int] = 20
    mergeable: ClassVar[bool] = True

    def check_spec(self, spec: RunSpec) -> None:
        super().check_spec(spec)
        m = cast(LoraFields, spec.method)
        if m.init in CONVERTED_INITS and spec.training.zero_stage == 3:
            raise SpecError(f"method.init: {m.init} converts the adapter against the base's full weights at save, "
                            "which ZeRO-3 partitions; use init default or gaussian, or zero_stage 0/2")

    def apply(self, model: Any, spec: RunSpec, task_type: str) -> Any:
        return self._apply(model, spec, task_type, cast(LoraFields, spec.method).init)

    def plan_model(self, model: Any, spec: RunSpec, task_type: str) -> Any:
        # The same adapters; how they start costs no memory (and a meta model has no weights to decompose).
        return self._apply(model, spec, task_type, "default")

    def _apply(self, model: Any, spec: RunSpec, task_type: str, init: str) -> Any:
        from peft import EvaConfig, LoraConfig, get_peft_model

        m = cast(LoraFields, spec.method)
        model_type = model.config.model_type
        eva = {"eva_config": EvaConfig(rho=1.0, use_label_mask=False)} if init == "eva" else {}
        config = LoraConfig(
            task_type=task_type,
            r=m.r,
            lora_alpha=m.alpha,
            lora_dropout=m.dropout,
            **targets(model, m.target_modules),
            fan_in_fan_out=model_type == "gpt2",  # GPT-2 stores its projections as Conv1D (transposed)
            use_dora=m.use_dora,
            use_rslora=m.use_rslora,
            init_lora_weights=True if init == "default" else init,
            rank_pattern=dict(m.rank_pattern),
            alpha_pattern=dict(m.alpha_pattern),
            **eva,
        )
        try:
            peft_model = get_peft_model(model, config)
        except ValueError as e:  # e.g. a target module that does not exist in this model
            raise SpecError(f"method.target_modules: {e}") from None
        if init in CONVERTED_INITS:
            initial = tempfile.mkdtemp(prefix="lora-exp-initial-adapter-")
            atexit.register(shutil.rmtree, initial, ignore_errors=True)
            peft_model.save_pretrained(initial)
            setattr(peft_model, INITIAL_ADAPTER, initial)
        return peft_model

    def init_from_data(self, model: Any, spec: RunSpec, batches: Any) -> None:
        """EVA: each layer's A from an incremental SVD of its inputs over the training batches (every real token:
        the label mask is off, so a verbalizer's few answer tokens do not decide it); rho 1 keeps every layer at
        rank r, so the plan's count stays the run's. On a GPU where there is one: it is one pass of the data."""
        if cast(LoraFields, spec.method).init != "eva":
            return
        import os

        import torch
        from peft import initialize_lora_eva_weights

        if torch.cuda.is_available():
            model.to(torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))))
        initialize_lora_eva_weights(model, dataloader=batches, gather_distributed_inputs=False,
                                    show_progress_bar=False)

    def optimizer(self, model: Any, optimizer_cls: Any, optimizer_kwargs: dict[str, Any], spec: RunSpec) -> Any:
        m = cast(LoraFields, spec.method)
        if m.loraplus_lr_ratio is None:
            return None
        from peft.optimizers import create_loraplus_optimizer

        kwargs = {k: v for k, v in optimizer_kwargs.items() if k != "lr"}
        return create_loraplus_optimizer(model, optimizer_cls, lr=optimizer_kwargs["lr"],
                                         loraplus_lr_ratio=m.loraplus_lr_ratio,
                                         weight_decay=spec.training.weight_decay, **kwargs)

    def save(self, trainer: Any, out_dir: str) -> None:
        # For a PeftModel, save_model writes adapter_model.safetensors + adapter_config.json only (plus a
        # SEQ_CLS head, which is trained too); the frozen base weights are never copied.
        model = trainer.accelerator.unwrap_model(trainer.model)
        initial = getattr(model, INITIAL_ADAPTER, None)
        if initial is None:
            trainer.save_model(out_dir)
        elif trainer.is_world_process_zero():  # PiSSA/OLoRA: an adapter for the original base (rank 2r)
            model.save_pretrained(out_dir, path_initial_model_for_weight_conversion=initial)
        for name in TOKENIZER_FILES:
            (Path(out_dir) / name).unlink(missing_ok=True)

    def load(self, load_base: LoadBase, artifact_dir: str) -> Any:
        from peft import PeftModel

        return PeftModel.from_pretrained(load_base(None), artifact_dir)

    def trainable_rule(self, model: Any) -> TrainableRule:
        # PEFT keeps a task head (SEQ_CLS, QA) trainable as modules_to_save; the base weights stay frozen.
        head = any("modules_to_save" in n for n, _ in model.named_parameters())
        return TrainableRule("LoRA adapters" + (" and the task head" if head else ""), lambda n: "lora_" in n,
                             lambda n: "lora_" in n or "modules_to_save" in n)


register_method(Lora())
