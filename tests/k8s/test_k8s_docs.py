"""The README's "Run on Kubernetes" section stays true to the chart: the profiles table and the make targets."""

from __future__ import annotations

import re

from k8s_helpers import kt

README = (kt.REPO / "README.md").read_text()
DOC = README[README.index("## Run on Kubernetes"):README.index("## Development")]
MK = (kt.REPO / "mk" / "k8s.mk").read_text()


def table_rows() -> dict[str, list[str]]:
    rows = {}
    for line in DOC.splitlines():
        m = re.match(r"^\| `([a-z0-9-]+)` \|(.*)\|$", line)
        if m:
            rows[m.group(1)] = [c.strip() for c in m.group(2).split("|")]
    return rows


def test_profiles_table_matches_values_yaml(chart_values):
    rows = table_rows()
    profiles = chart_values["profiles"]
    assert set(rows) == set(profiles), "README profiles table is out of date"
    for name, p in profiles.items():
        gpus_nodes, product, cpu_mem, shm, precision, batch, ckpt, zero = rows[name]
        t = p["training"]
        assert gpus_nodes == f"{p['gpus']} × {p['nodes']}", name
        assert product.split()[0] == p["nodeSelector"].get("nvidia.com/gpu.product", "—"), name
        assert cpu_mem == f"{p['resources']['requests']['cpu']} / {p['resources']['requests']['memory']}", name
        assert shm == p["shmSize"] and precision == t["precision"], name
        assert batch == (f"{t['per_device_train_batch_size']}/{t['per_device_eval_batch_size']} × "
                         f"{t['gradient_accumulation_steps']}"), name
        assert ckpt == ("yes" if t["gradient_checkpointing"] else "no"), name
        assert zero.split()[0] == str(t["zero_stage"]) and ("offload" in zero) == t["zero_offload"], name


def test_documented_make_targets_exist():
    for target in set(re.findall(r"make -f mk/k8s\.mk ([a-z0-9-]+)", DOC)):
        assert re.search(rf"^{target}:", MK, re.M), target
    for target in ("k8s-test", "k8s-lint", "k8s-scan", "k8s-golden", "k8s-schema"):
        assert re.search(rf"^{target}:", MK, re.M), target
