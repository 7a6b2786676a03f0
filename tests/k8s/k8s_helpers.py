"""Shared helpers of the Kubernetes packaging tests (imported by the test modules and conftest)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))  # the packaging tools

import k8s_tools as kt  # noqa: E402

# A small experiment owned by these tests (independent of the shipped values files): one train run and
# one eval run, with explicit training values that must beat every profile's defaults.
SYNTHETIC: dict[str, Any] = {
    "experiment": {
        "name": "k8s-test",
        "defaults": {
            "model": {"name": "sshleifer/tiny-gpt2", "max_length": 32},
            "task": {"name": "sst2"},
            "data": {"max_train_samples": 16, "max_eval_samples": 8},
            "training": {"max_steps": 2, "gradient_accumulation_steps": 3, "gradient_checkpointing": False,
                         "learning_rate": 3e-05},
        },
        "runs": {
            "lora_r8": {"method": {"name": "lora", "r": 8}},
            "baseline": {"job": "eval"},
        },
    }
}

VALUES_FILES = kt.shipped_values_files()
PROFILES = sorted(kt.chart_values()["profiles"])
MULTI_NODE = [p for p in PROFILES if kt.chart_values()["profiles"][p]["nodes"] > 1]


def values_id(p: Path) -> str:
    return p.name


def synthetic(**overrides: Any) -> dict[str, Any]:
    return kt.deep_merge(SYNTHETIC, overrides)


def jobs(objs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return kt.by_kind(objs, "Job")


def pod_specs(objs: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """(owner name, pod spec) of every pod template in the render."""
    out = []
    for o in objs:
        if o["kind"] in ("Job", "Deployment", "StatefulSet"):
            out.append((f"{o['kind']}/{o['metadata']['name']}", o["spec"]["template"]["spec"]))
        elif o["kind"] == "Pod":
            out.append((f"Pod/{o['metadata']['name']}", o["spec"]))
    return out


def container(job: dict[str, Any], name: str = "lora-exp") -> dict[str, Any]:
    spec = job["spec"]["template"]["spec"]
    return next(c for c in spec.get("containers", []) + spec.get("initContainers", []) if c["name"] == name)


def env_of(c: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in c.get("env", [])}


def cli_argv(c: dict) -> list[str]:
    """The lora-exp argv of a container: command+args without tini and the launcher in front."""
    argv = c.get("command", []) + c.get("args", [])
    assert argv[:2] == ["/usr/bin/tini", "--"], "tini must be PID 1"
    argv = argv[2:]
    if argv[0] == "lora-exp":
        return argv[1:]
    assert argv[0] == "torchrun", argv
    i = argv.index("-m")
    assert argv[i + 1] == "lora_exp", argv
    return argv[i + 2:]


def torchrun_opts(c: dict) -> dict[str, str]:
    argv = c["args"]
    if argv[0] != "torchrun":
        return {}
    opts = {}
    for a in argv[1: argv.index("-m")]:
        key, _, value = a.partition("=")
        opts[key] = value
    return opts
