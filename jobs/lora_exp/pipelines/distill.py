"""The distill job: teacher logits (computed once per teacher and rows, shared by the students), a fresh
student, the KD loss, then the same training path as every method (``lora_exp.engine.fit``): this module
only builds the ``Prepared`` bundle (datasets carrying ``teacher_logits``, a ``KDStudent`` model) that path
consumes."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from filelock import FileLock

from lora_exp.config.loading import Run
from lora_exp.config.schema import RunSpec
from lora_exp.core import tags
from lora_exp.core.errors import SpecError, UserError
from lora_exp.core.layout import SPEC_FILE, artifact_run_dir
from lora_exp.engine.artifacts import load_trained, locate_artifact, read_spec
from lora_exp.engine.data import lineage, load_splits, subsample
from lora_exp.engine.fit import train_run
from lora_exp.engine.models import load_tokenizer
from lora_exp.engine.prepare import Prepared
from lora_exp.engine.students import KDStudent, build_student
from lora_exp.engine.trainer import prediction_trainer, seed_everything
from lora_exp.formulations import build_formulation
from lora_exp.formulations.classifier import Classifier
from lora_exp.methods import get_method
from lora_exp.tasks import ClassificationTask, Task, get_task
from lora_exp.tracking.server import run_tracking_uri

log = logging.getLogger(__name__)
TEACHER_CACHE_DIR = ".cache/teacher-logits"  # under <output_root>/<experiment>


def distill(run: Run) -> dict[str, float]:
    return train_run(run, prepare_distill)


def resolve_teacher(run: Run, tmp: Path) -> tuple[Path, str]:
    """The teacher's artifact dir and a label for tags (its MLflow run id when known)."""
    assert run.spec.distill is not None
    t = run.spec.distill.teacher
    model_path = t.model_path
    if t.run:  # a run of this experiment: say which one must finish first
        model_path = str(run.experiment_dir / t.run / "final")
        if not (Path(model_path) / SPEC_FILE).is_file():
            raise UserError(f"distill.teacher: no lora-exp artifact at {model_path}; train run {t.run!r} first")
    path = locate_artifact(model_path, t.mlflow_run_id, tmp, run_tracking_uri(run))
    if t.mlflow_run_id:
        return path, t.mlflow_run_id
    return path, artifact_run_dir(path).mlflow_run_id() or str(path)


def teacher_identity(run: Run, teacher_dir: Path) -> str:
    """What makes two teachers the same: an MLflow run id, or the artifact's place and files (a retrained
    teacher rewrites them, so its logits are computed afresh)."""
    assert run.spec.distill is not None
    if run.spec.distill.teacher.mlflow_run_id:
        return f"mlflow:{run.spec.distill.teacher.mlflow_run_id}"
    files = sorted((str(f.relative_to(teacher_dir)), f.stat().st_size, f.stat().st_mtime_ns)
                   for f in teacher_dir.rglob("*") if f.is_file())
    return json.dumps([str(teacher_dir.resolve()), files])


def teacher_logits(run: Run, teacher_dir: Path, teacher_spec: RunSpec, task: Task, train_raw: Any, tokenizer: Any,
                   tmp: Path) -> np.ndarray:
    """The teacher's per-label scores on the training rows, computed once per teacher and set of rows and
    shared by every student of the experiment (the repeats of a student see the same rows in another order:
    the cache holds them in a canonical order, keyed by the teacher and the teacher's own tokenized inputs)."""
    form = build_formulation(teacher_spec, task, tokenizer)
    inputs = form.tokenize(train_raw)
    encoded = [tuple(ids) for ids in inputs["input_ids"]]
    order = sorted(range(len(encoded)), key=encoded.__getitem__)  # canonical: row order[j] is the j-th
    digest = hashlib.sha256(teacher_identity(run, teacher_dir).encode())
    for i in order:
        digest.update(np.asarray(encoded[i], dtype=np.int64).tobytes() + b"|")
    cache = run.experiment_dir / TEACHER_CACHE_DIR / f"{digest.hexdigest()[:32]}.npy"
    cache.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache) + ".lock", timeout=24 * 3600):  # students starting together compute it once
        if cache.is_file():
            log.info("teacher logits from the shared cache %s", cache)
            canonical = np.load(cache)
        else:
            model, source = load_trained(teacher_spec, teacher_dir, form, tokenizer, task)
            log.info("computing teacher logits (%s) for %d rows into %s", source, len(train_raw), cache)
            trainer = prediction_trainer(model, form, tokenizer, teacher_spec.training, tmp)
            canonical = np.asarray(trainer.predict(inputs).predictions, dtype=np.float32)[order]
            if trainer.is_world_process_zero():
                partial = cache.with_name(cache.name + ".tmp.npy")
                np.save(partial, canonical)
                os.replace(partial, cache)
    rows: np.ndarray = np.empty_like(canonical)
    rows[order] = canonical
    return rows


def prepare_distill(run: Run) -> Prepared:
    """Data (checked first) -> teacher logits -> student; the same ``Prepared`` as ``engine.prepare``."""
    spec = run.spec
    d = spec.distill
    assert d is not None
    task = get_task(spec)
    if not isinstance(task, ClassificationTask):
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
    run_tags = {tags.KD: tags.kd_value(d.alpha > 0), tags.TEACHER_RUN_ID: teacher_id,
                tags.STUDENT: d.student.kind}
    return Prepared(task, tokenizer, form, get_method("full"), model, train_ds, form.tokenize(val_raw), evals_raw,
                    run_tags, lineage(spec, task, train_raw, val_raw, evals_raw))
