"""``lora-exp export``: merge a LoRA/QLoRA adapter into its base and save a standalone model (safetensors).

The merged model loads with plain ``from_pretrained`` (no PEFT) and serves like any checkpoint; it carries
a ``lora_exp_run.yaml`` whose method is ``full``, so ``lora-exp eval`` reads it as a full model. A QLoRA
adapter is merged into the unquantized base: merging into 4-bit weights would round the update away.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import yaml

from lora_exp import errors
from lora_exp.spec import RunSpec

HELP = "merge a LoRA adapter into its base model and save a standalone model"
log = logging.getLogger(__name__)


def add_source_arguments(p: argparse.ArgumentParser) -> argparse._MutuallyExclusiveGroup:
    """--model-path | --mlflow-run-id: a lora-exp artifact (shared with `generate`)."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model-path", help="a lora-exp artifact dir (e.g. outputs/<experiment>/<run>/final)")
    src.add_argument("--mlflow-run-id", help="the MLflow run whose 'model' artifact to use")
    return src


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_source_arguments(p)
    p.add_argument("--out", required=True, help="directory for the merged model (must not exist)")
    p.add_argument("--log-mlflow", action="store_true",
                   help="also log the merged model as 'merged_model' in the source MLflow run")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else ./mlflow.db)")


def load_artifact(artifact: Path, trained: RunSpec, quantized: bool = True) -> tuple[Any, Any]:
    """(model, tokenizer) for a lora-exp artifact and the spec it was trained with.

    ``quantized=False`` loads a QLoRA adapter over the unquantized base, so that it can be merged.
    """
    from lora_exp.evaluate import load_for_eval
    from lora_exp.formulation import build_formulation
    from lora_exp.models import load_tokenizer
    from lora_exp.tasks import get_task

    tokenizer = load_tokenizer(trained.model)
    task = get_task(trained)
    form = build_formulation(trained, task, tokenizer)
    model, _ = load_for_eval(trained, artifact, form, tokenizer, task, quantized=quantized)
    return model, tokenizer


def main(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.exists():
        raise errors.UserError(f"--out {out}: already exists; choose a new directory")
    from lora_exp.tracking import SPEC_FILE, locate_artifact, read_spec

    with tempfile.TemporaryDirectory(prefix="lora-exp-export-") as tmp:
        artifact = locate_artifact(args.model_path, args.mlflow_run_id, Path(tmp))
        trained = read_spec(artifact)
        if trained.method.name not in ("lora", "qlora"):
            raise errors.UserError(f"{artifact}: method {trained.method.name!r} has no adapter to merge; "
                                   "the artifact is already standalone")
        model, tokenizer = load_artifact(artifact, trained, quantized=False)
        merged = model.merge_and_unload()
        staging = out.with_name(out.name + ".tmp")
        shutil.rmtree(staging, ignore_errors=True)
        merged.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        doc = yaml.safe_load((artifact / SPEC_FILE).read_text())
        doc["spec"]["method"] = {"name": "full"}
        doc["exported_from"] = {"method": trained.method.name, "model": trained.model.name}
        (staging / SPEC_FILE).write_text(yaml.safe_dump(doc, sort_keys=False))
        staging.rename(out)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 2**20
    log.info("merged %s adapter into %s: %s (%.1f MB)", trained.method.name, trained.model.name, out, size)
    if args.log_mlflow:
        _log_to_mlflow(args, out)
    return errors.OK


def _log_to_mlflow(args: argparse.Namespace, out: Path) -> None:
    import json

    from mlflow import MlflowClient

    from lora_exp.tracking import RUN_ID_FILE, resolve_tracking_uri

    run_id = args.mlflow_run_id
    if run_id is None:
        state = Path(args.model_path).parent / RUN_ID_FILE
        if not state.is_file():
            raise errors.UserError(f"--log-mlflow: no MLflow run recorded for {args.model_path} ({state} missing)")
        run_id = json.loads(state.read_text())["run_id"]
    MlflowClient(tracking_uri=resolve_tracking_uri(args.tracking_uri)).log_artifacts(run_id, str(out), "merged_model")
    log.info("logged the merged model to MLflow run %s as 'merged_model'", run_id)
