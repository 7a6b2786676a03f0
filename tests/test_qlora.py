"""QLoRA on CPU (bitsandbytes 0.50 runs 4-bit layers there): the base is 4-bit, the LoRA weights fp32."""

from __future__ import annotations

import pytest

from lora_exp.config.loading import resolve_runs
from lora_exp.engine.prepare import prepare
from lora_exp.engine.trainer import build_trainer
from lora_exp.tracking.spool import Tracker
from support import experiment, mlflow_client, write_values

bnb = pytest.importorskip("bitsandbytes")


def test_qlora_trains_lora_over_4bit_base(tmp_path, tiny_llama, toy_data):
    values = write_values(tmp_path, experiment(tiny_llama, toy_data, tmp_path, runs={"qlora": {
        "method": {"name": "qlora", "r": 4, "alpha": 8},
        "training": {"gradient_checkpointing": True, "max_steps": 6, "save_strategy": "no", "eval_strategy": "no"},
    }}))
    (run,) = resolve_runs(values)
    p = prepare(run)

    base_linears = [m for n, m in p.model.named_modules() if n.endswith("q_proj.base_layer")]
    assert base_linears and all(isinstance(m, bnb.nn.Linear4bit) for m in base_linears)
    assert base_linears[0].weight.quant_state.quant_type == "nf4"
    assert base_linears[0].weight.dtype.itemsize == 1  # packed uint8: two 4-bit values per byte
    trainable = {n: prm for n, prm in p.model.named_parameters() if prm.requires_grad}
    assert trainable and all(("lora_" in n or "score" in n) for n in trainable)
    assert all(prm.dtype.is_floating_point and prm.dtype.itemsize == 4 for n, prm in trainable.items() if "lora_" in n)

    before = {n: prm.detach().clone() for n, prm in trainable.items() if "lora_B" in n}
    trainer, _ = build_trainer(run.spec, p.model, p.form, p.tokenizer, run.output_dir, p.train_ds, None,
                               tracker=Tracker(None))
    trainer.train()
    after = dict(p.model.named_parameters())
    assert any(not after[n].detach().equal(b) for n, b in before.items())  # the adapters learned


def test_qlora_end_to_end_artifact_is_adapter_only(tmp_path, tiny_gpt2, toy_data):
    from support import run_cli

    values = write_values(tmp_path, experiment(tiny_gpt2, toy_data, tmp_path, runs={"qlora": {
        "method": {"name": "qlora", "r": 2, "target_modules": ["c_attn"]}}}))
    proc = run_cli("train", "-f", str(values), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    client = mlflow_client(tmp_path)
    (run,) = client.search_runs([client.get_experiment_by_name("toy").experiment_id])
    assert run.data.tags["method"] == "qlora" and run.data.params["method.quant_type"] == "nf4"
    names = {f.path.split("/")[-1] for f in client.list_artifacts(run.info.run_id, "model")}
    assert "adapter_model.safetensors" in names and "model.safetensors" not in names
    assert "validation_accuracy" in run.data.metrics


