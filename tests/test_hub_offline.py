"""Whether the hub is off is what huggingface_hub and datasets themselves decide (their variables, their true
values, their precedence), never a parse of our own that could disagree with what the libraries then do."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from support import ROOT, run_cli, toy_rows, write_jsonl, write_values

CLEAN = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
                                                           "HF_DATASETS_OFFLINE")}
PROBE = ("import json, datasets.config, huggingface_hub.constants as c\n"
         "from lora_exp.core import hub\n"
         "print(json.dumps([hub.hub_offline(), hub.datasets_offline(), c.HF_HUB_OFFLINE,"
         " datasets.config.HF_HUB_OFFLINE]))\n")


@pytest.mark.parametrize(("env", "models_off", "data_off"), [
    ({}, False, False),
    ({"HF_HUB_OFFLINE": "1"}, True, True),
    ({"HF_HUB_OFFLINE": "YES"}, True, True),
    ({"HF_HUB_OFFLINE": "false"}, False, False),  # a hand parse once took any non-"0" text for offline
    ({"TRANSFORMERS_OFFLINE": "on"}, True, True),
    ({"HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "1"}, False, False),  # the first variable set decides
    ({"HF_DATASETS_OFFLINE": "1"}, False, True),
    ({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "0"}, True, False),
])
def test_offline_is_what_the_libraries_decide(env, models_off, data_off):
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120,
                          env={**CLEAN, "PYTHONPATH": str(ROOT / "jobs"), **env})
    assert proc.returncode == 0, proc.stderr
    ours_models, ours_data, lib_models, lib_data = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (ours_models, ours_data) == (lib_models, lib_data) == (models_off, data_off)


def test_validate_refuses_an_uncached_hub_model_only_when_the_hub_is_really_off(tmp_path):
    data = {"train": str(write_jsonl(tmp_path / "t.jsonl", toy_rows(8))),
            "validation": str(write_jsonl(tmp_path / "v.jsonl", toy_rows(4)))}
    values = write_values(tmp_path, {"experiment": {"name": "hub", "defaults": {
        "model": {"name": "nobody/no-such-model-here"},
        "task": {"name": "custom", "text_fields": ["text"], "labels": ["neg", "pos"]},
        "data": {"data_files": data}, "output_root": str(tmp_path / "out"),
        "tracking": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}}, "runs": {"lora": {}}}})
    env = {"HF_HOME": str(tmp_path / "hf"), "TRANSFORMERS_OFFLINE": "", "HF_DATASETS_OFFLINE": ""}
    off = run_cli("validate", "-f", str(values), env={**env, "HF_HUB_OFFLINE": "yes"}, timeout=120)
    assert off.returncode == 2 and "hub is off (HF_HUB_OFFLINE=yes)" in off.stderr + off.stdout
    on = run_cli("validate", "-f", str(values), env={**env, "HF_HUB_OFFLINE": "false"}, timeout=120)
    assert on.returncode == 0, on.stderr[-2000:]
    assert "checked when the job loads it" in on.stderr + on.stdout
