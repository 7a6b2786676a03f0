"""templates/configmap-spec.yaml: the spec the Jobs read is the values file's experiment, accepted by
`lora-exp validate`, with the profile's training defaults layered under the experiment's own values."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from k8s_helpers import PROFILES, SYNTHETIC, VALUES_FILES, jobs, kt, synthetic, values_id
from lora_exp.config.loading import resolve_runs

LORA_EXP = [str(Path(sys.executable).with_name("lora-exp"))]
PROFILES_KEY = "profiles.yaml"


def spec_files(objs, tmp_path: Path, profiles: bool = False) -> dict[str, Path]:
    """Write the ConfigMap's spec files to disk, as the pod sees them under /etc/lora-exp (``profiles``: and
    profiles.yaml, the profiles the init container's memory plan reads)."""
    (cm,) = kt.by_kind(objs, "ConfigMap")
    out = {}
    for key, text in cm["data"].items():
        if key == PROFILES_KEY and not profiles:
            continue
        p = tmp_path / key
        p.write_text(text)
        out[key] = p
    return out


def validate(path: Path, run: str | None = None) -> tuple[int, list[str]]:
    """`lora-exp validate` as the init container runs it, from the repo root (the image's WORKDIR holds
    the same relative data/ tree). Returns the exit code and the messages, file names blanked."""
    cmd = [*LORA_EXP, "validate", "-f", str(path), "--set", "output_root=/outputs"]
    if run:
        cmd += ["--run", run]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=kt.REPO, timeout=120)
    lines = [re.sub(r"^\S+ (INFO|WARNING|ERROR) lora_exp: ", "", line) for line in proc.stdout.splitlines()]
    return proc.returncode, [line.replace(str(path), "<file>") for line in lines]


@pytest.mark.parametrize("path", VALUES_FILES, ids=values_id)
def test_configmap_spec_passes_lora_exp_validate(path: Path, render, tmp_path: Path):
    values = kt.values_file(path)
    objs = render(values, release=path.stem)
    files = spec_files(objs, tmp_path)
    assert len(files) == len(resolve_runs(path))  # one file per run (per repeat of a repeated run)
    skipped = []
    for job in jobs(objs):
        run = job["metadata"]["annotations"]["lora-exp.io/run-name"]
        key = job["spec"]["template"]["spec"]["containers"][0]["args"][3].rsplit("/", 1)[1]
        rc, msgs = validate(files[key], run)
        src_rc, src_msgs = validate(path, run)
        if src_rc != 0:
            # The source itself does not validate in this checkout (e.g. a local model directory that
            # `make demo` prepares): the chart must then report exactly the same problem.
            assert (rc, msgs) == (src_rc, src_msgs)
            skipped.append(f"{run}: {src_msgs[-1] if src_msgs else src_rc}")
            continue
        assert rc == 0, "\n".join(msgs)
        # Same run, same data verdict as validating the values file directly.
        assert [re.sub(r"\(.*?\)", "", m) for m in msgs] == [re.sub(r"\(.*?\)", "", m) for m in src_msgs]
    if skipped:
        pytest.skip(f"{path.name} does not validate here either: {'; '.join(skipped)}")


@pytest.mark.parametrize("path", VALUES_FILES, ids=values_id)
def test_configmap_spec_resolves_to_the_values_file_runs(path: Path, render, tmp_path: Path, chart_values):
    """What the pod resolves equals what `lora-exp` resolves locally from the values file, except the
    training fields the profile supplies and the experiment leaves unset."""
    values = kt.values_file(path)
    profile = values.get("profile", "cpu")
    objs = render(values, release=path.stem)
    files = spec_files(objs, tmp_path)
    exp = yaml.safe_load(path.read_text())["experiment"]
    profile_training = kt.deep_merge(chart_values["profiles"][profile], values.get("profiles", {}).get(profile, {}))[
        "training"]
    resolved = resolve_runs(path)
    local = {r.name: r.spec.model_dump() for r in resolved}
    keys = {r.name: r.group or r.name for r in resolved}  # a repeat's fields are its run's
    pod = {}
    for spec_path in files.values():
        (r,) = resolve_runs(spec_path)
        pod[r.name] = r.spec.model_dump()
    assert sorted(pod) == sorted(local)
    for name, expected in local.items():
        explicit = {**(exp.get("defaults") or {}).get("training", {}),
                    **((exp["runs"][keys[name]] or {}).get("training") or {})}
        for key, value in profile_training.items():
            if key not in explicit:
                expected["training"][key] = value
        assert pod[name] == expected, name


@pytest.mark.parametrize("profile", PROFILES)
def test_profile_training_defaults_are_layered_under_the_experiment(profile: str, render, tmp_path: Path, chart_values):
    objs = render(synthetic(profile=profile))
    files = spec_files(objs, tmp_path)
    src = SYNTHETIC["experiment"]
    assert set(files) == {"lora-r8.yaml", "baseline.yaml"}
    p = chart_values["profiles"][profile]
    runs = {}
    for name, key in (("lora_r8", "lora-r8.yaml"), ("baseline", "baseline.yaml")):
        exp = yaml.safe_load(files[key].read_text())["experiment"]
        # Explicit experiment values win (an explicit false / small number included), the profile fills the rest.
        assert exp["defaults"]["training"] == {**p["training"], **src["defaults"]["training"]}
        assert exp["defaults"]["training"]["gradient_checkpointing"] is False
        assert exp["defaults"]["training"]["learning_rate"] == 3e-05  # a number, not the string '3e-05'
        assert exp["runs"] == {name: src["runs"][name]} and exp["name"] == src["name"]
        assert {k: v for k, v in exp["defaults"].items() if k != "training"} == {
            k: v for k, v in src["defaults"].items() if k != "training"}
        # The pod's view after lora-exp merges defaults and the run (a run can still override the profile).
        (r,) = resolve_runs(files[key], overrides=["output_root=/outputs"])
        runs[r.name] = r.spec
    for spec in runs.values():
        assert spec.training.precision == p["training"]["precision"]
        assert spec.training.per_device_train_batch_size == p["training"]["per_device_train_batch_size"]
        assert spec.training.zero_stage == p["training"]["zero_stage"]
        assert spec.training.gradient_accumulation_steps == 3
        assert spec.output_root == "/outputs"


def test_run_level_training_beats_the_profile(render, tmp_path: Path):
    values = synthetic(profile="t4-16g", experiment={"runs": {"lora_r8": {"training": {"precision": "fp32"}}}})
    runs = {r.name: r.spec for path in spec_files(render(values), tmp_path).values() for r in resolve_runs(path)}
    assert runs["lora_r8"].training.precision == "fp32"
    assert runs["baseline"].training.precision == "fp16"


def test_per_run_profiles_layer_their_own_defaults(render, tmp_path: Path, chart_values):
    objs = render(synthetic(profile="a100-80g", job={"runProfiles": {"baseline": "t4-16g"}}))
    files = spec_files(objs, tmp_path)
    for j in jobs(objs):
        args = j["spec"]["template"]["spec"]["containers"][0]["args"]
        profile = j["metadata"]["labels"]["lora-exp.io/profile"]
        (r,) = resolve_runs(files[args[args.index("-f") + 1].rsplit("/", 1)[1]])
        assert r.spec.training.precision == chart_values["profiles"][profile]["training"]["precision"]
    assert {j["metadata"]["labels"]["lora-exp.io/profile"] for j in jobs(objs)} == {"a100-80g", "t4-16g"}


@pytest.mark.parametrize("profile", ["cpu", "t4-16g", "h100-80g-x8-n2"])
def test_synthetic_spec_validates_for_profiles(profile: str, render, tmp_path: Path):
    files = spec_files(render(synthetic(profile=profile)), tmp_path)
    for run, key in (("lora_r8", "lora-r8.yaml"), ("baseline", "baseline.yaml")):
        rc, msgs = validate(files[key], run)
        assert rc == 0, msgs
        rc, msgs = validate(files[key])  # what torchrun runs: no --run, the file selects the run
        assert rc == 0 and len(msgs) == 1 and msgs[0].startswith(f"run {run}:"), msgs


def test_a_bad_spec_fails_validate_with_exit_2(render, tmp_path: Path):
    """What the FailJob rule keys on: the init container exits 2 on a spec error the schema cannot see."""
    values = synthetic(experiment={"runs": {"lora_r8": {"task": {"name": "custom"}}}})
    rc, msgs = validate(spec_files(render(values), tmp_path)["lora-r8.yaml"], "lora_r8")
    assert rc == 2, msgs


def init_container_check(job: dict, files: dict[str, Path]) -> subprocess.CompletedProcess:
    """The validate init container's command, run with the real CLI on the rendered ConfigMap's files."""
    spec = job["spec"]["template"]["spec"]
    (init,) = spec["initContainers"]
    argv = [a.replace("/etc/lora-exp/", "") for a in init["args"]]
    assert argv[:3] == ["lora-exp", "plan", "--check"]
    argv = [str(files[a]) if a in files else a for a in argv[1:]]
    return subprocess.run([*LORA_EXP, *argv], capture_output=True, text=True, cwd=kt.REPO, timeout=180)


def test_init_container_fails_a_run_that_cannot_fit_with_exit_2(render, tmp_path: Path, tiny_gpt2: Path):
    """The rendered init container runs `lora-exp plan --check` against the run's profile: a run that fits
    passes, one whose estimate exceeds its GPU's memory exits 2 with the breakdown, before the job starts."""
    tiny_gpu = {**kt.chart_values()["profiles"]["t4-16g"], "gpuMemoryGiB": 0.05, "description": "a 50 MiB GPU"}
    values = synthetic(profile="tiny-gpu", profiles={"tiny-gpu": tiny_gpu},
                       experiment={"defaults": {"model": {"name": str(tiny_gpt2)}}},
                       job={"runProfiles": {"baseline": "t4-16g"}})
    objs = render(values)
    files = spec_files(objs, tmp_path, profiles=True)
    by_run = {j["metadata"]["annotations"]["lora-exp.io/run-name"]: j for j in jobs(objs)}
    ok = init_container_check(by_run["baseline"], files)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert re.search(r"baseline\s+eval\s+t4-16g.*fits", ok.stdout)
    bad = init_container_check(by_run["lora_r8"], files)
    assert bad.returncode == 2, bad.stdout + bad.stderr
    assert re.search(r"lora_r8\s+train\s+tiny-gpu.*DOES NOT FIT", bad.stdout)  # the breakdown table
    assert "lora_r8: estimated peak memory does not fit the profile" in bad.stdout + bad.stderr


def test_profile_auto_names_the_pre_install_step(render):
    with pytest.raises(Exception, match="lora-exp plan -f <values> --auto"):
        render(synthetic(profile="auto"))
