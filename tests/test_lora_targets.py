"""LoRA's default targets come from PEFT ("all-linear": every linear layer but the output layer), not from a
table per architecture: GPT-2 and Llama get exactly the projections the table named, and an architecture the
table never knew (OPT) trains too, where it used to be refused."""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors import safe_open

from lora_exp.config.loading import resolve_runs
from lora_exp.engine.fit import train_run
from support import experiment, toy_rows, write_jsonl, write_values

FORMER_TABLE = {"gpt2": {"c_attn", "c_proj", "c_fc"},
                "llama": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}}


def tiny_opt(tok_dir: Path, out: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, OPTConfig, OPTForCausalLM

    tok = AutoTokenizer.from_pretrained(tok_dir)
    torch.manual_seed(0)
    OPTForCausalLM(OPTConfig(vocab_size=len(tok), hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                             num_attention_heads=2, word_embed_proj_dim=32, max_position_embeddings=128,
                             pad_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id,
                             eos_token_id=tok.eos_token_id)).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def adapted(artifact: Path) -> set[str]:
    with safe_open(str(artifact / "adapter_model.safetensors"), "pt") as f:
        names = list(f.keys())  # noqa: SIM118 - a safetensors file is not iterable
    return {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in names if ".lora_" in k}


@pytest.mark.parametrize(("arch", "formulation"), [("tiny_gpt2", "classifier"), ("tiny_llama", "verbalizer"),
                                                   ("opt", "verbalizer")])
def test_default_targets_are_every_linear_layer_of_any_architecture(arch, formulation, request, tiny_tokenizer_dir,
                                                                    tmp_path):
    model = (tiny_opt(tiny_tokenizer_dir, tmp_path / "opt") if arch == "opt" else request.getfixturevalue(arch))
    data = {"train": str(write_jsonl(tmp_path / "train.jsonl", toy_rows(16, seed=1))),
            "validation": str(write_jsonl(tmp_path / "val.jsonl", toy_rows(8, seed=2)))}
    doc = experiment(model, data, tmp_path, formulation={"kind": formulation, "template": "Text: {text}"},
                     training={"max_steps": 2, "eval_strategy": "no", "save_strategy": "no"})
    (run,) = resolve_runs(write_values(tmp_path, doc), None, {})
    metrics = train_run(run)
    assert 0.0 <= metrics["validation_accuracy"] <= 1.0
    got = adapted(run.dir.final)
    if arch == "opt":
        assert got == {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"}  # no lm_head
    else:
        assert got == FORMER_TABLE["gpt2" if arch == "tiny_gpt2" else "llama"]  # no score head, no lm_head
