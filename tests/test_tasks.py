"""Each task: loading from local files, formatting (classifier and verbalizer), and metrics."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from transformers import AutoTokenizer

from lora_exp.config.loading import check_run
from lora_exp.config.schema import RunSpec
from lora_exp.core import registry
from lora_exp.engine.data import load_splits, subsample
from lora_exp.formulations import build_formulation
from lora_exp.tasks import ClassificationTask, get_task
from support import write_jsonl

WORDS = ["the", "movie", "was", "great", "plot", "boring", "story", "fun"]


def _rows(task, n: int) -> list[dict]:
    rows = []
    for i in range(n):
        row = {f: f"{f} {WORDS[i % len(WORDS)]} {i}" for f in task.text_fields}
        # labels given as names and as indices, both accepted
        row[task.label_field] = task.labels[i % task.num_labels] if i % 2 else i % task.num_labels
        rows.append(row)
    return rows


def _spec(task_name, files, kind="classifier", **extra) -> RunSpec:
    return RunSpec.model_validate({
        "model": {"name": "unused", "max_length": 48},
        "task": {"name": task_name, **extra},
        "data": {"data_files": files},
        "formulation": {"kind": kind},
        "method": {"name": "lora"},
    })


REGISTRY = dict(registry.TASKS.items())
CLASSIFICATION = sorted(n for n, t in REGISTRY.items() if isinstance(t, ClassificationTask))


@pytest.mark.parametrize("name", CLASSIFICATION)
@pytest.mark.parametrize("kind", ["classifier", "verbalizer"])
def test_task_loads_local_files_and_formats_rows(name, kind, tmp_path, tiny_tokenizer_dir):
    task = REGISTRY[name]
    splits = (task.train_split, *task.eval_splits)
    files = {s: str(write_jsonl(tmp_path / f"{s}.jsonl", _rows(task, 6))) for s in splits}
    spec = _spec(name, files, kind)
    raw = load_splits(spec, get_task(spec))
    train, val, evals = subsample(spec, task, raw)
    assert list(evals) == list(task.eval_splits)
    if name == "mnli":
        assert list(evals) == ["validation_matched", "validation_mismatched"]
    assert sorted(train["label"]) == sorted(i % task.num_labels for i in range(6))

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    tok.pad_token = tok.eos_token
    form = build_formulation(spec, task, tok)
    batch = raw[task.train_split][:2]
    enc = form.encode(batch)
    text = tok.decode(enc["input_ids"][1])
    for f in task.text_fields:
        assert batch[f][1] in text  # every text field is in the model input
    if kind == "classifier":
        assert enc["labels"] == batch["label"]
    else:  # the prompt ends with the task's question; the label word is the only supervised part
        label_word = " " + task.labels[batch["label"][1]]
        supervised = [t for t in enc["labels"][1] if t != -100]
        assert tok.decode(supervised) == label_word
        assert text.endswith(task.prompt_suffix + label_word)


def test_verbalizer_scores_read_the_answer_position(tmp_path, tiny_tokenizer_dir):
    import torch

    task = REGISTRY["sst2"]
    files = {s: str(write_jsonl(tmp_path / f"{s}.jsonl", _rows(task, 4))) for s in ("train", "validation")}
    spec = _spec("sst2", files, "verbalizer", eval_splits=["validation"])
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    tok.pad_token = tok.eos_token
    form = build_formulation(spec, task, tok)
    enc = form.encode({"sentence": ["a b", "c"], "label": [1, 0]})
    labels = torch.full((2, 20), -100)
    for i, row in enumerate(enc["labels"]):
        labels[i, : len(row)] = torch.tensor(row)
    logits = torch.zeros(2, 20, len(tok))
    answer = [(torch.tensor(r) != -100).int().argmax().item() for r in enc["labels"]]
    logits[0, answer[0] - 1, form.first_ids[1]] = 5.0  # row 0 predicts "positive" where its answer starts
    logits[1, answer[1] - 1, form.first_ids[0]] = 5.0  # row 1 predicts "negative"

    class Fixed:  # these logits, computed only where asked (logits_to_keep, read as transformers reads it)
        def __call__(self, input_ids, attention_mask=None, logits_to_keep=None):
            from transformers.modeling_utils import slice_logits_to_keep

            return SimpleNamespace(logits=slice_logits_to_keep(logits, logits_to_keep))

    batch = {"input_ids": torch.zeros(2, 20, dtype=torch.long), "attention_mask": torch.ones(2, 20), "labels": labels}
    _, scores = form.scored_forward(Fixed(), batch)
    assert scores.shape == (2, 2) and scores.argmax(dim=1).tolist() == [1, 0]
    assert form.gold(labels.numpy()).tolist() == [1, 0]


def test_metrics_match_hand_computation():
    cola = REGISTRY["cola"]
    gold = np.array([1, 1, 1, 0, 0, 1])
    pred = np.array([1, 0, 1, 0, 1, 1])
    m = cola.score(gold, pred)
    # TP=3 (1->1), FN=1, FP=1, TN=1: MCC = (3*1 - 1*1) / sqrt(4*4*2*2) = 2/8
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["mcc"] == pytest.approx(0.25)

    mrpc = REGISTRY["mrpc"]  # F1 of the "equivalent" class: P = 3/4, R = 3/4
    assert mrpc.score(gold, pred)["f1"] == pytest.approx(0.75)

    mnli = REGISTRY["mnli"]
    m = mnli.score(np.array([0, 1, 2, 2]), np.array([0, 2, 2, 2]))
    # per class F1: 1.0, 0.0, 0.8 -> macro 0.6
    assert m["accuracy"] == pytest.approx(0.75) and m["f1_macro"] == pytest.approx(0.6)


def test_registered_tasks_reject_custom_fields():
    from pydantic import ValidationError

    from lora_exp.core.errors import SpecError

    spec = _spec("sst2", {"train": "x.jsonl"}, text_fields=["a"])
    with pytest.raises(SpecError, match="only task 'custom'"):
        check_run(spec)
    with pytest.raises(ValidationError, match="Input should be 'custom', 'mnli'"):
        _spec("sst3", {"train": "x.jsonl"})
