"""Run a rendered pod template with a container engine, flag for flag from the manifest (never re-typed).

No Kubernetes cluster runs on the CI machines, but the containers a cluster would start can: this turns
a pod spec from the chart's rendered Job (or Deployment) into ``podman run`` / ``docker run`` commands that
keep what the kubelet would enforce:

- command and args, with Kubernetes' ``$(VAR)`` expansion from the container's env;
- env values, ``secretKeyRef`` (from the Secrets the caller supplies) and ``fieldRef`` to pod annotations
  (the Indexed Job's completion index), handed over in an env file (no Secret on a command line);
- the security context: uid/gid, fsGroup as a supplementary group, ``readOnlyRootFilesystem`` (with no
  tmpfs the engine would add on its own), dropped capabilities, no privilege escalation;
- volumes: ConfigMaps (from the rendered ConfigMap objects, mounted read-only), emptyDirs (world-writable
  scratch directories, as the kubelet makes them; ``medium: Memory`` at /dev/shm becomes the shm size),
  PersistentVolumeClaims (host directories the caller maps claim names to), read-only where the mount says;
- the memory limit (without swap) and the termination grace period (the engine's stop timeout; 30 s when
  the pod leaves it out, as Kubernetes);
- cluster DNS: Service names and pod FQDNs the caller maps to addresses (``--add-host``), all pods on the
  host network, as containers of one node.

What it cannot do (scheduling, probes, restarts) the caller does: tests/image drives it.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_VAR = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")
_ANNOTATION = re.compile(r"metadata\.annotations\['([^']+)'\]")
DEFAULT_GRACE_S = 30  # Kubernetes' terminationGracePeriodSeconds when a pod leaves it out
_UNITS = {"Ki": 1024, "Mi": 1024**2, "Gi": 1024**3, "Ti": 1024**4, "K": 1000, "M": 1000**2, "G": 1000**3}


class PodSpecError(ValueError):
    """The manifest asks for something this runner cannot honour (a missing Secret, an unknown volume)."""


@dataclass
class Cluster:
    """What the cluster would supply around a pod."""

    scratch: Path  # emptyDirs and ConfigMap files are made under here
    claims: dict[str, Path] = field(default_factory=dict)  # PVC claimName -> host directory
    configmaps: dict[str, dict[str, str]] = field(default_factory=dict)  # name -> data
    secrets: dict[str, dict[str, str]] = field(default_factory=dict)  # name -> data
    hosts: dict[str, str] = field(default_factory=dict)  # DNS name -> address
    engine: str = "podman"
    network: str = "host"  # "none" for a pod whose NetworkPolicy denies all traffic

    @classmethod
    def from_objects(cls, objects: list[dict[str, Any]], scratch: Path, **kw: Any) -> Cluster:
        """With the ConfigMaps among the rendered objects."""
        cms = {o["metadata"]["name"]: dict(o.get("data") or {}) for o in objects if o["kind"] == "ConfigMap"}
        return cls(scratch=scratch, configmaps=cms, **kw)


def quantity_bytes(q: str | int) -> int:
    """A Kubernetes quantity ("2Gi", "512Mi", "1000") in bytes."""
    s = str(q)
    for unit, mult in _UNITS.items():
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * mult)
    return int(float(s))


def expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion in command/args: unknown names stay as written, ``$$`` is one ``$``."""
    out, i = [], 0
    while i < len(text):
        if text.startswith("$$", i):
            out.append("$")
            i += 2
            continue
        m = _VAR.match(text, i)
        if m:
            out.append(env.get(m.group(1), m.group(0)))
            i = m.end()
            continue
        out.append(text[i])
        i += 1
    return "".join(out)


def container_env(container: dict[str, Any], cluster: Cluster, annotations: Mapping[str, str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for item in container.get("env") or []:
        name = item["name"]
        if "value" in item:
            env[name] = expand(str(item["value"]), env)
            continue
        ref = item.get("valueFrom") or {}
        if "secretKeyRef" in ref:
            sref = ref["secretKeyRef"]
            try:
                env[name] = cluster.secrets[sref["name"]][sref["key"]]
            except KeyError:
                if sref.get("optional"):
                    continue
                raise PodSpecError(f"env {name}: Secret {sref['name']!r} key {sref['key']!r} not supplied") from None
        elif "fieldRef" in ref:
            path = ref["fieldRef"]["fieldPath"]
            m = _ANNOTATION.fullmatch(path)
            if not m or m.group(1) not in annotations:
                raise PodSpecError(f"env {name}: fieldRef {path!r} has no value for this pod")
            env[name] = annotations[m.group(1)]
        else:
            raise PodSpecError(f"env {name}: unsupported valueFrom {sorted(ref)}")
    return env


def _security(pod: dict[str, Any], container: dict[str, Any], engine: str) -> list[str]:
    psc, csc = pod.get("securityContext") or {}, container.get("securityContext") or {}
    uid = csc.get("runAsUser", psc.get("runAsUser"))
    gid = csc.get("runAsGroup", psc.get("runAsGroup"))
    args: list[str] = []
    if uid is not None:
        args += ["--user", f"{uid}:{gid}" if gid is not None else str(uid)]
    if psc.get("fsGroup") is not None:
        args += ["--group-add", str(psc["fsGroup"])]
    if csc.get("readOnlyRootFilesystem"):
        args += ["--read-only"]
        if engine == "podman":  # podman would add tmpfs mounts of its own; Kubernetes adds none
            args += ["--read-only-tmpfs=false"]
    if csc.get("runAsNonRoot", psc.get("runAsNonRoot")) and uid in (None, 0):
        raise PodSpecError(f"container {container['name']}: runAsNonRoot without a non-zero runAsUser")
    for cap in (csc.get("capabilities") or {}).get("drop") or []:
        args += ["--cap-drop", cap]
    for cap in (csc.get("capabilities") or {}).get("add") or []:
        args += ["--cap-add", cap]
    if csc.get("allowPrivilegeEscalation") is False:
        args += ["--security-opt", "no-new-privileges"]
    if csc.get("privileged"):
        raise PodSpecError(f"container {container['name']}: privileged containers are not run")
    return args


def _volumes(pod: dict[str, Any], container: dict[str, Any], cluster: Cluster, pod_name: str) -> list[str]:
    volumes = {v["name"]: v for v in pod.get("volumes") or []}
    args: list[str] = []
    for mount in container.get("volumeMounts") or []:
        vol = volumes.get(mount["name"])
        if vol is None:
            raise PodSpecError(f"volumeMount {mount['name']!r}: no such volume in the pod")
        target = mount["mountPath"]
        ro = bool(mount.get("readOnly"))
        if "configMap" in vol:
            name = vol["configMap"]["name"]
            if name not in cluster.configmaps:
                raise PodSpecError(f"volume {mount['name']!r}: ConfigMap {name!r} not rendered")
            src = cluster.scratch / pod_name / "configmaps" / mount["name"]
            src.mkdir(parents=True, exist_ok=True)
            for key, text in cluster.configmaps[name].items():
                (src / key).write_text(text)
                (src / key).chmod(0o644)
            src.chmod(0o755)
            ro = True  # the kubelet always mounts ConfigMaps read-only
        elif "emptyDir" in vol:
            if vol["emptyDir"].get("medium") == "Memory" and target == "/dev/shm":
                size = vol["emptyDir"].get("sizeLimit")
                if size:
                    args += ["--shm-size", str(quantity_bytes(size))]
                continue
            src = cluster.scratch / pod_name / "emptydir" / mount["name"]
            src.mkdir(parents=True, exist_ok=True)
            src.chmod(0o1777 if target == "/tmp" else 0o777)
        elif "persistentVolumeClaim" in vol:
            claim = vol["persistentVolumeClaim"]["claimName"]
            if claim not in cluster.claims:
                raise PodSpecError(f"volume {mount['name']!r}: no host directory for claim {claim!r}")
            src = cluster.claims[claim]
            ro = ro or bool(vol["persistentVolumeClaim"].get("readOnly"))
        else:
            raise PodSpecError(f"volume {mount['name']!r}: unsupported kind {sorted(vol)}")
        args += ["--volume", f"{src}:{target}:{'ro' if ro else 'rw'}"]
    return args


def run_args(pod: dict[str, Any], container: dict[str, Any], cluster: Cluster, *, pod_name: str,
             annotations: Mapping[str, str] | None = None, hostname: str | None = None) -> list[str]:
    """The engine's ``run`` arguments (after ``podman``) for one container of a pod template."""
    annotations = annotations or {}
    env = container_env(container, cluster, annotations)
    name = f"{pod_name}-{container['name']}"
    args = ["run", "--name", name, "--network", cluster.network, "--pull", "never"]
    if cluster.engine == "podman":
        # The image's VOLUME lines would give anonymous writable volumes; a cluster gives nothing unmounted.
        args += ["--image-volume", "ignore"]
    args += ["--hostname", hostname or pod_name]
    for host, addr in sorted(cluster.hosts.items()) if cluster.network != "none" else ():
        args += ["--add-host", f"{host}:{addr}"]
    args += _security(pod, container, cluster.engine)
    args += _volumes(pod, container, cluster, pod_name)
    limits = (container.get("resources") or {}).get("limits") or {}
    if "memory" in limits:  # no swap beyond the limit, as on a kubelet node
        limit = str(quantity_bytes(limits["memory"]))
        args += ["--memory", limit, "--memory-swap", limit]
    args += ["--stop-timeout", str(int(pod.get("terminationGracePeriodSeconds", DEFAULT_GRACE_S)))]
    if env:
        # An env file, not --env: Secret values stay off the engine's command line (and out of `ps`).
        env_file = cluster.scratch / pod_name / f"{container['name']}.env"
        env_file.parent.mkdir(parents=True, exist_ok=True)
        env_file.touch(mode=0o600)
        env_file.write_text("".join(f"{k}={v}\n" for k, v in env.items()))
        args += ["--env-file", str(env_file)]
    if container.get("workingDir"):
        args += ["--workdir", container["workingDir"]]
    command = [expand(c, env) for c in container.get("command") or []]
    if command:  # both engines take one executable here; the rest of the command goes before the args
        args += ["--entrypoint", command[0]]
    args.append(container["image"])
    args += command[1:] + [expand(a, env) for a in container.get("args") or []]
    return args


def read_env_file(args: list[str]) -> dict[str, str]:
    """The environment ``run_args`` handed over (for tests and logs)."""
    if "--env-file" not in args:
        return {}
    text = Path(args[args.index("--env-file") + 1]).read_text()
    return dict(line.split("=", 1) for line in text.splitlines() if line)


def pod_template(obj: dict[str, Any]) -> dict[str, Any]:
    """The pod spec of a Job or Deployment."""
    return obj["spec"]["template"]["spec"]


@dataclass
class ContainerResult:
    name: str
    returncode: int
    logs: str


def run_pod(engine: list[str], obj: dict[str, Any], cluster: Cluster, *, pod_name: str,
            annotations: Mapping[str, str] | None = None, hostname: str | None = None,
            timeout: float = 1800, env: Mapping[str, str] | None = None) -> list[ContainerResult]:
    """Run a Job's pod to completion: init containers in order (the first failure ends the pod, as the
    kubelet does with restartPolicy Never), then its container(s). Returns each container's exit code and
    logs. ``engine`` is the command prefix (e.g. ``["podman"]``) and ``env`` its environment."""
    pod = pod_template(obj)
    results: list[ContainerResult] = []
    for c in [*(pod.get("initContainers") or []), *pod["containers"]]:
        args = run_args(pod, c, cluster, pod_name=pod_name, annotations=annotations, hostname=hostname)
        name = f"{pod_name}-{c['name']}"
        subprocess.run([*engine, "rm", "-f", name], env=env, capture_output=True)
        try:
            proc = subprocess.run([*engine, *args], env=env, capture_output=True, text=True, timeout=timeout)
            results.append(ContainerResult(c["name"], proc.returncode, proc.stdout + proc.stderr))
        except subprocess.TimeoutExpired as e:  # as activeDeadlineSeconds would: the pod fails, nothing is left
            out = (e.stdout or b"") + (e.stderr or b"")
            logs = out.decode(errors="replace") if isinstance(out, bytes) else str(out)
            results.append(ContainerResult(c["name"], 124, logs + f"\n(killed after {timeout:.0f} s)"))
        finally:
            subprocess.run([*engine, "rm", "-f", name], env=env, capture_output=True)
        if results[-1].returncode != 0:
            break
    return results
