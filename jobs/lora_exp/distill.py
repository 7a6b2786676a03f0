"""The distill job's preparation: teacher logits (computed once, cached), a fresh student, the KD loss.

Training itself is ``lora_exp.train.train``, the same path as every method: this module only builds the
``Prepared`` bundle (datasets carrying ``teacher_logits``, a ``KDStudent`` model) that path consumes.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from lora_exp.errors import SpecError, UserError
from lora_exp.spec import Run, RunSpec

log = logging.getLogger(__name__)
TEACHER_CACHE = "teacher_logits.npy"


def resolve_teacher(run: Run, tmp: Path) -> tuple[Path, str]:
    """The teacher's artifact dir and a label for tags (its MLflow run id when known)."""
    from lora_exp.tracking import RUN_ID_FILE, SPEC_FILE, locate_artifact
    from lora_exp.train import FINAL_DIR

    t = run.spec.distill.teacher
    model_path = t.model_path
    if t.run:  # a run of this experiment: say which one must finish first
        model_path = str(run.output_dir.parent / t.run / FINAL_DIR)
        if not (Path(model_path) / SPEC_FILE).is_file():
            raise UserError(f"distill.teacher: no lora-exp artifact at {model_path}; train run {t.run!r} first")
    path = locate_artifact(model_path, t.mlflow_run_id, tmp)
    state = path.parent / RUN_ID_FILE
    if t.mlflow_run_id:
        return path, t.mlflow_run_id
    return path, json.loads(state.read_text())["run_id"] if state.is_file() else str(path)


def teacher_logits(run: Run, teacher_dir: Path, teacher_spec: RunSpec, task: Any, train_raw: Any, tokenizer: Any,
                   tmp: Path) -> np.ndarray:
    """The teacher's per-label scores on the training rows, cached in the run's output dir."""
    from lora_exp.evaluate import load_for_eval, prediction_trainer
    from lora_exp.formulation import build_formulation

    cache = run.output_dir / TEACHER_CACHE
    if cache.is_file():
        cached = np.load(cache)
        if len(cached) == len(train_raw):
            log.info("teacher logits from cache %s", cache)
            return cached
    form = build_formulation(teacher_spec, task, tokenizer)
    model, source = load_for_eval(teacher_spec, teacher_dir, form, tokenizer, task)
    log.info("computing teacher logits (%s) for %d rows", source, len(train_raw))
    trainer = prediction_trainer(model, form, tokenizer, run.spec.training.per_device_eval_batch_size, tmp)
    scores = np.asarray(trainer.predict(form.tokenize(train_raw)).predictions, dtype=np.float32)
    if trainer.is_world_process_zero():
        run.output_dir.mkdir(parents=True, exist_ok=True)
        np.save(cache, scores)
    return scores


def prepare_distill(run: Run):
    """Data (checked first) -> teacher logits -> student; returns the same ``Prepared`` as ``train.prepare``."""
    from lora_exp.data import load_splits, subsample
    from lora_exp.formulation import Classifier
    from lora_exp.methods import full
    from lora_exp.models import load_tokenizer
    from lora_exp.students import KDStudent, build_student
    from lora_exp.tasks import get_task
    from lora_exp.tracking import read_spec
    from lora_exp.train import Prepared, seed_everything

    spec = run.spec
    d = spec.distill
    task = get_task(spec)
    if task.kind != "classification":
        raise SpecError(f"job distill: task {task.name!r} is not a classification task")
    train_raw, val_raw, evals_raw = subsample(spec, task, load_splits(spec, task))
    with tempfile.TemporaryDirectory(prefix="lora-exp-teacher-") as tmp:
        teacher_dir, teacher_id = resolve_teacher(run, Path(tmp))
        teacher_spec = read_spec(teacher_dir)
        tokenizer = load_tokenizer(teacher_spec.model)  # the student reads the teacher's tokens
        form = Classifier(task, tokenizer, spec.formulation.template or task.template, spec.model.max_length)
        train_ds = form.tokenize(train_raw)
        if d.alpha > 0:
            logits = teacher_logits(run, teacher_dir, teacher_spec, task, train_raw, tokenizer, Path(tmp))
            train_ds = train_ds.add_column("teacher_logits", logits.tolist())
    seed_everything(spec.training.seed)  # the student initialises from the run's seed
    student = build_student(spec, len(tokenizer), task.num_labels, tokenizer.pad_token_id)
    model = KDStudent(student, d.alpha, d.temperature)
    tags = {"kd": str(d.alpha > 0).lower(), "distill.teacher_run_id": teacher_id,
            "distill.student": d.student.kind}
    return Prepared(task, tokenizer, form, full, model, train_ds, form.tokenize(val_raw), evals_raw, tags)
