"""Golden renders of the shipped values files (tests/k8s/golden/<file>.yaml).

A template or values change shows up as a reviewable diff of the rendered manifests. Update with

    UPDATE_GOLDEN=1 pytest tests/k8s        (or: make -f mk/k8s.mk k8s-golden)
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path

import pytest

from k8s_helpers import VALUES_FILES, kt, values_id

UPDATE = os.environ.get("UPDATE_GOLDEN") == "1"


@pytest.mark.parametrize("path", VALUES_FILES, ids=values_id)
def test_golden_render(path: Path):
    golden = kt.golden_path(path)
    text = kt.golden_text(path)
    if UPDATE:
        golden.parent.mkdir(exist_ok=True)
        golden.write_text(text)
        return
    assert golden.exists(), f"no golden for {path.name}: run UPDATE_GOLDEN=1 pytest tests/k8s"
    old = golden.read_text()
    if old != text:
        diff = "".join(difflib.unified_diff(old.splitlines(True), text.splitlines(True), str(golden), "rendered", n=2))
        pytest.fail(f"{golden.name} differs from the render (UPDATE_GOLDEN=1 pytest tests/k8s if intended):\n"
                    f"{diff[:6000]}")


def test_no_orphan_goldens():
    wanted = {kt.golden_path(p) for p in VALUES_FILES}
    orphans = set(kt.GOLDEN_DIR.glob("*.yaml")) - wanted
    if UPDATE:
        for o in orphans:
            o.unlink()
        return
    assert not orphans, f"goldens without a values file: {sorted(o.name for o in orphans)}"
