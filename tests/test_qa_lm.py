"""SQuAD v2 (span QA) and WikiText (causal LM): official metrics by hand, end-to-end runs on tiny models,
perplexity = exp(mean token loss), every generation metric computed offline."""

from __future__ import annotations

import csv
import gzip
import json
import math
from pathlib import Path

import pytest

from lora_exp.metrics.generation import LEXNAMES, generation_metrics
from lora_exp.metrics.squad import compute_exact, compute_f1, normalize_answer, squad_v2_metrics
from support import mlflow_client, qa_rows, run_cli, text_rows, write_jsonl, write_values


def test_squad_v2_metrics_match_official_definitions_on_hand_worked_examples():
    assert normalize_answer("The  Eiffel-Tower!") == "eiffeltower"
    assert compute_exact("the Eiffel Tower", "Eiffel tower.") == 1
    # gold "in paris france" (3 tokens after dropping nothing), pred "paris" -> P=1, R=1/3, F1=0.5
    assert compute_f1("in Paris, France", "Paris") == pytest.approx(0.5)
    assert compute_f1("", "") == 1.0 and compute_f1("", "Paris") == 0.0
    gold = {
        "q1": ["Paris", "in Paris"],  # answerable, two gold answers: the best one counts
        "q2": ["1889"],
        "q3": [],  # unanswerable: only "" is right
        "q4": [],
    }
    pred = {"q1": "in Paris", "q2": "in 1889 it opened", "q3": "", "q4": "a tower"}
    m = squad_v2_metrics(gold, pred)
    # q1 exact 1 f1 1; q2 exact 0, f1: P=1/4 (in,1889,it,opened), R=1 -> 0.4; q3 1/1; q4 0/0
    assert m["exact"] == pytest.approx(100 * 2 / 4)
    assert m["f1"] == pytest.approx(100 * (1 + 0.4 + 1 + 0) / 4)
    assert (m["HasAns_exact"], m["HasAns_f1"], m["HasAns_total"]) == pytest.approx((50.0, 70.0, 2))
    assert (m["NoAns_exact"], m["NoAns_f1"], m["NoAns_total"]) == pytest.approx((50.0, 50.0, 2))


def _doc(model: Path, tmp: Path, task: dict, data: dict, runs: dict, max_length: int) -> dict:
    return {"experiment": {"name": "toy", "defaults": {
        "model": {"name": str(model), "max_length": max_length},
        "task": task, "data": {"data_files": data},
        # fp32: losses are recomputed here in fp32 (precision auto would be bf16 autocast on CPUs with bf16 units)
        "training": {"epochs": 2, "learning_rate": 5e-3, "per_device_train_batch_size": 4, "logging_steps": 2,
                     "eval_strategy": "epoch", "save_strategy": "epoch", "precision": "fp32"},
        "eval": {"generation_samples": 3, "prompt_tokens": 8, "max_new_tokens": 6},
        "tracking": {"tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}"},
        "output_root": str(tmp / "outputs"),
    }, "runs": runs}}


def test_squad_v2_lora_end_to_end_with_windows(tmp_path, tiny_gpt2):
    data = {"train": str(write_jsonl(tmp_path / "train.jsonl", qa_rows(24))),
            "validation": str(write_jsonl(tmp_path / "val.jsonl", qa_rows(9)))}
    # max_length 40 < question + context: every example is split into overlapping windows.
    doc = _doc(tiny_gpt2, tmp_path, {"name": "squad_v2", "doc_stride": 8}, data,
               {"lora": {"method": {"name": "lora", "r": 2}},
                "reeval": {"job": "eval", "eval": {"model_path": str(tmp_path / "outputs/toy/lora/final")}}},
               max_length=40)
    proc = run_cli("run", "-f", str(write_values(tmp_path, doc)), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    results = json.loads((tmp_path / "outputs/toy/lora/eval/validation/results.json").read_text())
    assert results["total"] == 9 and results["HasAns_total"] == 6 and results["NoAns_total"] == 3
    for key in ("exact", "f1", "HasAns_exact", "HasAns_f1", "NoAns_exact", "NoAns_f1"):
        assert 0.0 <= results[key] <= 100.0
    # Answers are matched to their questions by position: the eval job (plain order) must agree exactly.
    reeval = tmp_path / "outputs/toy/reeval/eval-job/validation"
    assert (reeval / "predictions.csv").read_text() == (tmp_path / "outputs/toy/lora/eval/validation/"
                                                        "predictions.csv").read_text()
    client = mlflow_client(tmp_path)
    runs = {r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name("toy").experiment_id])}
    run = runs["lora"]
    assert run.data.metrics["validation_f1"] == pytest.approx(results["f1"])
    assert "eval_loss" in run.data.metrics  # in-training evaluation reports the loss
    preds = (tmp_path / "outputs/toy/lora/eval/validation/predictions.csv").read_text().splitlines()
    assert len(preds) == 10 and preds[0].startswith("id,question,gold_answers,prediction")


def test_squad_rows_are_checked(tmp_path, tiny_gpt2):
    from lora_exp.cli import main

    rows = qa_rows(3)
    rows[1]["answers"]["answer_start"] = [0]
    data = {"train": str(write_jsonl(tmp_path / "train.jsonl", rows)),
            "validation": str(write_jsonl(tmp_path / "val.jsonl", qa_rows(3)))}
    doc = _doc(tiny_gpt2, tmp_path, {"name": "squad_v2"}, data, {"lora": {}}, max_length=24)
    assert main(["validate", "-f", str(write_values(tmp_path, doc))]) == 2


@pytest.mark.parametrize("method", [{"name": "full"}, {"name": "lora", "r": 4}])
def test_wikitext_style_lm_perplexity_and_generation_metrics(method, tmp_path, tiny_llama):
    import torch
    from transformers import AutoModelForCausalLM

    data = {"train": str(write_jsonl(tmp_path / "train.jsonl", text_rows(40))),
            "validation": str(write_jsonl(tmp_path / "val.jsonl", text_rows(12)))}
    doc = _doc(tiny_llama, tmp_path, {"name": "wikitext"}, data, {"run": {"method": method}}, max_length=16)
    proc = run_cli("train", "-f", str(write_values(tmp_path, doc)), cwd=tmp_path, env={"HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    out = tmp_path / "outputs/toy/run"
    results = json.loads((out / "eval/validation/results.json").read_text())
    for key in ("bleu", "sacrebleu", "rouge1", "rouge2", "rougeL", "ter", "chrf", "meteor"):
        assert math.isfinite(results[key]), key

    # perplexity == exp(mean token loss), recomputed here from the saved model over the same blocks
    from lora_exp.config.loading import resolve_runs
    from lora_exp.engine.prepare import prepare
    from lora_exp.methods import get_method

    (run,) = resolve_runs(tmp_path / "values.yaml")
    p = prepare(run)
    model = get_method(method["name"]).load(
        lambda path: AutoModelForCausalLM.from_pretrained(path or str(tiny_llama)), str(out / "final"))
    model.eval()
    blocks = p.form.tokenize(p.evals_raw["validation"])
    ids = torch.tensor(blocks["input_ids"])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    token_loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    assert results["perplexity"] == pytest.approx(math.exp(token_loss.item()), rel=1e-4)
    assert results["loss"] == pytest.approx(token_loss.item(), rel=1e-4)

    client = mlflow_client(tmp_path)
    (mrun,) = client.search_runs([client.get_experiment_by_name("toy").experiment_id])
    for key in ("best_train_loss", "best_eval_loss", "artifact_size_mb", "trainable_params", "train_runtime",
                "peak_cpu_memory_mb", "validation_perplexity", "validation_meteor"):
        assert key in mrun.data.metrics, key
    with (out / "eval/validation/generations.csv").open() as fh:
        generations = list(csv.reader(fh))
    assert generations[0] == ["prompt", "reference", "generated"] and len(generations) == 4


def test_generation_metrics_on_known_strings():
    perfect = generation_metrics(["the cat sat on the mat"], ["the cat sat on the mat"])
    assert perfect["bleu"] == pytest.approx(1.0) and perfect["sacrebleu"] == pytest.approx(100.0)
    assert perfect["ter"] == 0.0 and perfect["rougeL"] == 1.0 and perfect["meteor"] > 0.99
    disjoint = generation_metrics(["alpha beta gamma delta"], ["one two three four"])
    assert disjoint["bleu"] == 0.0 and disjoint["rouge1"] == 0.0 and disjoint["meteor"] == 0.0
    # METEOR matches synonyms through WordNet: "sofa" ~ "couch" scores above an unrelated word
    syn = generation_metrics(["the cat sat on the sofa"], ["the cat sat on the couch"])["meteor"]
    other = generation_metrics(["the cat sat on the plank"], ["the cat sat on the couch"])["meteor"]
    assert syn > other


def test_lexnames_match_the_wordnet_manual():
    page = Path("/usr/share/man/man5/lexnames.5WN.gz")
    if not page.exists():
        pytest.skip("WordNet man pages not installed")
    with gzip.open(page, "rt") as fh:
        rows = [line.split("\t") for line in fh if line[:2].isdigit() and "\t" in line]
    assert [r[1].strip() for r in rows] == LEXNAMES


def test_span_postprocess_on_hand_made_windows():
    """Best span over all windows vs the no-answer score, by hand: question tokens, spans that end before
    they start or run past max_answer_length are never answers."""
    import numpy as np

    from lora_exp.formulations.span import SpanExtraction
    from lora_exp.tasks.squad_v2 import SQUAD_V2

    context = "Alice lives in Paris with a cat."
    words = [(0, 5), (6, 11), (12, 14), (15, 20), (21, 25), (26, 27), (28, 31)]  # Alice lives in Paris with a cat
    window = [None, None, *[list(w) for w in words]]  # positions 0-1: question tokens (0 is the no-answer slot)
    second = [None, None, [15, 20], [21, 25], [26, 27], [28, 31]]  # a later window: Paris with a cat
    span = SpanExtraction(SQUAD_V2, tokenizer=None, max_length=9, doc_stride=4, max_answer_length=3)

    def logits(n: int, **at: float) -> np.ndarray:
        out = np.full(n, -10.0)
        for pos, value in at.items():
            out[int(pos.removeprefix("p"))] = value
        return out

    cases = {  # id -> (window offsets, start logits, end logits, expected answer)
        "plain": ([window], [logits(9, p5=5.0, p0=1.0)], [logits(9, p5=5.0, p0=1.0)], "Paris"),
        "null-wins": ([window], [logits(9, p5=2.0, p0=3.0)], [logits(9, p5=2.0, p0=3.0)], ""),
        "too-long": ([window], [logits(9, p2=9.0, p5=4.0)], [logits(9, p8=9.0, p6=4.0)], "Paris with"),
        "backwards": ([window], [logits(9, p7=9.0, p3=3.0)], [logits(9, p4=9.0, p3=3.0)], "lives in"),
        "question": ([window], [logits(9, p1=20.0, p8=1.0)], [logits(9, p1=20.0, p8=1.0)], "cat"),
        "two-windows": ([window, second], [logits(9, p3=2.0), logits(6, p2=6.0)],
                        [logits(9, p3=2.0), logits(6, p4=6.0)], "Paris with a"),
    }
    raw, ids, offsets, starts, ends = [], [], [], [], []
    for ex_id, (windows, s, e, _) in cases.items():
        raw.append({"id": ex_id, "context": context})
        for w, sw, ew in zip(windows, s, e, strict=True):
            ids.append(ex_id)
            offsets.append(w + [None] * (9 - len(w)))  # padded windows: padding is never an answer
            starts.append(np.concatenate([sw, np.full(9 - len(sw), -10.0)]))
            ends.append(np.concatenate([ew, np.full(9 - len(ew), -10.0)]))
    got = span.postprocess(raw, {"example_id": ids, "offset_mapping": offsets}, np.stack(starts), np.stack(ends))
    assert got == {ex_id: case[3] for ex_id, case in cases.items()}


def test_final_evaluation_matches_answers_to_their_questions(tmp_path, tiny_gpt2):
    """Training batches by length (group_by_length), and transformers 5 then batches evaluation by length
    too: the final evaluation must still pair each window's logits with its own question. An untrained span
    head answers at random, which is enough to tell: its answers must equal a plain, in-order prediction."""
    from lora_exp.config.loading import resolve_runs
    from lora_exp.engine.evaluation import evaluate_splits
    from lora_exp.engine.prepare import prepare
    from lora_exp.engine.trainer import build_trainer, prediction_trainer
    from lora_exp.tracking.spool import Tracker

    data = {"train": str(write_jsonl(tmp_path / "train.jsonl", qa_rows(8))),
            "validation": str(write_jsonl(tmp_path / "val.jsonl", qa_rows(24)))}
    doc = _doc(tiny_gpt2, tmp_path, {"name": "squad_v2", "doc_stride": 8}, data,
               {"lora": {"method": {"name": "lora", "r": 2}}}, max_length=40)
    (run,) = resolve_runs(write_values(tmp_path, doc))
    p = prepare(run)
    trainer, _ = build_trainer(run.spec, p.model, p.form, p.tokenizer, tmp_path / "t", p.train_ds, p.val_ds,
                               Tracker(None))
    assert trainer.args.train_sampling_strategy == "group_by_length"
    evaluate_splits(trainer, p.form, p.evals_raw, tmp_path / "final", Tracker(None))
    plain = prediction_trainer(p.model, p.form, p.tokenizer, run.spec.training, tmp_path)
    p.form.evaluate(plain, p.evals_raw["validation"], "validation", tmp_path / "plain")
    final = (tmp_path / "final/validation/predictions.csv").read_text()
    with (tmp_path / "plain/predictions.csv").open() as fh:
        answers = [row["prediction"] for row in csv.DictReader(fh)]
    assert len(set(answers)) > 3  # random but varied answers: a mix-up would show
    assert final == (tmp_path / "plain/predictions.csv").read_text()
