"""What lora-exp does differently on a GPU, checked where it can be on a CPU: the final evaluation's plain
forward (LoRA merged, weights stored for autocast), cuDNN attention turned off for SDPA, and regional
compilation of the repeated blocks (docs/benchmarks-gpu.md)."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from test_throughput import prepared

from lora_exp.engine.evaluation import evaluate_splits, ready_for_inference
from lora_exp.engine.trainer import repeated_blocks
from lora_exp.tracking.spool import Tracker


@pytest.mark.parametrize("formulation", ["classifier", "verbalizer"])
def test_final_evaluation_merges_lora_and_predicts_what_the_adapted_model_did(formulation, tiny_llama, tmp_path):
    from peft.tuners.lora import LoraLayer

    p, trainer = prepared(tiny_llama, tmp_path, formulation, max_steps=3, learning_rate=5e-2)
    trainer.train()  # adapters away from their zero start: merging them changes the weights
    data = p.form.tokenize(p.evals_raw["validation"])
    before = trainer.predict(data).predictions
    assert any(isinstance(m, LoraLayer) for m in trainer.model.modules())
    metrics = evaluate_splits(trainer, p.form, p.evals_raw, tmp_path / "eval", Tracker(None))
    assert not any(isinstance(m, LoraLayer) for m in trainer.model.modules())  # the final evaluation merged them
    assert not any(prm.requires_grad for prm in trainer.model.parameters())
    rows = list(csv.DictReader((tmp_path / "eval/validation/predictions.csv").open()))
    scores = np.array([[float(r[k]) for k in r if k.startswith("score_")] for r in rows])
    np.testing.assert_allclose(scores, before, atol=1e-4, rtol=1e-4)  # what the adapted model predicted
    assert metrics["validation_accuracy"] == pytest.approx(float(np.mean(
        p.form.gold(trainer.predict(data).label_ids) == before.argmax(axis=1))))
    assert ready_for_inference(trainer) == []  # once merged, nothing more to do (fp32: no dtype to store)


def test_final_evaluation_of_a_bf16_full_fine_tune_stores_weights_as_autocast_casts_them(tiny_llama, toy_data,
                                                                                         tmp_path):
    from lora_exp.config.loading import resolve_runs
    from lora_exp.engine.prepare import prepare
    from lora_exp.engine.trainer import build_trainer
    from lora_exp.tracking.spool import Tracker
    from support import experiment, write_values

    doc = experiment(tiny_llama, toy_data, tmp_path, runs={"full": {"method": {"name": "full"}}})
    (run,) = resolve_runs(write_values(tmp_path, doc), None, {})
    p = prepare(run)
    trainer, _ = build_trainer(run.spec, p.model, p.form, p.tokenizer, tmp_path / "out", p.train_ds, None,
                               Tracker(None))
    trainer.args.bf16 = True  # as a bf16 run: autocast around every forward
    batch = p.form.collator()([p.train_ds[i] for i in range(4)])
    model = trainer.model.eval()
    assert all(prm.requires_grad for prm in model.parameters())
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        before = model(**batch).logits
        done = ready_for_inference(trainer)
        after = model(**batch).logits
    assert done == ["matmul weights stored in bfloat16"]
    assert any(prm.dtype == torch.bfloat16 for prm in model.parameters())
    assert torch.equal(before, after)  # bit-identical: the casts autocast made on every call, made once


def test_cudnn_attention_is_turned_off_for_sdpa_on_a_gpu(monkeypatch):
    from lora_exp.engine import models

    was = torch.backends.cuda.cudnn_sdp_enabled()
    try:
        torch.backends.cuda.enable_cudnn_sdp(True)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        assert not models.avoid_cudnn_attention("sdpa") and torch.backends.cuda.cudnn_sdp_enabled()
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        assert not models.avoid_cudnn_attention("eager") and torch.backends.cuda.cudnn_sdp_enabled()
        assert models.avoid_cudnn_attention("sdpa") and not torch.backends.cuda.cudnn_sdp_enabled()
        assert not models.avoid_cudnn_attention("sdpa")  # once is enough
    finally:
        torch.backends.cuda.enable_cudnn_sdp(was)


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_gpt2"])
def test_repeated_blocks_are_the_transformer_layers(arch, request, tmp_path):
    p, trainer = prepared(request.getfixturevalue(arch), tmp_path, "classifier")
    blocks = repeated_blocks(trainer.model)
    assert len(blocks) == p.model.config.num_hidden_layers == 2
    assert {type(b).__name__ for b in blocks} <= {"LlamaDecoderLayer", "GPT2Block"}


@pytest.mark.slow
def test_torch_compile_compiles_the_blocks_in_place_and_evaluates_eagerly(tiny_llama, tmp_path):
    p, trainer = prepared(tiny_llama, tmp_path, "verbalizer", max_steps=3, torch_compile=True,
                          per_device_train_batch_size=4)
    names = [n for n, _ in trainer.model.named_parameters()]
    result = trainer.train()
    assert trainer.compiled == 2 and np.isfinite(result.training_loss)
    assert [n for n, _ in trainer.model.named_parameters()] == names  # state dict keys unchanged
    pred = trainer.predict(p.val_ds)
    assert pred.predictions.shape == (len(p.val_ds), len(p.form.first_ids))
