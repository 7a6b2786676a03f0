"""``lora-exp export``: merge a LoRA/QLoRA adapter into its base and save a standalone model (safetensors).

The merged model loads with plain ``from_pretrained`` (no PEFT) and serves like any checkpoint; it carries
a ``lora_exp_run.yaml`` whose method is ``full``, so ``lora-exp eval`` reads it as a full model. A QLoRA
adapter is merged into the unquantized base: merging into 4-bit weights would round the update away.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

import yaml

from lora_exp.config.fields import registered_model_name_problem
from lora_exp.core import errors
from lora_exp.core.layout import SPEC_FILE, artifact_run_dir, published
from lora_exp.engine.artifacts import (
    add_artifact_arguments,
    artifact_size_mb,
    load_artifact,
    locate_artifact,
    read_spec,
)
from lora_exp.tracking.server import tracking_uri
from lora_exp.tracking.spool import register_version

HELP = "merge a LoRA adapter into its base model and save a standalone model"
log = logging.getLogger(__name__)
MERGEABLE = ("lora", "qlora")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_artifact_arguments(p)
    p.add_argument("--out", required=True, help="directory for the merged model (must not exist)")
    p.add_argument("--log-mlflow", action="store_true",
                   help="also log the merged model as 'merged_model' in the source MLflow run")
    p.add_argument("--register", metavar="NAME",
                   help="also register the logged merged model as a new version of model NAME in the MLflow "
                        "model registry, tagged with the source run's metrics (implies --log-mlflow)")


def main(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if args.register is not None:
        problem = registered_model_name_problem(args.register)
        if problem:
            raise errors.UserError(f"--register {args.register!r}: {problem}")
        args.log_mlflow = True
    if out.exists():
        raise errors.UserError(f"--out {out}: already exists; choose a new directory")
    uri = tracking_uri(args.tracking_uri)
    with tempfile.TemporaryDirectory(prefix="lora-exp-export-") as tmp:
        artifact = locate_artifact(args.model_path, args.mlflow_run_id, Path(tmp), uri)
        trained = read_spec(artifact)
        if trained.method.name not in MERGEABLE:
            raise errors.UserError(f"{artifact}: method {trained.method.name!r} has no adapter to merge; "
                                   "the artifact is already standalone")
        model, tokenizer = load_artifact(artifact, trained, quantized=False)
        merged = model.merge_and_unload()
        with published(out) as staging:
            merged.save_pretrained(staging, safe_serialization=True)
            tokenizer.save_pretrained(staging)
            doc = yaml.safe_load((artifact / SPEC_FILE).read_text())
            doc["spec"]["method"] = {"name": "full"}
            doc["exported_from"] = {"method": trained.method.name, "model": trained.model.name}
            (staging / SPEC_FILE).write_text(yaml.safe_dump(doc, sort_keys=False))
    log.info("merged %s adapter into %s: %s (%.1f MB)", trained.method.name, trained.model.name, out,
             artifact_size_mb(out))
    if args.log_mlflow:
        _log_to_mlflow(args, uri, out)
    return errors.OK


def _log_to_mlflow(args: argparse.Namespace, uri: str, out: Path) -> None:
    from mlflow import MlflowClient

    run_id = args.mlflow_run_id or artifact_run_dir(Path(args.model_path)).mlflow_run_id()
    if run_id is None:
        raise errors.UserError(f"--log-mlflow: no MLflow run recorded for {args.model_path}")
    client = MlflowClient(tracking_uri=uri)
    client.log_artifacts(run_id, str(out), "merged_model")
    log.info("logged the merged model to MLflow run %s as 'merged_model'", run_id)
    if args.register:
        register_version(client, args.register, run_id, "merged_model")
