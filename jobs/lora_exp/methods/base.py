"""What a method is: which parameters train, what the artifact keeps, and how to rebuild the model from it.

A method module defines its spec class (a :class:`~lora_exp.config.schema.MethodSpec` with
``name: Literal["<name>"]``), a :class:`Method` subclass, and calls :func:`register_method`. That one call
makes it known to the spec (the ``method`` union and the chart's schema), to every job (one training path),
to ``lora-exp sanity`` (:meth:`Method.trainable_rule`) and to ``lora-exp compare`` (``label``,
``report_order``). Nothing else changes to add a method.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar, cast

from lora_exp.core import registry
from lora_exp.core.errors import SpecError
from lora_exp.formulations import formulation_type
from lora_exp.tasks import get_task

if TYPE_CHECKING:
    from lora_exp.config.schema import MethodSpec, RunSpec

_M = TypeVar("_M", bound="Method")
LoadBase = Callable[[str | None], Any]  # load_base(None): the spec's base model; load_base(path): a saved one


@dataclass(frozen=True)
class TrainableRule:
    """Which parameters a method trains, by parameter name: ``required`` must all train, ``allowed`` may."""

    what: str
    required: Callable[[str], bool]
    allowed: Callable[[str], bool]


class Method:
    """Base of every method. Subclasses set the class attributes and implement ``apply``, ``save``, ``load``
    and ``trainable_rule``; the defaults below fit methods that load the base as it is."""

    name: ClassVar[str]
    spec: ClassVar[type[MethodSpec]]
    label: ClassVar[str]  # how reports name it (e.g. "LoRA")
    report_order: ClassVar[int] = 100  # position in the report's method comparisons (seed 003's order)
    needs_head: ClassVar[bool] = False  # trains a task head only: the formulation must have one
    packages: ClassVar[tuple[str, ...]] = ()  # optional packages it imports (checked before anything loads)
    # Trains under FSDP2 (training.sharding fsdp), as tests/test_sharding.py proves for it; the others are
    # refused: a method whose save under FSDP2 is untested could publish a wrong artifact, worse than a refusal.
    fsdp: ClassVar[bool] = False
    # Its artifact is an adapter PEFT can merge into the base (``lora-exp export``); others are standalone.
    mergeable: ClassVar[bool] = False

    def check_spec(self, spec: RunSpec) -> None:
        """Raise SpecError when the spec does not fit the method (called when specs are resolved)."""
        if spec.training.zero_stage and spec.training.sharding == "fsdp" and not self.fsdp:
            raise SpecError(f"training.sharding: fsdp does not shard {self.label} here (FSDP2 is tested for full "
                            "fine-tuning); use sharding zero")
        if self.needs_head:
            form = formulation_type(spec, get_task(spec))
            if not form.has_head:
                raise SpecError(f"method {self.name} trains a task head: formulation.kind {form.kind!r} has none")

    def check_model(self, spec: RunSpec, config: dict[str, Any]) -> None:
        """Raise SpecError when the model (its config.json, read before any weights) does not fit the method."""

    def load_kwargs(self, spec: RunSpec) -> dict[str, Any]:
        """Extra ``from_pretrained`` arguments for the base (e.g. QLoRA's 4-bit quantization config)."""
        return {}

    def apply(self, model: Any, spec: RunSpec, task_type: str) -> Any:
        """Freeze/wrap the base model so exactly the method's parameters train."""
        raise NotImplementedError

    def init_from_data(self, model: Any, spec: RunSpec, batches: Any) -> None:
        """Initialise what ``apply`` added from the training data (``batches``: the collated training set, in
        order), after ``apply`` and before training; a data-driven initialisation (EVA) does it, others do not."""

    def plan_model(self, model: Any, spec: RunSpec, task_type: str) -> Any:
        """``apply`` for the memory plan, on a model on the meta device (no weights: nothing to quantize)."""
        return self.apply(model, spec, task_type)

    def weight_bytes(self, model: Any, spec: RunSpec) -> float:
        """Bytes the model's weights take on the device while it trains (the plan's model, as ``plan_model``
        made it): each parameter in its dtype by default."""
        return float(sum(p.numel() * p.element_size() for p in model.parameters()))

    def optimizer(self, model: Any, optimizer_cls: Any, optimizer_kwargs: dict[str, Any], spec: RunSpec) -> Any:
        """The optimizer the method trains with, or None for the Trainer's own (``training``'s AdamW):
        ``optimizer_cls``/``optimizer_kwargs`` are what the Trainer would use (LoRA+ groups B apart)."""
        return None

    def save(self, trainer: Any, out_dir: str) -> None:
        """Write the run's artifact: only what the method trained (adapter, head, or the full model).
        Called on every rank: ``trainer.save_model`` gathers ZeRO-3 shards and writes on rank 0."""
        raise NotImplementedError

    def load(self, load_base: LoadBase, artifact_dir: str) -> Any:
        """Rebuild the trained model from the artifact."""
        raise NotImplementedError

    def trainable_rule(self, model: Any) -> TrainableRule:
        """Which of ``model``'s parameters must train and which may (``lora-exp sanity`` checks it)."""
        raise NotImplementedError(f"method {self.name!r} defines no trainable_rule")


def register_method(method: _M) -> _M:
    """Make ``method`` known by its name; its spec class must be named by it (``name: Literal[...]``)."""
    fields = method.spec.model_fields
    if "name" not in fields or fields["name"].annotation is str:
        raise TypeError(f"{method.spec.__name__}.name must be Literal[{method.name!r}]")
    registry.METHODS.register(method.name, method)
    return method


def get_method(name: str) -> Method:
    return cast(Method, registry.METHODS.get(name))


def method_names() -> list[str]:
    return registry.METHODS.names()


def count_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total
