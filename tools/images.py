"""Build the images with a real container engine (podman or docker, whichever works here).

    python tools/images.py engine        # which engine works, or why none does (exit 1)
    python tools/images.py base          # a python:*-slim stand-in made from Debian packages (no Docker Hub)
    python tools/images.py build         # the CPU job image and the MLflow image (make image)
    python tools/images.py tags          # the tags `build` gives, one per line

Tags follow the project: ``lora-exp:<version>-cpu`` and ``lora-exp:<version>-cpu-<sha12>`` (the chart's
appVersion and the git commit), ``lora-exp-mlflow:<mlflow version>`` and ``...-<sha12>``.

Base image and Python version are build arguments (PYTHON_IMAGE, PYTHON_VERSION); the Dockerfiles check
that the base really runs that Python and put both into the image's labels, so ``podman inspect`` names
what was used. With ``LORA_EXP_BASE=local`` (the default when Docker Hub cannot be reached) the base is
made here from the Debian archive with mmdebstrap: Debian bookworm's own CPython 3.11.

torch for the CPU image: the Dockerfile installs ``torch==$TORCH_VERSION`` from ``$TORCH_INDEX_URL`` (the
PyTorch CPU index by default). An offline or air-gapped builder points it at a wheel it has: ``TORCH_WHEEL=
/path/torch-2.13.0+cpu-cp311-...whl`` (or one found in pip's find-links directories) is served as a
one-file package index on 127.0.0.1 for the duration of the build (builds run with the host's network).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PODMAN_CONF = REPO / "images" / "engine" / "containers.conf"
# Debian bookworm's CPython: what the local base carries.
LOCAL_BASE = "localhost/lora-exp-base:bookworm-py3.11"
LOCAL_PYTHON = "3.11"
HUB_BASE = "python:3.12.12-slim-bookworm"
HUB_PYTHON = "3.12"
DEBIAN_MIRROR = os.environ.get("DEBIAN_MIRROR", "http://deb.debian.org/debian")
DEBIAN_SECURITY = os.environ.get("DEBIAN_SECURITY_MIRROR", "http://deb.debian.org/debian-security")
TORCH_VERSION = "2.13.0+cpu"
DOCKER_CLEAN = ('DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb '
                '/var/cache/apt/*.bin || true"; }; APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb '
                '/var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; }; '
                'Dir::Cache::pkgcache ""; Dir::Cache::srcpkgcache "";')
BUILD_RECORD = REPO / ".cache" / "images" / "build.json"
HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")


class EngineUnavailable(RuntimeError):
    """No container engine can build and run images on this machine (the reason says why)."""


@dataclass(frozen=True)
class Engine:
    name: str  # "podman" or "docker"
    env: dict[str, str] = field(default_factory=dict)

    def cmd(self, *args: str) -> list[str]:
        return [self.name, *args]

    def run(self, *args: str, check: bool = True, capture: bool = False, timeout: float | None = None,
            ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.cmd(*args), env={**os.environ, **self.env}, check=check, text=True,
                              capture_output=capture, timeout=timeout)

    def popen(self, *args: str, **kw) -> subprocess.Popen[str]:
        return subprocess.Popen(self.cmd(*args), env={**os.environ, **self.env}, text=True, **kw)

    def has_image(self, ref: str) -> bool:
        return self.run("image", "inspect", ref, check=False, capture=True).returncode == 0


def _engine_env(name: str) -> dict[str, str]:
    # podman here needs runc and lowered ulimits (images/engine/containers.conf); a user's own setting wins.
    if name == "podman" and "CONTAINERS_CONF" not in os.environ:
        return {"CONTAINERS_CONF": str(PODMAN_CONF)}
    return {}


@functools.lru_cache(maxsize=1)
def engine() -> Engine:
    """The first engine that answers ``info``: $CONTAINER_ENGINE, else podman, else docker."""
    wanted = os.environ.get("CONTAINER_ENGINE")
    reasons = []
    for name in [wanted] if wanted else ["podman", "docker"]:
        if not shutil.which(name):
            reasons.append(f"{name}: not installed")
            continue
        eng = Engine(name, _engine_env(name))
        try:
            res = eng.run("info", check=False, capture=True, timeout=60)
        except subprocess.TimeoutExpired:
            reasons.append(f"{name}: `{name} info` did not answer in 60 s")
            continue
        if res.returncode == 0:
            return eng
        last = (res.stderr.strip().splitlines() or ["(no output)"])[-1]
        reasons.append(f"{name}: `{name} info` failed: {last}")
    raise EngineUnavailable("no working container engine: " + "; ".join(reasons))


# ------------------------------------------------------------------------------------------------
# Names


def app_version() -> str:
    text = (REPO / "charts" / "Chart.yaml").read_text()
    return re.search(r'^appVersion:\s*"?([^"\n]+)"?', text, re.M).group(1)  # type: ignore[union-attr]


def mlflow_version() -> str:
    text = (REPO / "mlflow_server" / "requirements.lock").read_text()
    return re.search(r"^mlflow==(\S+)", text, re.M).group(1)  # type: ignore[union-attr]


def git_sha() -> str:
    res = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    return res.stdout.strip() if res.returncode == 0 else "unknown"


@dataclass(frozen=True)
class Images:
    job: str  # the tag the chart's default image resolves to (repository:appVersion-cpu)
    mlflow: str  # the chart's default mlflow.image (repository:tag)
    sha: str

    @property
    def all_tags(self) -> list[str]:
        short = self.sha[:12]
        return [self.job, f"{self.job}-{short}", self.mlflow, f"{self.mlflow}-{short}"]


def images() -> Images:
    return Images(job=f"lora-exp:{app_version()}-cpu", mlflow=f"lora-exp-mlflow:{mlflow_version()}",
                  sha=git_sha())


# ------------------------------------------------------------------------------------------------
# The base


def base_choice(eng: Engine) -> tuple[str, str]:
    """(base image, its Python version): $PYTHON_IMAGE/$PYTHON_VERSION, else Docker Hub's python:3.12-slim
    when it can be pulled, else the local Debian-made base (made on first use)."""
    if os.environ.get("PYTHON_IMAGE"):
        return os.environ["PYTHON_IMAGE"], os.environ.get("PYTHON_VERSION", HUB_PYTHON)
    if os.environ.get("LORA_EXP_BASE", "") != "local":
        if eng.has_image(HUB_BASE) or _pulls(eng, HUB_BASE):
            return HUB_BASE, HUB_PYTHON
        print(f"{HUB_BASE} cannot be pulled here: using the local Debian base {LOCAL_BASE}", flush=True)
    if not eng.has_image(LOCAL_BASE):
        make_local_base(eng)
    return LOCAL_BASE, LOCAL_PYTHON


def _pulls(eng: Engine, ref: str) -> bool:
    try:
        return eng.run("pull", "-q", ref, check=False, capture=True, timeout=120).returncode == 0
    except subprocess.TimeoutExpired:  # a registry that drops packets rather than refusing them
        return False


def make_local_base(eng: Engine) -> None:
    """A python:*-slim stand-in from Debian packages: minbase bookworm + python3 (3.11) + venv, with
    `python` on PATH and apt caches cleaned as the official image does (no ~77 MB cache per apt layer)."""
    if not shutil.which("mmdebstrap"):
        raise EngineUnavailable("making the local base needs mmdebstrap (apt-get install mmdebstrap)")
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="lora-exp-base-") as tmp:
        tar = Path(tmp) / "rootfs.tar"
        clean = "rm -rf \"$1\"/var/lib/apt/lists/* \"$1\"/var/cache/apt/*.bin \"$1\"/var/cache/apt/archives/*.deb"
        subprocess.run([
            "mmdebstrap", "--variant=minbase", "--include=python3,python3-venv,ca-certificates",
            "--customize-hook=ln -sf /usr/bin/python3 \"$1\"/usr/local/bin/python",
            # The official image's docker-clean: no package caches left behind by later apt layers.
            f"--customize-hook=printf '%s\\n' '{DOCKER_CLEAN}' > \"$1\"/etc/apt/apt.conf.d/docker-clean",
            f"--customize-hook={clean}",
            "bookworm", str(tar),
            f"deb {DEBIAN_MIRROR} bookworm main", f"deb {DEBIAN_MIRROR} bookworm-updates main",
            f"deb {DEBIAN_SECURITY} bookworm-security main",
        ], check=True)
        eng.run("import", "--change", "CMD [\"python3\"]",
                "--change", "ENV PATH=/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "--change", "ENV LANG=C.UTF-8", str(tar), LOCAL_BASE)
    print(f"made {LOCAL_BASE} from {DEBIAN_MIRROR} in {time.monotonic() - t0:.0f} s", flush=True)


# ------------------------------------------------------------------------------------------------
# torch for an offline builder


def find_torch_wheel(python_version: str) -> Path | None:
    """$TORCH_WHEEL, else a torch==TORCH_VERSION wheel for this Python in pip's find-links directories."""
    if os.environ.get("TORCH_WHEEL"):
        return Path(os.environ["TORCH_WHEEL"])
    tag = "cp" + python_version.replace(".", "")
    res = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True)
    dirs = [Path(d) for line in res.stdout.splitlines() if "find-links" in line
            for d in line.split("=", 1)[1].strip().strip("'\"").split()]
    for d in dirs:
        hits = sorted(d.glob(f"torch-{TORCH_VERSION}-{tag}-{tag}-*linux*x86_64.whl"))
        if hits:
            return hits[0]
    return None


@contextlib.contextmanager
def wheel_index(wheel: Path) -> Iterator[str]:
    """Serve one wheel as a PEP 503 index on 127.0.0.1 (a pip --index-url) while the block runs."""
    with tempfile.TemporaryDirectory(prefix="torch-index-") as tmp:
        pkg = Path(tmp) / "simple" / "torch"
        pkg.mkdir(parents=True)
        (pkg / wheel.name).symlink_to(wheel.resolve())
        (pkg / "index.html").write_text(f'<html><body><a href="{wheel.name}">{wheel.name}</a></body></html>\n')
        handler = functools.partial(_QuietHandler, directory=tmp)
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield f"http://127.0.0.1:{server.server_address[1]}/simple"
        finally:
            server.shutdown()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the stdlib's name
        pass


# ------------------------------------------------------------------------------------------------
# Build


def build_args(eng: Engine, python_image: str, python_version: str, sha: str, version: str) -> list[str]:
    args = ["--build-arg", f"PYTHON_IMAGE={python_image}", "--build-arg", f"PYTHON_VERSION={python_version}",
            "--build-arg", f"GIT_SHA={sha}", "--build-arg", f"VERSION={version}"]
    if eng.name == "podman":
        # RUN steps reach the registries as the host does; pip trusts the host's CA bundle (a
        # TLS-intercepting proxy's CA lives only there). Docker has no build-time mounts: use its own proxy
        # settings there.
        args += ["--network", "host"]
        if HOST_CA.exists():
            args += ["--volume", f"{HOST_CA}:/etc/ssl/certs/ca-certificates.crt:ro",
                     "--volume", f"{_pip_conf()}:/etc/pip.conf:ro"]
    else:
        args += ["--network", "host"]
    return args


@functools.lru_cache(maxsize=1)
def _pip_conf() -> Path:
    """pip's settings inside the build: the host's CA bundle, and $PIP_INDEX_URL / $PIP_EXTRA_INDEX_URL
    (a site's PyPI mirror) when set."""
    fd, name = tempfile.mkstemp(prefix="lora-exp-build-pip-", suffix=".conf")
    lines = ["[global]", f"cert = {HOST_CA}"]
    for env, key in (("PIP_INDEX_URL", "index-url"), ("PIP_EXTRA_INDEX_URL", "extra-index-url")):
        if os.environ.get(env):
            lines.append(f"{key} = {os.environ[env]}")
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.chmod(name, 0o644)  # read by the build's RUN steps
    return Path(name)


def build(eng: Engine | None = None, only: str | None = None) -> Images:
    eng = eng or engine()
    imgs = images()
    python_image, python_version = base_choice(eng)
    short = imgs.sha[:12]
    t0 = time.monotonic()
    common = build_args(eng, python_image, python_version, imgs.sha, app_version())
    if only != "mlflow":
        wheel = None if os.environ.get("TORCH_INDEX_URL") else find_torch_wheel(python_version)
        serve = wheel_index(wheel) if wheel else contextlib.nullcontext(os.environ.get("TORCH_INDEX_URL"))
        with serve as index:
            torch = ["--build-arg", f"TORCH_INDEX_URL={index}"] if index else []
            if wheel:
                print(f"torch from {wheel} (served at {index})", flush=True)
            # The ignore file beside the Dockerfile, named: podman 4.3 does not look for it on its own.
            ignore = ["--ignorefile", "images/Dockerfile.dockerignore"] if eng.name == "podman" else []
            _build(eng, "job image", [*common, *torch, *ignore, "--file", "images/Dockerfile", "--target", "cpu",
                                      "--tag", imgs.job, "--tag", f"{imgs.job}-{short}", "."])
    mlflow_common = build_args(eng, python_image, python_version, imgs.sha, mlflow_version())
    if only != "job":
        _build(eng, "MLflow image", [*mlflow_common, "--file", "mlflow_server/Dockerfile",
                                     "--tag", imgs.mlflow, "--tag", f"{imgs.mlflow}-{short}", "mlflow_server"])
    seconds = time.monotonic() - t0
    BUILD_RECORD.parent.mkdir(parents=True, exist_ok=True)
    BUILD_RECORD.write_text(json.dumps({"job": imgs.job, "mlflow": imgs.mlflow, "sha": imgs.sha, "base": python_image,
                                        "python": python_version, "engine": eng.name, "seconds": round(seconds)},
                                       indent=2) + "\n")
    print(f"built {', '.join(imgs.all_tags)} with {eng.name} in {seconds:.0f} s", flush=True)
    return imgs


def build_record() -> dict[str, str]:
    """What the last `build` here used (base, Python, commit): what the images' labels must say."""
    return json.loads(BUILD_RECORD.read_text())


def _build(eng: Engine, what: str, args: list[str]) -> None:
    t0 = time.monotonic()
    print(f"building the {what}: {eng.name} build {' '.join(args)}", flush=True)
    eng.run("build", *args, timeout=3600)
    print(f"built the {what} in {time.monotonic() - t0:.0f} s", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["engine", "base", "build", "tags"])
    ap.add_argument("--only", choices=["job", "mlflow"], help="build one of the two images")
    a = ap.parse_args(argv)
    if a.command == "tags":
        print("\n".join(images().all_tags))
        return 0
    try:
        eng = engine()
        if a.command == "engine":
            print(eng.name)
        elif a.command == "base":
            print(" ".join(base_choice(eng)))
        else:
            build(eng, a.only)
    except EngineUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
