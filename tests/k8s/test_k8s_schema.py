"""charts/values.schema.json: closed (additionalProperties: false) and its experiment part is exactly
`lora-exp schema` (regenerate with make -f mk/k8s.mk k8s-schema)."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import referencing

from k8s_helpers import VALUES_FILES, kt, synthetic, values_id

COMMITTED = json.loads(kt.SCHEMA.read_text())


def test_experiment_part_is_lora_exp_schema():
    expected = kt.lora_exp_schema()
    actual = dict(COMMITTED["properties"]["experiment"])
    assert actual.pop("$id") == kt.EXPERIMENT_SCHEMA_ID
    assert actual == expected, "charts/values.schema.json is stale: run make -f mk/k8s.mk k8s-schema"


def test_committed_file_is_what_the_generator_writes():
    assert kt.SCHEMA.read_text() == kt.schema_text(kt.generated_schema())


def test_schema_is_closed_everywhere():
    """Every object schema of the chart part forbids unknown keys (typos fail at install time)."""

    def walk(node, path):
        if isinstance(node, dict):
            if node.get("type") == "object" and "properties" in node:
                assert node.get("additionalProperties") is False, path
            for k, v in node.items():
                if path.endswith("/properties") and k == "experiment":
                    continue  # lora-exp's own schema, checked above
                walk(v, f"{path}/{k}")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{path}/{i}")

    assert COMMITTED["additionalProperties"] is False
    walk(COMMITTED, "#")
    assert COMMITTED["properties"]["experiment"]["additionalProperties"] is False


def test_chart_part_lists_every_default_value():
    assert set(kt.chart_values()) <= set(COMMITTED["properties"])


def _python_validator():
    return jsonschema.Draft202012Validator(COMMITTED, registry=referencing.Registry())


@pytest.mark.parametrize("path", VALUES_FILES, ids=values_id)
def test_values_files_validate_with_a_second_implementation(path: Path):
    """Helm's validator accepts them (they render); Python's jsonschema agrees with the merged values."""
    merged = kt.chart().merge_values(kt.values_file(path))
    errors = [e.message for e in _python_validator().iter_errors(merged)]
    assert not errors


@pytest.mark.parametrize(
    ("overrides", "where"),
    [
        ({"profil": "cpu"}, "profil"),
        ({"job": {"backofLimit": 1}}, "backofLimit"),
        ({"profiles": {"cpu": {"gpu": 1}}}, "gpu"),
        ({"experiment": {"runs": {"x": {"trainning": {}}}}}, "trainning"),
        ({"experiment": {"defaults": {"training": {"precision": "fp8"}}}}, "precision"),
        ({"torchrun": {"rdzvBackend": "etcd"}}, "rdzvBackend"),
    ],
)
def test_typos_fail_the_install(overrides, where):
    import helm_python

    with pytest.raises(helm_python.HelmValuesError) as err:
        kt.render(synthetic(**overrides))
    assert where in str(err.value)
