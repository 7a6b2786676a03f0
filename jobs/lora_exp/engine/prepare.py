"""Everything a training run needs before its Trainer, in the order that fails cheapest first:
data (checked) -> tokenizer -> formulation -> model with its method."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from lora_exp.config.loading import Run
from lora_exp.engine.data import DataInput, lineage, load_splits, subsample
from lora_exp.engine.evaluation import import_reporting_libraries
from lora_exp.engine.models import load_model, load_tokenizer
from lora_exp.engine.trainer import seed_everything
from lora_exp.formulations import Formulation, build_formulation
from lora_exp.methods import Method, get_method
from lora_exp.tasks import Task, get_task

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    """A run ready to train: checked data, tokenizer, formulation, model with its method."""

    task: Task
    tokenizer: Any
    form: Formulation
    method: Method
    model: Any
    train_ds: Any
    val_ds: Any
    evals_raw: dict[str, Any]
    tags: dict[str, str] = field(default_factory=dict)  # extra MLflow tags (e.g. the distillation teacher)
    inputs: list[DataInput] = field(default_factory=list)  # the data sets used (MLflow dataset inputs)


def prepare(run: Run) -> Prepared:
    """Data first (a bad file fails before any model loads), then tokenizer, formulation, model + method."""
    spec = run.spec
    task = get_task(spec)
    train_raw, val_raw, evals_raw = subsample(spec, task, load_splits(spec, task))
    seed_everything(spec.training.seed)  # new heads and LoRA matrices initialise from this seed
    log.info("run %s: %s on %s, %d train / %d in-training eval rows", run.name, spec.method.name, task.name,
             len(train_raw), len(val_raw))
    tokenizer = load_tokenizer(spec.model)
    import_reporting_libraries()
    form = build_formulation(spec, task, tokenizer)
    method = get_method(spec.method.name)
    model = load_model(spec.model, form.model_class, tokenizer, getattr(task, "labels", ()),
                       **method.load_kwargs(spec))
    model = method.apply(model, spec, form.peft_task_type)
    train_ds = form.tokenize(train_raw)
    method.init_from_data(model, spec, _batches(train_ds, form, spec.training.per_device_train_batch_size))
    return Prepared(task, tokenizer, form, method, model, train_ds, form.tokenize(val_raw), evals_raw,
                    inputs=lineage(spec, task, train_raw, val_raw, evals_raw))


def _batches(dataset: Any, form: Formulation, size: int) -> Any:
    """The training set collated as evaluation collates it, in order (the same batches on every process)."""
    from torch.utils.data import DataLoader

    collate = form.collator()
    return DataLoader(dataset, batch_size=size, collate_fn=lambda rows: dict(collate(rows)))
