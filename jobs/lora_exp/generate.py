"""``lora-exp generate``: print continuations from a base model, or a base model plus a trained adapter
(seed 004's "problem 0": check that the libraries work and the model writes sensible text)."""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

from lora_exp import errors

HELP = "print samples from a base model or a base model plus an adapter"
log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from lora_exp.export import add_source_arguments

    add_source_arguments(p).add_argument("--model", help="a base model: hub id or local dir")
    p.add_argument("--prompt", action="append", required=True, help="a prompt (repeatable)")
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; > 0 samples")
    p.add_argument("--seed", type=int, default=0)


def main(args: argparse.Namespace) -> int:
    import torch

    from lora_exp.evaluate import build_kind
    from lora_exp.export import load_artifact
    from lora_exp.models import load_model, load_tokenizer
    from lora_exp.spec import ModelSpec
    from lora_exp.tasks import get_task
    from lora_exp.tracking import locate_artifact, read_spec

    torch.manual_seed(args.seed)
    with tempfile.TemporaryDirectory(prefix="lora-exp-generate-") as tmp:
        if args.model:
            spec = ModelSpec(name=args.model)
            tokenizer = load_tokenizer(spec)
            model = load_model(spec, "AutoModelForCausalLM", tokenizer, ())
            source = args.model
        else:
            artifact = locate_artifact(args.model_path, args.mlflow_run_id, Path(tmp))
            trained = read_spec(artifact)
            kind = build_kind(trained, get_task(trained))
            if kind not in ("verbalizer", "causal_lm"):  # checked before any weights load
                raise errors.UserError(f"{artifact}: a {kind} model has no language-model head to generate with "
                                       "(train with formulation verbalizer or causal_lm)")
            model, tokenizer = load_artifact(artifact, trained)
            source = f"{trained.model.name} + {trained.method.name} ({artifact})"
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
