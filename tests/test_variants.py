"""The adaptation variants researchers compare (issue 24), each a field of ``lora`` or a method of its own:
each trains a few steps of the real training path with pinned losses (a silent change in PEFT or in how the
variant is set up moves them), and its saved artifact, evaluated alone by an eval job, predicts exactly what
the run predicted at the end of training (PiSSA and OLoRA included: their adapter is converted to load onto
the original base)."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest

from lora_exp import cli
from lora_exp.config.loading import resolve_runs
from lora_exp.core import errors
from lora_exp.engine.fit import train_run
from support import assert_pinned_losses, experiment, mlflow_client, run_cli, write_values

STEPS = 4
VARIANTS: dict[str, dict[str, Any]] = {
    "lora": {"name": "lora", "r": 4},
    "dora": {"name": "lora", "r": 4, "use_dora": True},
    "rslora": {"name": "lora", "r": 4, "use_rslora": True},
    "pissa": {"name": "lora", "r": 4, "init": "pissa"},
    "olora": {"name": "lora", "r": 4, "init": "olora"},
    "patterns": {"name": "lora", "r": 4, "rank_pattern": {"down_proj": 8}, "alpha_pattern": {"down_proj": 4}},
    "loraplus": {"name": "lora", "r": 4, "loraplus_lr_ratio": 16},
    "ia3": {"name": "ia3"},
    "lokr": {"name": "lokr", "r": 4},
    "loha": {"name": "loha", "r": 4},
    "vera": {"name": "vera", "r": 16},
    "prefix_tuning": {"name": "prefix_tuning", "virtual_tokens": 4},
    "eva": {"name": "lora", "r": 4, "init": "eva"},
    "loftq": {"name": "qlora", "r": 4, "init": "loftq", "compute_dtype": "float32"},
}
PINNED: dict[str, list[float]] = {  # recorded with torch 2.13.0+cpu, transformers 5.23.0, peft 0.21.2
    "lora": [6.022285, 5.357453, 5.734472, 5.85821],
    "dora": [6.022285, 5.342797, 5.800964, 5.39341],
    "rslora": [6.022285, 5.338758, 5.768613, 5.527981],
    "pissa": [6.0197, 5.481581, 5.836482, 5.411705],
    "olora": [5.995522, 5.662753, 6.080416, 5.642014],
    "patterns": [6.022285, 5.603185, 5.94345, 5.389806],
    "loraplus": [6.022285, 5.341566, 5.724577, 5.397639],
    "ia3": [6.022285, 5.966105, 6.007954, 6.019508],
    "lokr": [6.022285, 5.601352, 5.881559, 5.609437],
    "loha": [6.022285, 5.836299, 5.950503, 5.778196],
    "vera": [6.022285, 5.947886, 5.999223, 5.994865],
    "prefix_tuning": [5.997199, 5.944897, 5.892787, 5.894491],
    "eva": [6.022285, 5.398412, 5.599513, 5.416553],
    "loftq": [6.047274, 5.692135, 5.670527, 5.285722],
}


def _values(tmp: Path, model: Path, toy_data: dict[str, str], variant: str) -> Path:
    doc = experiment(model, toy_data, tmp, formulation={"kind": "verbalizer"},
                     training={"max_steps": STEPS, "logging_steps": 1, "learning_rate": 2e-2,
                               "per_device_train_batch_size": 4, "eval_strategy": "no", "save_strategy": "no"},
                     runs={variant: {"method": VARIANTS[variant]},
                           "again": {"job": "eval",
                                     "eval": {"model_path": str(tmp / "outputs/toy" / variant / "final")}}})
    return write_values(tmp, doc)


def _predictions(path: Path) -> list[tuple[str, ...]]:
    with path.open() as fh:
        return [tuple(v for k, v in row.items() if k.startswith("score_") or k == "prediction")
                for row in csv.DictReader(fh)]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_each_variant_trains_pinned_and_its_artifact_predicts_as_the_run_did(variant, tmp_path, tiny_llama,
                                                                            toy_data, monkeypatch):
    monkeypatch.chdir(tmp_path)
    values = _values(tmp_path, tiny_llama, toy_data, variant)
    train_run(resolve_runs(values, variant)[0])
    assert_pinned_losses(tmp_path, variant, PINNED, STEPS)
    # The plan counts the parameters the run trained (from the method's apply on the meta device).
    assert cli.main(["plan", "-f", str(values), "--run", variant, "--json", str(tmp_path / "plan.json")]) == 0
    (planned,) = json.loads((tmp_path / "plan.json").read_text())
    client = mlflow_client(tmp_path)
    (mrun,) = client.search_runs([client.get_experiment_by_name("toy").experiment_id])
    assert planned["trainable"] == mrun.data.metrics["trainable_params"] > 0
    assert cli.main(["eval", "-f", str(values), "--run", "again"]) == errors.OK
    trained = _predictions(tmp_path / "outputs/toy" / variant / "eval/validation/predictions.csv")
    reloaded = _predictions(tmp_path / "outputs/toy/again/eval-job/validation/predictions.csv")
    assert [r[0] for r in reloaded] == [r[0] for r in trained]  # the same label predicted for every row
    for a, b in zip(trained, reloaded, strict=True):
        assert [float(x) for x in a[1:]] == pytest.approx([float(x) for x in b[1:]], abs=1e-4)
    assert cli.main(["generate", "--model-path", str(tmp_path / "outputs/toy" / variant / "final"), "--prompt",
                     "great", "--max-new-tokens", "4"]) == errors.OK
    _merged_export_predicts_as_the_adapter(tmp_path, tiny_llama, variant)


def _merged_export_predicts_as_the_adapter(tmp: Path, base: Path, variant: str) -> None:
    """``export --format merged``: the adapter merged into its base gives the adapter's logits (4-bit bases are
    merged unquantized, so only exported); a method with nothing to merge is refused, exit 2."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lora_exp.methods import get_method

    adapter, out = tmp / "outputs/toy" / variant / "final", tmp / "merged"
    code = cli.main(["export", "--model-path", str(adapter), "--out", str(out)])
    if not get_method(VARIANTS[variant]["name"]).mergeable:
        assert code == errors.USER_ERROR and not out.exists()
        return
    assert code == errors.OK
    if VARIANTS[variant]["name"] == "qlora":
        return
    ids = torch.arange(3, 19).reshape(2, 8)
    with torch.no_grad():
        want = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()(input_ids=ids)
        got = AutoModelForCausalLM.from_pretrained(out).eval()(input_ids=ids)
    torch.testing.assert_close(got.logits, want.logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(("method", "words"), [
    ({"name": "qlora", "init": "pissa"}, ("method.init", "loftq")),
    ({"name": "lora", "loraplus_lr_ratio": 0.5}, ("loraplus_lr_ratio",)),
    ({"name": "ia3", "feedforward_modules": ["down_proj"]}, ("method.feedforward_modules", "target_modules")),
    ({"name": "lora", "use_dorra": True}, ("use_dorra", "unknown key")),
    ({"name": "lokr", "on": "gpt2"}, ("method lokr", "Conv1D")),
    ({"name": "loha", "on": "gpt2"}, ("method loha", "Conv1D")),
    ({"name": "vera", "r": 0}, ("method", "r")),
    ({"name": "prefix_tuning", "packing": True}, ("training.packing", "prefix tuning")),
])
def test_a_variant_that_cannot_work_stops_in_validate(method, words, tmp_path, tiny_llama, tiny_gpt2, toy_data):
    model = tiny_gpt2 if method.pop("on", None) == "gpt2" else tiny_llama
    training = {"packing": method.pop("packing", False)}
    values = write_values(tmp_path, experiment(model, toy_data, tmp_path, training=training,
                                               runs={"v": {"method": method}}))
    proc = run_cli("validate", "-f", str(values), cwd=tmp_path, timeout=120)
    assert proc.returncode == errors.USER_ERROR, proc.stderr[-2000:]
    assert all(w in proc.stderr + proc.stdout for w in words), proc.stderr[-2000:]


def test_loftq_starts_nearer_the_full_precision_model_than_plain_qlora(tmp_path, tiny_llama, toy_data):
    """LoftQ's point: at step 0 the 4-bit model with its adapters predicts more like the unquantized model than
    the 4-bit model alone (QLoRA's default B = 0)."""
    import torch
    from transformers import AutoModelForCausalLM

    from lora_exp.engine.prepare import prepare

    runs = {init: {"method": {"name": "qlora", "r": 8, "init": init, "compute_dtype": "float32"}}
            for init in ("default", "loftq")}
    values = write_values(tmp_path, experiment(tiny_llama, toy_data, tmp_path, formulation={"kind": "verbalizer"},
                                               runs=runs))
    ids = torch.arange(3, 35).reshape(2, 16)
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)(input_ids=ids).logits
        error = {}
        for init in runs:
            model = prepare(resolve_runs(values, init)[0]).model.eval()
            error[init] = (model(input_ids=ids).logits.float() - want).pow(2).mean().item()
    print(error)
    assert error["loftq"] < 0.8 * error["default"]


def test_eva_starts_from_the_directions_the_training_inputs_vary_most_in(tmp_path, tiny_llama, toy_data):
    """EVA's A: orthonormal rows spanning where a layer's inputs on the training data vary most, so more of
    their variance than a random subspace of the same rank (the default init's A is neither)."""
    import torch

    from lora_exp.engine.prepare import _batches, prepare

    values = write_values(tmp_path, experiment(tiny_llama, toy_data, tmp_path, formulation={"kind": "verbalizer"},
                                               runs={"eva": {"method": {"name": "lora", "r": 4, "init": "eva"}}}))
    p = prepare(resolve_runs(values, "eva")[0])
    layer = p.model.base_model.model.model.layers[0].self_attn.q_proj
    seen: list[torch.Tensor] = []
    hook = layer.register_forward_hook(lambda _m, args, _out: seen.append(args[0].detach()))
    with torch.no_grad():
        for batch in _batches(p.train_ds, p.form, 8):
            p.model(**{k: v for k, v in batch.items() if k != "labels"})
            seen[-1] = seen[-1][batch["attention_mask"].bool()]
    hook.remove()
    inputs = torch.cat(seen)
    inputs = inputs - inputs.mean(dim=0)
    a = layer.lora_A["default"].weight.detach()
    torch.testing.assert_close(a @ a.T, torch.eye(4), atol=1e-4, rtol=0)
    captured = (inputs @ a.T).pow(2).sum() / inputs.pow(2).sum()
    random = torch.linalg.qr(torch.randn(a.shape[1], 4, generator=torch.Generator().manual_seed(0)))[0]
    assert captured > 2 * (inputs @ random).pow(2).sum() / inputs.pow(2).sum()
