"""``lora-exp generate``: print continuations from a base model, or a base model plus a trained adapter
(seed 004's "problem 0": check that the libraries work and the model writes sensible text)."""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path
from typing import Any

from lora_exp.config.schema import ModelSpec
from lora_exp.core import errors
from lora_exp.engine.artifacts import add_artifact_arguments, load_artifact, locate_artifact, read_spec
from lora_exp.engine.models import load_model, load_tokenizer
from lora_exp.tasks import formulation_kind, get_task
from lora_exp.tracking.server import tracking_uri

HELP = "print samples from a base model or a base model plus an adapter"
log = logging.getLogger(__name__)
LM_FORMULATIONS = ("verbalizer", "causal_lm")  # the formulations whose model keeps its language-model head


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_artifact_arguments(p, base_model=True)
    p.add_argument("--prompt", action="append", required=True, help="a prompt (repeatable)")
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; > 0 samples")
    p.add_argument("--seed", type=int, default=0)


def load(args: argparse.Namespace) -> tuple[Any, Any, str]:
    """(model, tokenizer, description) for a base model or a trained artifact with a language-model head."""
    if args.model:
        spec = ModelSpec(name=args.model)
        tokenizer = load_tokenizer(spec)
        return load_model(spec, "AutoModelForCausalLM", tokenizer, ()), tokenizer, args.model
    with tempfile.TemporaryDirectory(prefix="lora-exp-generate-") as tmp:
        artifact = locate_artifact(args.model_path, args.mlflow_run_id, Path(tmp), tracking_uri(args.tracking_uri))
        trained = read_spec(artifact)
        kind = formulation_kind(trained, get_task(trained))
        if kind not in LM_FORMULATIONS:  # checked before any weights load
            raise errors.UserError(f"{artifact}: a {kind} model has no language-model head to generate with "
                                   "(train with formulation verbalizer or causal_lm)")
        model, tokenizer = load_artifact(artifact, trained)
        return model, tokenizer, f"{trained.model.name} + {trained.method.name} ({artifact})"


def main(args: argparse.Namespace) -> int:
    import torch

    torch.manual_seed(args.seed)
    model, tokenizer, source = load(args)
    model.eval()
    log.info("generating with %s", source)
    for prompt in args.prompt:
        enc = tokenizer(prompt, return_tensors="pt").to(model.device)
        sample = args.temperature > 0
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=args.max_new_tokens, do_sample=sample,
                                 temperature=args.temperature if sample else None, top_p=None, top_k=None,
                                 pad_token_id=tokenizer.pad_token_id)
        text = tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        print(f"--- prompt: {prompt!r}\n{prompt}{text}\n")
    return errors.OK
