"""The benchmark's workloads: one data set, fixed settings, and the same numbers for both sides.

The data are the demo's support tickets (``scripts/make_demo_data.py``) with neutral account details around
them, so that texts run from about 20 to 128 tokens, as real requests do: a batch of them carries real
padding. Training rows come from the demo's training templates, evaluation rows from its held-out ones.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

FILLER = [
    "My account number ends in {n}.", "I have been a customer since {y}.", "I use the {app} on {os}.",
    "This is my {k} message about it.", "I am writing from {city}.", "My previous ticket was number {n}.",
    "I tried restarting everything twice.", "I also checked the help pages first.",
    "My colleague had the same issue last month.", "Please reply by email rather than phone.",
    "I am usually available in the afternoon.", "The order was placed on a {day}.",
]
WORDS = {"app": ["mobile app", "desktop app", "web portal"], "os": ["Android", "Windows", "macOS", "Linux"],
         "k": ["first", "second", "third"], "city": ["Lyon", "Oslo", "Porto", "Graz", "Leeds"],
         "day": ["Monday", "Tuesday", "Friday", "weekend"]}
LABELS = ["billing", "technical", "shipping"]


@dataclass(frozen=True)
class Workload:
    """What both sides run: the same model, data, adapter, batch, steps and seed."""

    name: str
    formulation: str  # classifier | verbalizer | causal_lm
    method: str  # lora | full
    model: str
    max_length: int = 128
    train_rows: int = 320
    eval_rows: int = 200
    batch_size: int = 8
    eval_batch_size: int = 16
    steps: int = 40
    learning_rate: float = 1e-3
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    seed: int = 42
    gradient_accumulation_steps: int = 1
    precision: str = "auto"  # auto (bf16 where the GPU has it), fp16, bf16, fp32
    gradient_checkpointing: bool = False
    row_tokens: int | None = None  # the longest data row in tokens (default: max_length)
    label: str = ""  # how the report names the workload (default: its name)
    extra: dict[str, Any] = field(default_factory=dict)  # lora-exp spec overrides (a variant of lora-exp's side)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def workloads(model: str, gpu: bool = False) -> list[Workload]:
    """The benchmark's workloads (a: classification with LoRA, b: verbalizer, c: causal-LM blocks, d: full)."""
    steps = 200 if gpu else 40
    batch = 32 if gpu else 8
    return [
        # Two epochs: accuracy after one is still seed and order noise (0.43-0.71 across orders on CPU), and the
        # acceptance compares accuracy as well as speed.
        Workload("classification-lora", "classifier", "lora", model, steps=2 * steps, batch_size=batch),
        Workload("verbalizer-lora", "verbalizer", "lora", model, steps=steps, batch_size=batch),
        Workload("causal-lm-lora", "causal_lm", "lora", model, steps=steps // 2, batch_size=batch),
        Workload("classification-full", "classifier", "full", model, steps=steps // 2, batch_size=batch,
                 learning_rate=2e-5),
    ]


def gpu_check_workloads(models: dict[str, str], steps: int = 60) -> list[Workload]:
    """The GPU check's workloads (issue 21): LoRA with each formulation on the 1B Llama shape and on GPT-2
    large, full fine-tuning of GPT-2, and seed 000's shape (GPT-2 large verbalizer LoRA r16, batch 6 x 6
    accumulation, fp16, gradient checkpointing, max length 256 with MNLI-length rows). The 1B Llama's
    causal-LM workload runs 16 blocks of 512 tokens a step (8,192 tokens: the MFU workload)."""
    llama, large, small = models["llama-1b"], models["gpt2-large"], models["gpt2"]
    out = []
    for kind, path in (("llama-1b", llama), ("gpt2-large", large)):
        out += [
            Workload("classification-lora", "classifier", "lora", path, steps=steps, batch_size=32,
                     label=f"{kind} classification-lora"),
            Workload("verbalizer-lora", "verbalizer", "lora", path, steps=steps, batch_size=32,
                     label=f"{kind} verbalizer-lora"),
            Workload("causal-lm-lora", "causal_lm", "lora", path, steps=steps // 2,
                     batch_size=16 if kind == "llama-1b" else 32, max_length=512 if kind == "llama-1b" else 128,
                     train_rows=640, label=f"{kind} causal-lm-lora"),
        ]
    out.append(Workload("classification-full", "classifier", "full", small, steps=steps, batch_size=32,
                        learning_rate=2e-5, label="gpt2 classification-full"))
    out.append(Workload("seed-000-shape", "verbalizer", "lora", large, steps=max(2, steps // 6), batch_size=6,
                        eval_batch_size=24, gradient_accumulation_steps=6, precision="fp16",
                        gradient_checkpointing=True, lora_r=16, lora_alpha=32, lora_dropout=0.1,
                        learning_rate=2e-4, max_length=256, row_tokens=96, label="gpt2-large seed-000-shape"))
    return out


def _filler(rng: random.Random) -> str:
    text = rng.choice(FILLER)
    return text.format(n=rng.randint(1000, 99999), y=rng.randint(2005, 2025),
                       **{k: rng.choice(v) for k, v in WORDS.items()})


def make_rows(templates: dict[str, list[str]], products: list[str], n: int, tokenizer: Any, seed: int,
              min_tokens: int = 20, max_tokens: int = 128) -> list[dict[str, Any]]:
    """``n`` tickets whose token counts spread evenly over [min_tokens, max_tokens]."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = LABELS[i % len(LABELS)]
        core = rng.choice(templates[label]).format(p=rng.choice(products))
        target = rng.randint(min_tokens, max_tokens - 8)
        before, after = [], []
        while len(tokenizer(" ".join([*before, core, *after]))["input_ids"]) < target:
            (before if rng.random() < 0.4 else after).append(_filler(rng))
        rows.append({"text": " ".join([*before, core, *after]), "label": label})
    return rows


def write_data(out: Path, model: str, w: Workload) -> dict[str, str]:
    """train.jsonl and validation.jsonl for a workload (causal-LM uses their text only)."""
    import sys

    from transformers import AutoTokenizer

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import make_demo_data as demo  # the demo's templates: one source of ticket text

    tok = AutoTokenizer.from_pretrained(model)
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for split, templates, products, n, seed in (
            ("train", demo.TRAIN, demo.TRAIN_PRODUCTS, w.train_rows, 1),
            ("validation", demo.HELD_OUT, demo.HELD_OUT_PRODUCTS, w.eval_rows, 2)):
        path = out / f"{split}.jsonl"
        if not path.exists():
            rows = make_rows(templates, products, n, tok, seed, max_tokens=w.row_tokens or w.max_length)
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        files[split] = str(path)
    return files
