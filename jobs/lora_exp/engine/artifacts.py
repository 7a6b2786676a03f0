"""Model artifacts: the ``final/`` directory a train run leaves (adapter, head or full model, plus the spec
it was trained with), where to find one (a path or an MLflow run), and how to load the model it describes."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from lora_exp.config.fields import redact_uri
from lora_exp.config.loading import parse_run_spec
from lora_exp.config.schema import RunSpec
from lora_exp.core import tags
from lora_exp.core.errors import SpecError, TrackerUnavailable, UserError
from lora_exp.core.layout import SPEC_FILE
from lora_exp.engine.models import load_model, load_tokenizer
from lora_exp.formulations import Formulation, build_formulation
from lora_exp.methods import get_method
from lora_exp.tasks import Task, formulation_kind, get_task


def add_artifact_arguments(p: argparse.ArgumentParser, base_model: bool = False) -> None:
    """``--model-path | --mlflow-run-id`` (``| --model`` with ``base_model``) and ``--tracking-uri``: how a
    command names a lora-exp artifact (``locate_artifact``)."""
    src = p.add_mutually_exclusive_group(required=True)
    if base_model:
        src.add_argument("--model", help="a base model: hub id or local dir")
    src.add_argument("--model-path", help="a lora-exp artifact dir (e.g. outputs/<experiment>/<run>/final)")
    src.add_argument("--mlflow-run-id", help="the MLflow run whose 'model' artifact to use")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else ./mlflow.db)")


def read_spec(artifact: Path) -> RunSpec:
    """The spec a model artifact was trained with; a dir without one is not a lora-exp artifact."""
    path = artifact / SPEC_FILE
    if not path.is_file():
        raise UserError(f"{artifact}: not a lora-exp artifact (no {SPEC_FILE})")
    try:
        return parse_run_spec(yaml.safe_load(path.read_text())["spec"])
    except (ValidationError, SpecError, KeyError, TypeError, yaml.YAMLError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path}: the artifact's spec does not validate with this lora-exp version ({first})") \
            from None


def locate_artifact(model_path: str | None, mlflow_run_id: str | None, tmp: Path,
                    tracking_uri: str | None = None) -> Path:
    """A model artifact given as a local dir or as an MLflow run (its ``model`` artifact, fetched into ``tmp``)."""
    if model_path:
        artifact = Path(model_path)
    else:
        assert mlflow_run_id is not None
        artifact = download_model(mlflow_run_id, tmp, tracking_uri)
    read_spec(artifact)  # fail here, naming the dir, rather than deep inside model loading
    return artifact


def download_model(run_id: str, dest: Path, tracking_uri: str | None = None) -> Path:
    """Fetch the ``model`` artifact of an MLflow run (from ``tracking_uri``'s store, the run's own). A run or
    artifact that does not exist is the user's error; a server that does not answer is not (exit 75, retried)."""
    from mlflow.artifacts import download_artifacts
    from mlflow.exceptions import MlflowException

    where = redact_uri(tracking_uri) if tracking_uri else "the default tracking store"
    try:
        return Path(download_artifacts(run_id=run_id, artifact_path="model", dst_path=str(dest),
                                       tracking_uri=tracking_uri))
    except MlflowException as e:
        if getattr(e, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND") \
                or "does not exist" in str(e) or "not found" in str(e).lower():
            raise UserError(f"MLflow run {run_id!r} at {where} has no 'model' artifact ({_first(e)})") from None
        raise TrackerUnavailable(f"MLflow at {where}: cannot download run {run_id}'s model ({_first(e)})") from None
    except OSError as e:  # a file store's artifact missing on disk
        raise UserError(f"MLflow run {run_id!r} at {where}: its 'model' artifact is not readable ({e})") from None


def _first(e: BaseException) -> str:
    text = redact_uri(str(e).strip())
    return text.splitlines()[0][:300] if text else type(e).__name__


def load_trained(spec: RunSpec, artifact: Path | None, form: Formulation, tokenizer: Any, task: Task,
                 quantized: bool = True) -> tuple[Any, str]:
    """The base model (``artifact`` None: the baseline) or the trained model an artifact describes, and a
    label for logs and tags. ``quantized=False`` loads a QLoRA artifact's base unquantized (to merge into it)."""
    labels = getattr(task, "labels", ())

    def load_base(path: str | None, run_spec: RunSpec = spec, extra: dict[str, Any] | None = None) -> Any:
        return load_model(run_spec.model, form.model_class, tokenizer, labels, path=path, **(extra or {}))

    if artifact is None:
        return load_base(None), tags.BASELINE_SOURCE
    trained = read_spec(artifact)
    trained_kind = formulation_kind(trained, task)
    if trained_kind != form.kind:
        raise UserError(f"{artifact}: trained with formulation {trained_kind!r}, but this eval uses {form.kind!r}")
    trained_labels = getattr(get_task(trained), "labels", ())
    if trained_labels != labels:
        raise UserError(f"{artifact}: trained for labels {trained_labels}, evaluating {labels}")
    method = get_method(trained.method.name)
    extra = method.load_kwargs(trained) if quantized else {}
    model = method.load(lambda p: load_base(p, trained, extra), str(artifact))
    return model, f"{trained.method.name}:{artifact}"


def load_artifact(artifact: Path, trained: RunSpec, quantized: bool = True) -> tuple[Any, Any]:
    """(model, tokenizer) for a lora-exp artifact and the spec it was trained with."""
    tokenizer = load_tokenizer(trained.model)
    task = get_task(trained)
    form = build_formulation(trained, task, tokenizer)
    model, _ = load_trained(trained, artifact, form, tokenizer, task, quantized=quantized)
    return model, tokenizer


def artifact_size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20
