"""The official SQuAD v2.0 evaluation, function for function: exact match and token F1 against the best
gold answer (unanswerable gold = ""), overall and split into HasAns / NoAns.

Written here because ``evaluate``'s squad_v2 metric downloads its script from the hub at run time.
"""

from __future__ import annotations

import collections
import re
import string


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
