"""Hardware profiles as the chart defines them (``profiles:`` in charts/values.yaml, overridable by a values
file), read by ``lora-exp plan`` to size runs without the chart: which profile each run gets, what memory
it has, and the training defaults it layers under ``experiment.defaults.training`` (as the chart does).

The chart's values.yaml is the one source of the profiles; in a pod the chart renders the profiles its
runs use into the spec ConfigMap (``profiles.yaml``), in the same layout.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lora_exp.config.loading import deep_merge, load_values, parse_yaml
from lora_exp.core.errors import SpecError

# The chart's values.yaml, next to the package in a checkout (LORA_EXP_CHART_VALUES names another).
CHART_VALUES = Path(__file__).resolve().parents[3] / "charts" / "values.yaml"
AUTO = "auto"
_UNITS = {"": 1, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


class HardwareProfile(BaseModel):
    """What the plan needs of a chart profile (the chart's schema closes the rest: tools/chart_schema.py)."""

    model_config = ConfigDict(extra="ignore")
    description: str = ""
    gpus: Annotated[int, Field(ge=0)]
    gpuMemoryGiB: Annotated[float, Field(ge=0)] = 0  # noqa: N815 - the chart's key
    costPerGpuHour: Annotated[float, Field(ge=0)] = 0  # noqa: N815 - the chart's key
    nodes: Annotated[int, Field(ge=1)] = 1
    resources: dict[str, Any] = {}
    training: dict[str, Any] = {}

    @property
    def device(self) -> str:
        return "gpu" if self.gpus else "cpu"

    @property
    def world_size(self) -> int:
        """Processes sharing the run's ZeRO state: one per GPU over all nodes."""
        return max(1, self.gpus) * self.nodes

    @property
    def capacity_mb(self) -> float:
        """Memory per device in MiB: a GPU's, or for a CPU profile the pod's memory limit (0: unknown)."""
        if self.gpus:
            return self.gpuMemoryGiB * 1024
        limit = (self.resources.get("limits") or {}).get("memory") or (self.resources.get("requests") or {}).get(
            "memory")
        return quantity_bytes(limit) / 2**20 if limit is not None else 0.0

    @property
    def size(self) -> tuple[float, int, str]:
        """Order of "smallest": total accelerator memory, then GPUs, then the description."""
        return (self.capacity_mb * (self.gpus or 1) * self.nodes, self.gpus * self.nodes, self.description)


def quantity_bytes(q: Any) -> float:
    """A Kubernetes quantity (16Gi, 512M, 1e9) in bytes."""
    m = re.fullmatch(r"([0-9.]+(?:e[0-9]+)?)([kMGT]i?)?", str(q))
    if not m:
        raise SpecError(f"not a Kubernetes memory quantity: {q!r}")
    return float(m.group(1)) * _UNITS[m.group(2) or ""]


class Profiles(BaseModel):
    """The profiles in force and which one each run gets (``profile``, ``job.runProfiles``)."""

    default: str
    per_run: dict[str, str]
    profiles: dict[str, HardwareProfile]
    source: str

    def name_for(self, run: str) -> str:
        return self.per_run.get(run.split("/seed-", 1)[0], self.default)

    def get(self, name: str) -> HardwareProfile:
        if name not in self.profiles:
            raise SpecError(f"profile {name!r} is not defined; profiles: {', '.join(sorted(self.profiles))} "
                            f"({self.source})")
        return self.profiles[name]


def chart_values_path() -> Path:
    return Path(os.environ.get("LORA_EXP_CHART_VALUES", CHART_VALUES))


def _read(path: Path) -> dict[str, Any]:
    try:
        doc = parse_yaml(path.read_text()) or {}
    except OSError as e:
        raise SpecError(f"{path}: cannot read the profiles ({e.strerror}); name a chart values file with "
                        "--profiles") from None
    if not isinstance(doc, dict):
        raise SpecError(f"{path}: not a values file")
    return doc


def load_profiles(values: str | os.PathLike[str], profiles_file: str | os.PathLike[str] | None = None) -> Profiles:
    """The chart's profiles (``profiles_file``, else the chart's values.yaml) with the values file's own
    ``profiles:``, ``profile:`` and ``job.runProfiles`` over them, as ``helm install -f values`` merges."""
    base_path = Path(profiles_file) if profiles_file else chart_values_path()
    base = _read(base_path)
    own = load_values(values)
    merged = deep_merge(base, {k: own[k] for k in ("profiles", "profile", "job") if k in own})
    raw = merged.get("profiles") or {}
    try:
        profiles = {name: HardwareProfile.model_validate(p) for name, p in raw.items()}
    except ValidationError as e:
        raise SpecError(f"{base_path}: profiles: {e.errors()[0]['loc']}: {e.errors()[0]['msg']}") from None
    job = merged.get("job") or {}
    return Profiles(default=str(merged.get("profile", "cpu")), per_run=dict(job.get("runProfiles") or {}),
                    profiles=profiles, source=str(base_path))
