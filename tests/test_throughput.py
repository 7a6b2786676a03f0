"""The speed features change how a batch is computed, never what it computes: padding-free (packed) batches
and logits only at the scored positions give the padded, full-logits path's losses, gradients and scores."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from lora_exp.config.loading import resolve_runs
from lora_exp.core.errors import SpecError
from lora_exp.engine.prepare import prepare
from lora_exp.engine.trainer import build_trainer
from lora_exp.tracking.spool import Tracker
from support import experiment, run_cli, text_rows, toy_rows, write_jsonl, write_values


def prepared(model: Path, tmp: Path, formulation: str, model_fields: dict[str, Any] | None = None,
             method: dict[str, Any] | None = None, **training: Any) -> tuple[Any, Any]:
    """A tiny run of the toy task, prepared as the training path prepares it (fp32: exact comparisons)."""
    rows = toy_rows(24, seed=3)
    for i, r in enumerate(rows):  # mixed lengths, so padding really happens
        r["text"] = r["text"] + " filler" * (i % 7)
    data = {"train": str(write_jsonl(tmp / "train.jsonl", rows)),
            "validation": str(write_jsonl(tmp / "val.jsonl", rows[:8]))}
    form: dict[str, Any] = {"kind": formulation, "template": "Text: {text}"}
    if formulation == "verbalizer":  # multi-token label words: the answer spans several positions
        form["verbalizers"] = {"neg": " awful terrible", "pos": " great wonderful"}
    doc = experiment(model, data, tmp, formulation=form, training={"precision": "fp32", **training})
    doc["experiment"]["defaults"]["model"].update(model_fields or {})
    doc["experiment"]["defaults"]["method"] = method or {"name": "lora"}
    (run,) = resolve_runs(write_values(tmp, doc), None, {})
    p = prepare(run)
    trainer, _ = build_trainer(run.spec, p.model, p.form, p.tokenizer, tmp / "out", p.train_ds, p.val_ds,
                               Tracker(None))
    return p, trainer


def loss_and_grads(trainer: Any, batch: dict[str, Any]) -> tuple[float, dict[str, torch.Tensor]]:
    model = trainer.model
    model.zero_grad()
    items = trainer._get_num_items_in_batch([batch], torch.device("cpu"))
    loss = trainer.compute_loss(model, batch, num_items_in_batch=items)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.item(), grads


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("formulation", ["classifier", "verbalizer"])
@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_gpt2"])
def test_packed_batches_give_the_padded_loss_and_gradients(attention, formulation, arch, request, tmp_path):
    p, trainer = prepared(request.getfixturevalue(arch), tmp_path, formulation, packing=True,
                          model_fields={"attn_implementation": attention})
    features = [p.train_ds[i] for i in range(8)]
    assert len({len(f["input_ids"]) for f in features}) > 3  # mixed lengths
    padded = p.form.collator()(features)
    packed = trainer.train_collator(features)
    assert packed["input_ids"].shape[0] == 1 and "attention_mask" not in packed
    assert packed["input_ids"].shape[1] == sum(len(f["input_ids"]) for f in features)  # no pad token anywhere
    assert padded["input_ids"].numel() > packed["input_ids"].numel()

    trainer.model.eval()  # no dropout: the two paths see the same network
    loss_padded, grads_padded = loss_and_grads(trainer, padded)
    loss_packed, grads_packed = loss_and_grads(trainer, packed)
    assert loss_packed == pytest.approx(loss_padded, abs=1e-4)
    assert grads_padded.keys() == grads_packed.keys() and grads_padded
    for name, g in grads_padded.items():
        torch.testing.assert_close(grads_packed[name], g, atol=1e-4, rtol=1e-3)

    # The scores too: each example's, in order (classifier: the head at each example's last token).
    with torch.no_grad():
        _, out_padded = trainer.compute_loss(trainer.model, padded, return_outputs=True)
        scorer = trainer.form.scorer(True)
        _, scores_packed = scorer(trainer.model, packed, None)
    logits = out_padded["logits"]
    scores_padded = logits if formulation == "verbalizer" else p.form.preprocess_logits(logits, padded["labels"])
    torch.testing.assert_close(scores_packed.float(), scores_padded.float(), atol=1e-4, rtol=1e-4)


def test_packed_training_runs_and_learns(tiny_llama, tmp_path):
    p, trainer = prepared(tiny_llama, tmp_path, "verbalizer", packing=True, epochs=2)
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["input_ids"].shape[0] == 1 and "position_ids" in batch  # the training loader packs
    assert "attention_mask" in next(iter(trainer.get_eval_dataloader()))  # evaluation stays padded
    result = trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert np.isfinite(result.training_loss) and losses[-1] < losses[0]


def full_logits_scores(form: Any, model: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """What scoring was before: the LM's loss over full (batch x length x vocab) logits, then the first label
    token's log-probabilities at its position."""
    out = model(**batch)
    labels = batch["labels"]
    answer = (labels != -100).int().argmax(dim=1)
    rows = torch.arange(labels.shape[0])
    at = out.logits[rows, answer - 1].float().log_softmax(dim=-1)
    return out.loss, at[:, torch.tensor(form.first_ids)]


# Prefix tuning: its prefixes are attention context, and the scored positions must still be the answer's.
@pytest.mark.parametrize("method", ["lora", "prefix_tuning"])
@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_gpt2"])
def test_verbalizer_scores_only_label_positions_with_the_full_logits_results(arch, method, request, tmp_path):
    p, trainer = prepared(request.getfixturevalue(arch), tmp_path, "verbalizer", method={"name": method})
    batch = p.form.collator()([p.train_ds[i] for i in range(8)])
    model = trainer.model.eval()
    seen: list[tuple[int, ...]] = []
    head = model.get_output_embeddings()
    handle = head.register_forward_hook(lambda _m, _i, out: seen.append(tuple(out.shape)))
    with torch.no_grad():
        loss, scores = p.form.scored_forward(model, batch, None)
        handle.remove()
        want_loss, want_scores = full_logits_scores(p.form, model, batch)
    assert min(len(ids) for ids in p.form.word_ids) > 1
    # Vocabulary rows only at the label positions: the longest label word's count per row, a fixed shape (no
    # shape that the host must read back from the GPU), not a row per position.
    assert seen[0][:2] == (8, p.form.longest_word) and p.form.longest_word < batch["input_ids"].shape[1]
    assert loss.item() == pytest.approx(want_loss.item(), abs=1e-5)
    torch.testing.assert_close(scores, want_scores, atol=1e-5, rtol=1e-5)
    # And the Trainer's evaluation returns exactly these scores.
    pred = trainer.predict(p.val_ds)
    assert pred.predictions.shape == (len(p.val_ds), len(p.form.first_ids))


def test_packing_is_refused_where_it_cannot_apply(tiny_llama, toy_data, tmp_path):
    from lora_exp.config.schema import RunSpec

    with pytest.raises(ValueError, match="packing"):
        RunSpec.model_validate({"model": {"name": "m"}, "task": {"name": "custom", "labels": ["a", "b"]},
                                "job": "distill", "training": {"packing": True},
                                "distill": {"teacher": {"model_path": "x"}}})
    doc = experiment(tiny_llama, toy_data, tmp_path, training={"packing": True})
    doc["experiment"]["defaults"]["task"] = {"name": "squad_v2"}
    with pytest.raises(SpecError, match="training.packing"):
        resolve_runs(write_values(tmp_path, doc), None, {})


@pytest.mark.parametrize("setting", [{"training": {"liger_kernels": True}},
                                     {"model": {"attn_implementation": "flash_attention_2"}}])
def test_gpu_kernels_stop_in_validate_without_their_package_or_gpu(setting, tiny_llama, toy_data, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    doc = experiment(tiny_llama, toy_data, tmp_path)
    for section, fields in setting.items():
        doc["experiment"]["defaults"][section].update(fields)
    values = write_values(tmp_path, doc)
    proc = run_cli("validate", "-f", str(values))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    field = "training.liger_kernels" if "training" in setting else "model.attn_implementation flash_attention_2"
    assert field in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    assert not (tmp_path / "outputs").exists()


@pytest.mark.parametrize("formulation", ["classifier", "verbalizer"])
def test_evaluation_sorted_by_length_predicts_what_the_unsorted_pass_does(formulation, tiny_llama, tmp_path):
    from lora_exp.formulations.class_scores import predict_by_length

    p, trainer = prepared(tiny_llama, tmp_path, formulation, per_device_eval_batch_size=3)
    trainer.model.eval()
    data = p.form.tokenize(p.evals_raw["validation"])
    lengths = [len(ids) for ids in data["input_ids"]]
    assert lengths != sorted(lengths, reverse=True)  # the split is not already in that order
    plain = trainer.predict(data)
    # Row i's prediction is row i's: the Trainer (which length-groups training batches) predicts in order.
    with torch.no_grad():
        direct = [trainer.compute_loss(trainer.model, p.form.collator()([data[i]]), return_outputs=True)[1]["logits"]
                  for i in range(3)]
    direct = [p.form.preprocess_logits(d, None) for d in direct]
    np.testing.assert_allclose(plain.predictions[:3], torch.cat(direct).numpy(), atol=1e-5)
    scores, label_ids, _ = predict_by_length(trainer, data, "validation")
    np.testing.assert_allclose(scores, plain.predictions, atol=1e-5)
    np.testing.assert_array_equal(p.form.gold(label_ids), p.form.gold(plain.label_ids))


def test_precision_auto_uses_cpu_bf16_units_where_there_are_some(tiny_llama, tmp_path, monkeypatch):
    from lora_exp.engine import trainer as tr

    real = tr.cpu_bf16()
    monkeypatch.setattr(tr, "_cuda", lambda: False)
    monkeypatch.setattr(tr, "cpu_bf16", lambda: True)
    assert (tr.resolve_precision("auto"), tr.resolve_precision("bf16"), tr.resolve_precision("fp16")) == (
        "bf16", "bf16", "fp32")
    monkeypatch.setattr(tr, "cpu_bf16", lambda: False)
    assert (tr.resolve_precision("auto"), tr.resolve_precision("bf16")) == ("fp32", "fp32")
    if not real:
        pytest.skip("this CPU has no bf16 units")
    monkeypatch.setattr(tr, "cpu_bf16", lambda: True)
    p, trainer = prepared(tiny_llama, tmp_path, "classifier", precision="auto", max_steps=3)
    assert trainer.args.bf16 and trainer.args.use_cpu
    seen: list[torch.dtype] = []
    mlp = next(m for n, m in p.model.named_modules() if n.endswith("layers.0.mlp.down_proj"))
    handle = mlp.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    result = trainer.train()
    handle.remove()
    assert seen and set(seen) == {torch.bfloat16}  # the matmuls ran in bf16 (autocast)
    assert np.isfinite(result.training_loss)


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_gpt2"])
def test_frozen_weights_precast_to_bf16_change_no_output(arch, request, tmp_path):
    """bf16 autocast casts each matmul's weight anyway: storing frozen weights in bf16 changes no number."""
    from lora_exp.methods.weights import precast_frozen_weights

    p, trainer = prepared(request.getfixturevalue(arch), tmp_path, "verbalizer")
    model = trainer.model.eval()
    batch = p.form.collator()([p.train_ds[i] for i in range(6)])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        before = model(**batch).logits
        cast = precast_frozen_weights(model, torch.bfloat16)
        after = model(**batch).logits
    assert cast >= 2 * 4  # every layer's frozen projections
    assert all(prm.dtype == torch.float32 for prm in model.parameters() if prm.requires_grad)
    emb = model.get_input_embeddings().weight
    assert emb.dtype == torch.float32  # embeddings (and a head tied to them) keep their precision
    assert torch.equal(before, after)


def test_every_forward_of_a_bf16_run_is_autocast(tiny_llama, tmp_path):
    """Frozen weights stored in bf16 need bf16 inputs: forwards that accelerate has not wrapped yet (sanity's
    gradient check, before train) or that bypass its wrapper (generation on the unwrapped model) too."""
    from lora_exp.engine.trainer import cpu_bf16

    if not cpu_bf16():
        pytest.skip("this CPU has no bf16 units")
    p, trainer = prepared(tiny_llama, tmp_path / "cls", "classifier", precision="bf16")
    assert any(prm.dtype == torch.bfloat16 for prm in p.model.parameters())  # precast
    loss = trainer.compute_loss(trainer.model, p.form.collator()([p.train_ds[i] for i in range(4)]))
    assert torch.isfinite(loss)

    data = {"train": str(write_jsonl(tmp_path / "lm/train.jsonl", text_rows(20))),
            "validation": str(write_jsonl(tmp_path / "lm/val.jsonl", text_rows(6)))}
    doc = experiment(tiny_llama, data, tmp_path / "lm", training={"precision": "bf16"},
                     eval={"generation_samples": 2, "prompt_tokens": 4, "max_new_tokens": 3})
    doc["experiment"]["defaults"]["task"] = {"name": "wikitext"}
    doc["experiment"]["defaults"]["model"]["max_length"] = 16
    (run,) = resolve_runs(write_values(tmp_path / "lm", doc), None, {})
    lm = prepare(run)
    lm_trainer, _ = build_trainer(run.spec, lm.model, lm.form, lm.tokenizer, tmp_path / "lm/out", lm.train_ds,
                                  None, Tracker(None))
    samples = lm.form.generate(lm_trainer, lm.form.tokenize(lm.evals_raw["validation"]))
    assert len(samples) == 2 and all(isinstance(s[2], str) for s in samples)
