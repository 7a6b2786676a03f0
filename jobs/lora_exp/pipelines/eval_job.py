"""The eval job: the base model as is (the baseline), a trained artifact, or an MLflow run's model, on each
eval split, logged as its own MLflow run."""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path

from lora_exp.config.loading import Run
from lora_exp.core import tags
from lora_exp.core.errors import UserError
from lora_exp.core.layout import RUN_KEY_FILE, TRACKING_DIR, RunDir, write_json
from lora_exp.engine.artifacts import load_trained, locate_artifact
from lora_exp.engine.data import lineage, load_splits, subsample
from lora_exp.engine.evaluation import evaluate_splits, import_reporting_libraries
from lora_exp.engine.models import load_tokenizer
from lora_exp.engine.trainer import prediction_trainer
from lora_exp.formulations import build_formulation
from lora_exp.tasks import get_task
from lora_exp.tracking.runs import mlflow_run, upload_pending
from lora_exp.tracking.server import probe, run_tracking_uri

log = logging.getLogger(__name__)


def resolve_artifact(run: Run, tmp: Path) -> Path | None:
    """Where the model to evaluate lives: eval.model_path, eval.mlflow_run_id, this train run's own
    artifact, or None for the base model (the baseline)."""
    e = run.spec.eval
    if e.model_path or e.mlflow_run_id:
        return locate_artifact(e.model_path, e.mlflow_run_id, tmp, run_tracking_uri(run))
    if run.spec.job == tags.DISTILL:
        raise UserError(f"run {run.name}: a distill job evaluates its student itself; see {run.dir.eval_dir}")
    if run.spec.job == tags.TRAIN:
        own = run.dir.final
        if not own.is_dir():
            raise UserError(f"run {run.name}: no trained model at {own}; train it first (lora-exp train)")
        return own
    return None


def evaluate_run(run: Run) -> dict[str, float]:
    """Load data (checked first), the model, predict each eval split, log a new MLflow run.

    An eval job that finished is evaluated afresh (a new MLflow run) when asked again, unless its upload
    was left unfinished: then only that completes. An attempt stopped midway reattaches to its run."""
    state = RunDir(run.dir.eval_job_dir)
    if state.finished:
        if upload_pending(run, state):  # a retry after exit 75: finish the upload, evaluate nothing again
            return dict(json.loads(state.metrics.read_text()))
        clear_state(state)
    spec = run.spec
    probe(run_tracking_uri(run))
    task = get_task(spec)
    eval_spec = spec.model_copy(update={"job": tags.EVAL})
    _, _, evals_raw = subsample(eval_spec, task, load_splits(eval_spec, task))
    with tempfile.TemporaryDirectory(prefix="lora-exp-eval-") as tmp:
        artifact = resolve_artifact(run, Path(tmp))
        tokenizer = load_tokenizer(spec.model)
        import_reporting_libraries()
        form = build_formulation(spec, task, tokenizer)
        model, source = load_trained(spec, artifact, form, tokenizer, task)
        log.info("evaluating %s on %s (%s)", source, task.name, ", ".join(evals_raw))
        trainer = prediction_trainer(model, form, tokenizer, spec.training, Path(tmp))
        state.root.mkdir(parents=True, exist_ok=True)
        with mlflow_run(run, tags.EVAL, state_dir=state) as tracker:
            tracker.set_tags({tags.EVAL_SOURCE: source})
            tracker.log_inputs([i.as_record() for i in lineage(eval_spec, task, None, None, evals_raw)])
            metrics = evaluate_splits(trainer, form, evals_raw, state.root, tracker)
            write_json(state.metrics, metrics)
    return metrics


def clear_state(state: RunDir) -> None:
    """Forget a finished eval job's run, so that asking again evaluates afresh into a new MLflow run."""
    for path in (state.metrics, state.mlflow_state, state.root / RUN_KEY_FILE):
        path.unlink(missing_ok=True)
    shutil.rmtree(state.root / TRACKING_DIR, ignore_errors=True)
