"""SQuAD v2 (rajpurkar/squad_v2): extractive QA with unanswerable questions, for GPT-2 and Llama.

A span head (``AutoModelForQuestionAnswering``) predicts start/end logits over the context. Long contexts
are split into overlapping windows (``task.doc_stride``); a window without the answer, and an
unanswerable question, point at position 0, the "no answer" slot. At evaluation the best span over all
windows competes with the no-answer score, as in the reference implementation.

Metrics follow the official SQuAD v2 evaluation script (exact match and token F1 against the best gold
answer; unanswerable gold = ""), overall and split into HasAns / NoAns. They are written here because
``evaluate``'s squad_v2 metric downloads its script from the hub at run time.
"""

from __future__ import annotations

import collections
import csv
import json
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lora_exp.tasks.base import require_formulation


@dataclass(frozen=True)
class QATask:
    name: str = "squad_v2"
    hub_path: str | None = "rajpurkar/squad_v2"
    hub_config: str | None = None
    train_split: str = "train"
    eval_splits: tuple[str, ...] = ("validation",)
    formulations: tuple[str, ...] = ("span",)
    kind: str = field(default="qa", init=False)

    @property
    def required_columns(self) -> tuple[str, ...]:
        return ("question", "context", "answers")

    def check_row(self, row: dict[str, Any]) -> str:
        for f in ("question", "context"):
            if not isinstance(row[f], str) or not row[f].strip():
                raise ValueError(f"column {f!r}: expected non-empty text")
        answers = row["answers"]
        if not isinstance(answers, dict) or set(answers) != {"text", "answer_start"}:
            raise ValueError("column 'answers': expected {\"text\": [...], \"answer_start\": [...]}")
        if len(answers["text"]) != len(answers["answer_start"]):
            raise ValueError("column 'answers': text and answer_start differ in length")
        for text, start in zip(answers["text"], answers["answer_start"], strict=True):
            if not isinstance(start, int) or row["context"][start : start + len(text)] != text:
                raise ValueError(f"column 'answers': {text!r} is not at character {start} of the context")
        return "answerable" if answers["text"] else "unanswerable"

    def normalise(self, ds: Any, split: str) -> Any:
        if "id" not in ds.column_names:
            ds = ds.add_column("id", [str(i) for i in range(len(ds))])
        return ds.select_columns(["id", "question", "context", "answers"])

    def check_spec(self, spec: Any) -> None:
        require_formulation(spec, self.name, self.formulations)

    def formulation(self, spec: Any, tokenizer: Any) -> SpanExtraction:
        require_formulation(spec, self.name, self.formulations)
        return SpanExtraction(self, tokenizer, spec.model.max_length, spec.task.doc_stride or 128,
                              spec.task.max_answer_length or 30)


SQUAD_V2 = QATask()
NULL = 0  # the position that stands for "no answer"


@dataclass
class SpanExtraction:
    task: QATask
    tokenizer: Any
    max_length: int
    doc_stride: int
    max_answer_length: int
    n_best: int = 20
    kind: str = "span"
    model_class: str = "AutoModelForQuestionAnswering"
    peft_task_type: str = "QUESTION_ANS"
    prediction_loss_only: bool = True  # EM/F1 need whole examples: computed in the final evaluation

    def _windows(self, batch: dict[str, list[Any]]) -> Any:
        from lora_exp.errors import DataError

        questions = [q.strip() + "\n" for q in batch["question"]]
        longest = max(len(ids) for ids in self.tokenizer(questions)["input_ids"])
        room = self.max_length - longest  # context tokens per window, for the longest question
        if room < 8:
            raise DataError(f"a question takes {longest} tokens: model.max_length {self.max_length} leaves no room "
                            "for the context; raise model.max_length")
        return self.tokenizer(
            questions, batch["context"], truncation="only_second", max_length=self.max_length,
            stride=min(self.doc_stride, room // 2), return_overflowing_tokens=True, return_offsets_mapping=True,
        )

    def _train_features(self, batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        enc = self._windows(batch)
        starts, ends = [], []
        for i, offsets in enumerate(enc["offset_mapping"]):
            answers = batch["answers"][enc["overflow_to_sample_mapping"][i]]
            seq = enc.sequence_ids(i)
            ctx = [j for j, s in enumerate(seq) if s == 1]
            start = end = NULL
            if answers["text"] and ctx:
                s_char = answers["answer_start"][0]
                e_char = s_char + len(answers["text"][0])
                if offsets[ctx[0]][0] <= s_char and offsets[ctx[-1]][1] >= e_char:  # answer inside this window
                    start = next(j for j in ctx if offsets[j][1] > s_char)
                    end = next(j for j in reversed(ctx) if offsets[j][0] < e_char)
            starts.append(start)
            ends.append(end)
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                "start_positions": starts, "end_positions": ends}

    def _eval_features(self, batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        enc = self._windows(batch)
        ids, offsets = [], []
        for i, offs in enumerate(enc["offset_mapping"]):
            seq = enc.sequence_ids(i)
            ids.append(batch["id"][enc["overflow_to_sample_mapping"][i]])
            offsets.append([list(o) if s == 1 else None for o, s in zip(offs, seq, strict=True)])
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "example_id": ids,
                "offset_mapping": offsets}

    def tokenize(self, ds: Any) -> Any:
        from lora_exp.formulation import map_batches

        return map_batches(ds, self._train_features, "windowing contexts (span)")

    def collator(self) -> Any:
        from transformers import DataCollatorWithPadding

        return DataCollatorWithPadding(self.tokenizer)

    def preprocess_logits(self, logits: Any, labels: Any) -> Any:
        return logits

    def compute_metrics(self, p: Any) -> dict[str, float]:
        return {}

    def evaluate(self, trainer: Any, raw: Any, split: str, out_dir: Path) -> dict[str, float]:
        from lora_exp.formulation import map_batches

        features = map_batches(raw, self._eval_features, "windowing contexts (span, eval)")
        pred = trainer.predict(features.remove_columns(["example_id", "offset_mapping"]), metric_key_prefix=split)
        if not trainer.is_world_process_zero():
            return {}
        start_logits, end_logits = pred.predictions[:2]
        answers = self.postprocess(raw, features, start_logits, end_logits)
        metrics = squad_v2_metrics({r["id"]: r["answers"]["text"] for r in raw}, answers)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "results.json").write_text(json.dumps({"split": split, "task": self.task.name, **metrics},
                                                         indent=2))
        with (out_dir / "predictions.csv").open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["id", "question", "gold_answers", "prediction", "exact", "f1"])
            for r in raw:
                golds = [a for a in r["answers"]["text"] if normalize_answer(a)] or [""]
                p = answers[r["id"]]
                w.writerow([r["id"], r["question"], json.dumps(r["answers"]["text"]), p,
                            max(compute_exact(g, p) for g in golds), round(max(compute_f1(g, p) for g in golds), 4)])
        return metrics

    def postprocess(self, raw: Any, features: Any, start_logits: np.ndarray, end_logits: np.ndarray) -> dict[str, str]:
        """Best answer text per example over all its windows, or "" when the no-answer score wins."""
        by_example = collections.defaultdict(list)
        for i, ex_id in enumerate(features["example_id"]):
            by_example[ex_id].append(i)
        offsets_all = features["offset_mapping"]
        out = {}
        for r in raw:
            best_text, best_score, null_score = "", -np.inf, np.inf
            for i in by_example[r["id"]]:
                s_log, e_log, offsets = start_logits[i], end_logits[i], offsets_all[i]
                null_score = min(null_score, float(s_log[NULL] + e_log[NULL]))
                top_s = np.argsort(s_log)[-1 : -self.n_best - 1 : -1]
                top_e = np.argsort(e_log)[-1 : -self.n_best - 1 : -1]
                for s in top_s:
                    for e in top_e:
                        if (s >= len(offsets) or e >= len(offsets) or offsets[s] is None or offsets[e] is None
                                or e < s or e - s + 1 > self.max_answer_length):
                            continue
                        score = float(s_log[s] + e_log[e])
                        if score > best_score:
                            best_score, best_text = score, r["context"][offsets[s][0] : offsets[e][1]]
            out[r["id"]] = best_text if best_score > null_score else ""
        return out


# ---- the official SQuAD v2.0 evaluation, function for function ------------------------------------


def normalize_answer(s: str) -> str:
    """Lower text and remove punctuation, articles and extra whitespace."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def get_tokens(s: str) -> list[str]:
    return normalize_answer(s).split() if s else []


def compute_exact(a_gold: str, a_pred: str) -> int:
    return int(normalize_answer(a_gold) == normalize_answer(a_pred))


def compute_f1(a_gold: str, a_pred: str) -> float:
    gold_toks, pred_toks = get_tokens(a_gold), get_tokens(a_pred)
    common = collections.Counter(gold_toks) & collections.Counter(pred_toks)
    num_same = sum(common.values())
    if not gold_toks or not pred_toks:
        return float(gold_toks == pred_toks)  # no-answer: 1 if both empty, else 0
    if num_same == 0:
        return 0.0
    precision, recall = num_same / len(pred_toks), num_same / len(gold_toks)
    return 2 * precision * recall / (precision + recall)


def squad_v2_metrics(gold: dict[str, list[str]], pred: dict[str, str]) -> dict[str, float]:
    """exact/f1 (0-100) overall and for answerable (HasAns) and unanswerable (NoAns) questions."""
    exact, f1 = {}, {}
    for qid, answers in gold.items():
        golds = [a for a in answers if normalize_answer(a)] or [""]
        exact[qid] = max(compute_exact(a, pred.get(qid, "")) for a in golds)
        f1[qid] = max(compute_f1(a, pred.get(qid, "")) for a in golds)
    out: dict[str, float] = {}

    def add(prefix: str, qids: list[str]) -> None:
        if qids:
            out[f"{prefix}exact"] = 100.0 * sum(exact[q] for q in qids) / len(qids)
            out[f"{prefix}f1"] = 100.0 * sum(f1[q] for q in qids) / len(qids)
        out[f"{prefix}total"] = float(len(qids))

    add("", list(gold))
    add("HasAns_", [q for q, a in gold.items() if a])
    add("NoAns_", [q for q, a in gold.items() if not a])
    return out
