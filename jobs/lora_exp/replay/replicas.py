"""Stand-ins for what cannot be downloaded here: a model directory with a hub model's real architecture and
random weights, and local data files in a hub data set's schema and split names (``lora-exp replay``).

They prove that a run *starts, fits, finishes and writes every output* at the seed's shape; they say nothing
about accuracy (random weights, random words). Three shapes:

- ``full``: the published config (``architectures.KNOWN_CONFIGS``), every dimension as on the hub;
- ``small``: the same family at a width and depth a 2-core CPU trains in seconds per step (the replay's
  fallback for models above its CPU budget), the real vocabulary and context length;
- ``tiny``: the smallest model of the family (CI).

The tokenizer is a byte-level BPE trained on the replica's own data (``tokenizers``): the hub's vocabulary
files are downloads too. Its vocabulary is smaller than the config's, so every id it emits is a valid
embedding row; the config's special-token ids are set to the tokenizer's.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import random
from collections.abc import Iterable
from pathlib import Path
from typing import Any, cast

from lora_exp.core.errors import UserError
from lora_exp.core.layout import published, write_json
from lora_exp.planning.architectures import ALIASES, KNOWN_CONFIGS, known_config
from lora_exp.tasks.base import CLASSIFICATION, LM, QA, ClassificationTask, Task

log = logging.getLogger(__name__)

SHAPES = ("full", "small", "tiny")
MARKER = "replica.json"  # what a replica directory was made from; a directory that matches is reused
TOKENIZER_VOCAB = 2000
RECIPE = 2  # raised when the way a replica is made changes: older replica directories are made again
# Width/depth of the scaled shapes per model type; heads keep the family's query:key-value ratio where
# they can (TinyLlama's 8:1 grouped-query attention). Widths stay at 64 or more: bitsandbytes' CPU 4-bit
# kernels quantise in blocks of 64 input features.
_SCALED: dict[str, dict[str, dict[str, int]]] = {
    "gpt2": {"small": {"n_embd": 256, "n_layer": 4, "n_head": 4}, "tiny": {"n_embd": 64, "n_layer": 2, "n_head": 2}},
    "llama": {
        "small": {"hidden_size": 256, "intermediate_size": 704, "num_hidden_layers": 4, "num_attention_heads": 8,
                  "num_key_value_heads": 1},
        "tiny": {"hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 2, "num_attention_heads": 4,
                 "num_key_value_heads": 1},
    },
}
_SYLLABLES = ("ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "ze", "pa", "do", "gi", "hu", "be", "ra", "to")


def canonical(name: str) -> str:
    return ALIASES.get(name, name)


def replica_config(name: str, shape: str) -> Any:
    """The config of ``name`` at ``shape``; a UserError for a model the architecture table does not know."""
    config = known_config(name)
    if config is None:
        raise UserError(f"model {name!r}: no published architecture to replicate; known: {sorted(KNOWN_CONFIGS)}")
    if shape != "full":
        for key, value in _SCALED[config.model_type][shape].items():
            setattr(config, key, value)
    return config


@functools.lru_cache(maxsize=64)
def parameter_count(name: str, shape: str = "full") -> int:
    """Parameters of the replica, counted on the meta device (no memory, a second or two; once per model and
    shape: several seeds name gpt2)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(replica_config(name, shape))
    return sum(p.numel() for p in model.parameters())


def words(rng: random.Random, n: int) -> str:
    """``n`` pronounceable nonsense words: text a BPE tokenizer splits like prose."""
    return " ".join("".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 3))) for _ in range(n))


def corpus_digest(corpus: Iterable[str]) -> str:
    return hashlib.sha256("\n".join(corpus).encode()).hexdigest()


def write_model(name: str, out: Path, shape: str, corpus: Iterable[str], seed: int = 0) -> Path:
    """A model directory for ``name`` at ``shape``: config, a tokenizer trained on ``corpus``, random weights.

    Reused when ``out`` already holds the same replica (the gpt2-large one is 3 GB); written atomically.
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    corpus = list(corpus)
    digest = corpus_digest(corpus)[:16]
    made_from = {"name": canonical(name), "shape": shape, "seed": seed, "recipe": RECIPE,
                 "tokenizer_vocab": TOKENIZER_VOCAB, "corpus_sha256": digest}
    if (out / MARKER).is_file() and made_from.items() <= json.loads((out / MARKER).read_text()).items():
        log.info("replica of %s (%s) already at %s", name, shape, out)
        return out
    config = replica_config(name, shape)
    llama = config.model_type == "llama"
    specials = ["<unk>", "<s>", "</s>"] if llama else ["<|endoftext|>"]
    bpe = Tokenizer(models.BPE(unk_token="<unk>" if llama else None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=min(TOKENIZER_VOCAB, config.vocab_size), special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=specials[-2] if llama else specials[0],
                                  eos_token=specials[-1], unk_token=specials[0])
    config.bos_token_id, config.eos_token_id = tok.bos_token_id, tok.eos_token_id
    log.info("replica of %s (%s): building %d-layer random-weight model", name, shape,
             getattr(config, "num_hidden_layers", getattr(config, "n_layer", 0)))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        # Rows past the stand-in tokenizer's vocabulary are tokens it cannot write: zeroed, the model generates
        # text it can decode rather than ids that decode to nothing (seed 004's generation check reads it).
        for emb in (model.get_input_embeddings(), model.get_output_embeddings()):
            if emb is not None:
                emb.weight[len(tok):] = 0
    model.generation_config.pad_token_id = tok.eos_token_id
    with published(out) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        tok.save_pretrained(staging)
        write_json(staging / MARKER, {**made_from, "parameters": sum(p.numel() for p in model.parameters())})
    return out


# --- data in the hub's schema ------------------------------------------------------------------------------

# The hub layout of each task's data set beyond the columns the task reads: every split the hub has (GLUE and
# IMDB test rows are unlabelled, -1, as there) and the extra columns, so a replay reads what a hub load gives.
HUB_SPLITS: dict[str, dict[str, str]] = {
    # split -> role: "train", "eval" (labelled), "test" (label -1)
    "mnli": {"train": "train", "validation_matched": "eval", "validation_mismatched": "eval",
             "test_matched": "test", "test_mismatched": "test"},
    "imdb": {"train": "train", "test": "eval", "unsupervised": "test"},
}
DEFAULT_SPLITS = {"train": "train", "validation": "eval", "test": "test"}


def hub_splits(task: Task) -> dict[str, str]:
    return HUB_SPLITS.get(task.name, DEFAULT_SPLITS)


def _classification_row(task: Any, rng: random.Random, i: int, role: str) -> dict[str, Any]:
    row: dict[str, Any] = {f: words(rng, rng.randint(6, 18)) for f in task.text_fields}
    row["label"] = -1 if role == "test" else rng.randrange(task.num_labels)
    row["idx"] = i
    return row


def _squad_row(rng: random.Random, i: int, split: str) -> dict[str, Any]:
    context = ". ".join(words(rng, rng.randint(8, 14)) for _ in range(rng.randint(3, 6))) + "."
    question = words(rng, rng.randint(4, 8)).capitalize() + "?"
    answers: dict[str, list[Any]] = {"text": [], "answer_start": []}
    if i % 3:  # a third unanswerable, with an empty answer list, as in SQuAD v2
        tokens = context.split(" ")
        start_word = rng.randrange(len(tokens) - 3)
        text = " ".join(tokens[start_word:start_word + rng.randint(1, 3)]).rstrip(".")
        start = len(" ".join(tokens[:start_word])) + (1 if start_word else 0)
        n = 1 if split == "train" else rng.randint(1, 3)  # validation rows carry several (equal) references
        answers = {"text": [text] * n, "answer_start": [start] * n}
    return {"id": f"{split}-{i:05d}", "title": words(rng, 2).title(), "context": context, "question": question,
            "answers": answers}


def _wikitext_rows(rng: random.Random, n: int) -> list[dict[str, Any]]:
    """Raw WikiText lines: headings, paragraphs and the empty lines between them."""
    rows: list[dict[str, Any]] = []
    while len(rows) < n:
        rows += [{"text": ""}, {"text": f" = {words(rng, 3).title()} = \n"}, {"text": ""}]
        rows += [{"text": " " + words(rng, rng.randint(40, 120)) + " . \n"} for _ in range(rng.randint(2, 4))]
    return rows[:n]


def write_data(task: Task, out: Path, rows: dict[str, int], seed: int = 0) -> dict[str, str]:
    """JSONL files, one per hub split of ``task``, with ``rows[role]`` rows each; returns ``{split: path}``."""
    rng = random.Random(f"{task.name}:{seed}")
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}
    for split, role in hub_splits(task).items():
        n = rows[role]
        if task.kind == CLASSIFICATION:
            data = [_classification_row(task, rng, i, role) for i in range(n)]
        elif task.kind == QA:
            data = [_squad_row(rng, i, split) for i in range(n)]
        elif task.kind == LM:
            data = _wikitext_rows(rng, n)
        else:
            raise UserError(f"task {task.name!r}: no hub-format replica for kind {task.kind!r}")
        path = out / f"{split}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in data))
        files[split] = str(path)
    return files


def corpus_of(files: Iterable[str], tasks: Iterable[Task] = ()) -> list[str]:
    """Every string value in the JSONL files, and the tasks' prompt words: what the replica's tokenizer is
    trained on. The label words are repeated until BPE learns them whole, as a real vocabulary has them (a
    verbalizer scores each label by its first token, which must differ between labels)."""
    texts: list[str] = []
    for task in tasks:
        if task.kind == CLASSIFICATION:
            c = cast(ClassificationTask, task)
            prompt = c.template.format(**dict.fromkeys(c.text_fields, "")) + c.prompt_suffix
            texts += [f"{prompt} {label}" for label in c.labels] * 200

    def collect(value: Any) -> None:
        if isinstance(value, str):
            texts.append(value)
        elif isinstance(value, dict):
            for v in value.values():
                collect(v)
        elif isinstance(value, list):
            for v in value:
                collect(v)

    for path in files:
        for line in Path(path).read_text().splitlines():
            collect(json.loads(line))
    return texts
