"""``lora-exp plan -f values.yaml [--run R] [--profile P]``: will each run fit its hardware, before it queues?

For each run: the estimated peak memory per device with its parts (``lora_exp.planning.memplan``: the model
built from its config on the meta device, no weights downloaded), the verdict against the run's own profile
(the chart's ``profile``/``job.runProfiles``, with the profile's training defaults layered under the
experiment's, as the chart renders them) with a safety margin, and the smallest profile that fits.

``--check`` first checks what ``lora-exp validate`` checks, then exits 2 when a run does not fit (the
chart's validate init container runs it, so a bad spec or a run that cannot fit fails before its GPU pod
starts). ``--auto FILE`` writes the smallest fitting profile of every
run as a values overlay (``profile`` and ``job.runProfiles``), the pre-install step of ``profile: auto``::

    lora-exp plan -f values/mnli.yaml --auto /tmp/profiles.yaml
    helm install mnli charts/ -f values/mnli.yaml -f /tmp/profiles.yaml
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from lora_exp.config.loading import add_spec_arguments, resolve_runs
from lora_exp.config.profiles import AUTO, HardwareProfile, Profiles, load_profiles
from lora_exp.core import allocator, errors, tags
from lora_exp.core.tables import text_table

if TYPE_CHECKING:
    from lora_exp.config.loading import Run
    from lora_exp.planning.memplan import MemoryPlan

log = logging.getLogger(__name__)

HELP = "estimate each run's peak GPU (or CPU) memory and judge it against its hardware profile"
DEFAULT_MARGIN = 0.10


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_spec_arguments(p)
    p.add_argument("--profile", help="judge every run against this profile instead of its own")
    p.add_argument("--profiles", help="the chart values file holding `profiles:` (default: charts/values.yaml; "
                   "in a pod, the chart's rendered profiles.yaml)")
    p.add_argument("--margin", type=float, default=DEFAULT_MARGIN,
                   help=f"headroom the estimate must leave, as a fraction (default {DEFAULT_MARGIN})")
    p.add_argument("--check", action="store_true", help="exit 2 when a run does not fit its profile")
    p.add_argument("--auto", metavar="FILE", help="write the smallest fitting profile of each run as a values "
                   "overlay for helm (-f FILE): the pre-install step of `profile: auto`")
    p.add_argument("--json", metavar="FILE", help="also write the plans (one object per run) as JSON to FILE")


class Planner:
    """Estimates per (run, profile), cached by what they depend on: the resolved spec and the device layout."""

    def __init__(self, values: str, run: str | None, overrides: list[str], profiles: Profiles) -> None:
        self.values, self.run, self.overrides, self.profiles = values, run, overrides, profiles
        self._cache: dict[str, MemoryPlan] = {}

    def runs(self, profile: HardwareProfile) -> list[Run]:
        """The runs as they would run on ``profile`` (its training defaults under the experiment's)."""
        return resolve_runs(self.values, self.run, self.overrides, under={"training": profile.training})

    def plan(self, run: Run, profile: HardwareProfile) -> MemoryPlan:
        from lora_exp.planning.memplan import estimate

        key = json.dumps([run.spec.model_dump(mode="json"), profile.device, profile.world_size], sort_keys=True)
        if key not in self._cache:
            self._cache[key] = estimate(run.spec, profile.device, gpus=profile.world_size,
                                        train=run.spec.job in tags.TRAINING_JOBS and run.spec.job != tags.DISTILL,
                                        allocator=allocator.of_cpu_jobs())
        return self._cache[key]

    def fits(self, plan: MemoryPlan, profile: HardwareProfile, margin: float) -> bool | None:
        """True/False; None where the profile does not say its memory (no gpuMemoryGiB, no memory limit)."""
        if profile.capacity_mb <= 0:
            return None
        return plan.peak_mb * (1 + margin) <= profile.capacity_mb

    def smallest(self, name: str, margin: float, device: str) -> str | None:
        """The smallest profile (by total accelerator memory) of ``device`` ("gpu"/"cpu") on which run ``name``
        fits: a run sized for GPUs is not sent to a CPU profile because its memory would hold it."""
        candidates = [kv for kv in self.profiles.profiles.items() if kv[1].device == device]
        for pname, profile in sorted(candidates, key=lambda kv: kv[1].size):
            run = next(r for r in self.runs(profile) if r.name == name)
            if self.fits(self.plan(run, profile), profile, margin):
                return pname
        return None


def main(args: argparse.Namespace) -> int:
    profiles = load_profiles(args.values, args.profiles)
    planner = Planner(args.values, args.run, args.overrides, profiles)
    rows: list[dict[str, Any]] = []
    chosen: dict[str, str | None] = {}
    failing: list[str] = []
    resolved = resolve_runs(args.values, args.run, args.overrides)
    if args.check:  # everything `lora-exp validate` checks comes first: the init container runs this alone
        from lora_exp.engine.preflight import preflight

        for run in resolved:
            log.info("run %s: spec ok; %s", run.name, "; ".join(preflight(run)))
    names = [r.name for r in resolved]
    for name in names:
        pname = args.profile or profiles.name_for(name)
        try:
            smallest = planner.smallest(name, args.margin, "gpu" if pname == AUTO else profiles.get(pname).device)
            if pname == AUTO:
                if smallest is None:
                    raise errors.UserError(f"run {name}: no profile fits it (profile: auto); lower the batch size "
                                           "or max_length, or turn on gradient checkpointing")
                pname = smallest
            profile = profiles.get(pname)
            run = next(r for r in planner.runs(profile) if r.name == name)
            plan = planner.plan(run, profile)
        except errors.SpecError:
            raise  # the spec or the profile is wrong: that is for the user to fix, as validate says
        except Exception as e:  # noqa: BLE001 - the plan must never be why a run that could start does not
            if not args.check:
                raise
            log.warning("run %s: no memory estimate (%s); not judged, the run goes ahead", name, e)
            rows.append({"run": name, "profile": pname, "verdict": "not estimated"})
            continue
        fits = planner.fits(plan, profile, args.margin)
        chosen[name] = smallest
        if fits is False:
            failing.append(name)
        unit = "GPU" if profile.gpus else "pod"
        verdict = {True: "fits", False: "DOES NOT FIT", None: "unknown capacity"}[fits]
        notes = list(plan.notes)
        if run.spec.sweep is not None:
            notes.append("a sweep: judged at its base spec, not at every trial's values")
        if run.spec.job == tags.DISTILL:
            notes.append("distill: the teacher's pass is estimated, not the student's training")
        log.info("run %s on %s (%s): peak %.0f MiB per %s of %.0f MiB with %d%% margin: %s; smallest fitting "
                 "profile: %s%s", name, pname, profile.description or pname, plan.peak_mb, unit,
                 profile.capacity_mb, round(100 * args.margin), verdict, smallest or "none",
                 "".join(f"; {n}" for n in notes))
        parts = {k: round(v) for k, v in plan.breakdown.items()}
        rows.append({"run": name, "job": run.spec.job, "profile": pname, "trainable": plan.trainable, **parts,
                     "peak MiB": round(plan.peak_mb), "capacity MiB": round(profile.capacity_mb), "verdict": verdict,
                     "smallest fit": smallest or "-"})
    print(text_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    if args.auto:
        # Runs pinned to a profile of their own (job.runProfiles) keep it; the others get their smallest fit.
        pinned = {n: p for n in names if (p := profiles.per_run.get(n.split("/seed-", 1)[0])) and p != AUTO}
        overlay = auto_overlay({n: pinned.get(n) or chosen.get(n) for n in names}, names)
        Path(args.auto).write_text(yaml.safe_dump(overlay, sort_keys=False))
        log.info("wrote %s: helm install ... -f %s -f %s", args.auto, args.values, args.auto)
    if args.check and failing:
        raise errors.UserError(f"{', '.join(failing)}: estimated peak memory does not fit the profile (with "
                               f"{round(100 * args.margin)}% margin; table above); pick a larger profile "
                               "(lora-exp plan --auto), or lower batch size / max_length, or turn on "
                               "gradient_checkpointing")
    return errors.OK


def auto_overlay(chosen: dict[str, str | None], names: list[str]) -> dict[str, Any]:
    """``profile`` = the most common choice, ``job.runProfiles`` for the runs that need another."""
    picks = [p for n in names if (p := chosen.get(n))]
    if len(picks) != len(names):
        missing = [n for n in names if not chosen.get(n)]
        raise errors.UserError(f"runs {missing}: no profile fits; nothing written")
    common = max(sorted(set(picks)), key=picks.count)
    runs = {n.split("/seed-", 1)[0]: p for n, p in chosen.items() if p != common}
    return {"profile": common, "job": {"runProfiles": runs}} if runs else {"profile": common}
