"""The adaptation variants researchers compare (issue 24), each a field of ``lora`` or a method of its own:
each trains a few steps of the real training path with pinned losses (a silent change in PEFT or in how the
variant is set up moves them), and its saved artifact, evaluated alone by an eval job, predicts exactly what
the run predicted at the end of training (PiSSA and OLoRA included: their adapter is converted to load onto
the original base)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import pytest

from lora_exp import cli
from lora_exp.config.loading import resolve_runs
from lora_exp.core import errors
from lora_exp.engine.fit import train_run
from support import assert_pinned_losses, experiment, run_cli, write_values

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
    assert cli.main(["eval", "-f", str(values), "--run", "again"]) == errors.OK
    trained = _predictions(tmp_path / "outputs/toy" / variant / "eval/validation/predictions.csv")
    reloaded = _predictions(tmp_path / "outputs/toy/again/eval-job/validation/predictions.csv")
    assert [r[0] for r in reloaded] == [r[0] for r in trained]  # the same label predicted for every row
    for a, b in zip(trained, reloaded, strict=True):
        assert [float(x) for x in a[1:]] == pytest.approx([float(x) for x in b[1:]], abs=1e-4)
    gen = run_cli("generate", "--model-path", str(tmp_path / "outputs/toy" / variant / "final"), "--prompt",
                  "great", "--max-new-tokens", "4", cwd=tmp_path, timeout=300)
    assert gen.returncode == 0, gen.stderr[-2000:]


@pytest.mark.parametrize(("method", "words"), [
    ({"name": "qlora", "init": "pissa"}, ("method.init", "4 bits")),
    ({"name": "lora", "loraplus_lr_ratio": 0.5}, ("loraplus_lr_ratio",)),
    ({"name": "ia3", "feedforward_modules": ["down_proj"]}, ("method.feedforward_modules", "target_modules")),
    ({"name": "lora", "use_dorra": True}, ("use_dorra", "unknown key")),
])
def test_a_variant_that_cannot_work_stops_in_validate(method, words, tmp_path, tiny_llama, toy_data):
    values = write_values(tmp_path, experiment(tiny_llama, toy_data, tmp_path, runs={"v": {"method": method}}))
    proc = run_cli("validate", "-f", str(values), cwd=tmp_path, timeout=120)
    assert proc.returncode == errors.USER_ERROR, proc.stderr[-2000:]
    assert all(w in proc.stderr + proc.stdout for w in words), proc.stderr[-2000:]
