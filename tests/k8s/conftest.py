"""Fixtures for the Kubernetes packaging tests (chart, images, cluster manifests).

Every render goes through the real Helm v4 engine (helm-python-sdk), values files are parsed the way
`helm -f` parses them, and every rendered object is validated against Kubernetes' strict schemas.
Helpers live in k8s_helpers.py and tools/k8s_tools.py (not here, so no other conftest can shadow them).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))  # the packaging tools

import k8s_tools as kt  # noqa: E402


@pytest.fixture(scope="session")
def chart_values() -> dict[str, Any]:
    return kt.chart_values()


@pytest.fixture(scope="session")
def render():
    """render(values, release=..., revision=...) -> list of objects (cached per call arguments)."""
    cache: dict[str, list[dict[str, Any]]] = {}

    def _render(values: dict[str, Any], *, release: str = "lora-exp", revision: int = 1) -> list[dict[str, Any]]:
        import json

        key = json.dumps([values, release, revision], sort_keys=True)
        if key not in cache:
            cache[key] = kt.render(values, release=release, revision=revision)
        return cache[key]

    return _render
