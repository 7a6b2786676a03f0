"""``lora-exp export``: a trained adapter as something that serves, in one of three formats (``--format``):

- ``merged`` (default): the adapter merged into its base, a standalone model (safetensors) that loads with
  plain ``from_pretrained`` and carries a ``lora_exp_run.yaml`` whose method is ``full``, so ``lora-exp eval``
  reads it as a full model. A QLoRA adapter is merged into the unquantized base: merging into 4-bit weights
  would round the update away.
- ``gguf``: the same merged model as one GGUF file for llama.cpp (Llama and GPT-2 families; ``gguf_file``).
- ``adapter``: the LoRA adapter alone, as vLLM's LoRA loader takes it (``adapter_config.json`` naming its base,
  ``adapter_model.safetensors``): plain LoRA (no DoRA) of a causal LM (verbalizer, causal_lm), no task head.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

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
from lora_exp.methods import get_method
from lora_exp.pipelines.gguf_file import write_gguf
from lora_exp.tracking.server import tracking_uri
from lora_exp.tracking.spool import register_version

HELP = "a trained adapter as a standalone model (merged), a GGUF file for llama.cpp, or a vLLM-ready adapter"
FORMATS = ("merged", "gguf", "adapter")
log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_artifact_arguments(p)
    p.add_argument("--out", required=True, help="directory to write (must not exist)")
    p.add_argument("--format", choices=FORMATS, default="merged",
                   help="merged: a standalone safetensors model; gguf: one GGUF file for llama.cpp (model.gguf); "
                        "adapter: the adapter alone, as vLLM's LoRA loader takes it")
    p.add_argument("--gguf-dtype", choices=("f16", "f32"), default="f16", help="--format gguf: tensor precision")
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
        if not get_method(trained.method.name).mergeable:
            raise errors.UserError(f"{artifact}: method {trained.method.name!r} has no adapter to merge; "
                                   "the artifact is already standalone")
        if args.format == "adapter":
            export_adapter(artifact, trained, out)
        else:
            model, tokenizer = load_artifact(artifact, trained, quantized=False)
            merged = model.merge_and_unload()
            with published(out) as staging:
                doc = yaml.safe_load((artifact / SPEC_FILE).read_text())
                doc["spec"]["method"] = {"name": "full"}
                doc["exported_from"] = {"method": trained.method.name, "model": trained.model.name}
                (staging / SPEC_FILE).write_text(yaml.safe_dump(doc, sort_keys=False))
                if args.format == "gguf":
                    tokenizer.save_pretrained(Path(tmp) / "tokenizer")
                    write_gguf(merged, Path(tmp) / "tokenizer", staging / "model.gguf", args.gguf_dtype)
                else:
                    merged.save_pretrained(staging, safe_serialization=True)
                    tokenizer.save_pretrained(staging)
    log.info("exported the %s adapter of %s as %s: %s (%.1f MB)", trained.method.name, trained.model.name,
             args.format, out, artifact_size_mb(out))
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


def export_adapter(artifact: Path, trained: Any, out: Path) -> None:
    """The adapter files as vLLM loads them, refused where vLLM could not serve them."""
    import shutil

    config = json.loads((artifact / "adapter_config.json").read_text())
    problems = [why for bad, why in (
        (config.get("peft_type") != "LORA", f"it is {config.get('peft_type')}, not LoRA"),
        (bool(config.get("use_dora")), "it is DoRA, which vLLM does not serve"),
        (config.get("task_type") != "CAUSAL_LM", f"its task is {config.get('task_type')} (a task head): vLLM "
                                                 "serves causal LMs (formulation verbalizer or causal_lm)"),
        (bool(config.get("modules_to_save")), "it trains whole modules besides the adapter"),
    ) if bad]
    if problems:
        raise errors.UserError(f"--format adapter: {artifact} cannot be served as a vLLM LoRA adapter: "
                               + "; ".join(problems) + ". Use --format merged")
    config["base_model_name_or_path"] = trained.model.name
    with published(out) as staging:
        shutil.copy2(artifact / "adapter_model.safetensors", staging / "adapter_model.safetensors")
        (staging / "adapter_config.json").write_text(json.dumps(config, indent=2))
        shutil.copy2(artifact / SPEC_FILE, staging / SPEC_FILE)
