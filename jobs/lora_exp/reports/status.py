"""Where each run of a values file or Helm release stands: ``lora-exp status -f values/x.yaml | --release NAME``.

From MLflow (what the jobs log while they train): state, progress (step of max steps), latest training
loss, ETA and when the run last reported. With a kubeconfig (``$KUBECONFIG`` or ``~/.kube/config``), also
each run's Kubernetes Job and newest pod: phase, why a pod waits (``ImagePullBackOff``, ``OOMKilled``...)
and restarts, so a run that never reached MLflow still shows up, with the reason.

The chart labels every Job ``app.kubernetes.io/instance=<release>`` and ``app.kubernetes.io/part-of=lora-exp``
and annotates it with ``lora-exp.io/experiment`` and ``lora-exp.io/run-name`` (the run key); ``helm upgrade``
creates new Jobs (names end in ``-r<revision>``, label ``lora-exp.io/revision``): the newest revision counts.
Pods are found through the Job controller's own label ``batch.kubernetes.io/job-name``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from lora_exp.core import errors, tags
from lora_exp.core.tables import text_table
from lora_exp.reports.selection import add_arguments as selection_arguments
from lora_exp.reports.selection import from_args, search
from lora_exp.tracking.server import redact

log = logging.getLogger(__name__)

HELP = "each run's state, progress, loss and ETA from MLflow, plus its Job and pod phase from Kubernetes"

RELEASE_LABEL = "app.kubernetes.io/instance"
PART_OF_SELECTOR = "app.kubernetes.io/part-of=lora-exp"
RUN_NAME_ANNOTATION = "lora-exp.io/run-name"
EXPERIMENT_ANNOTATION = "lora-exp.io/experiment"
RUN_LABEL = "lora-exp.io/run"  # the run key as a label value (slug): the fallback when the annotation is absent
REVISION_LABEL = "lora-exp.io/revision"
JOB_NAME_LABEL = "batch.kubernetes.io/job-name"  # set on pods by the Job controller (Kubernetes >= 1.27)
NOT_STARTED = "NOT STARTED"
API_TIMEOUT_S = 10


@dataclass
class Status:
    """One run's row. Kubernetes fields stay None without a kubeconfig or a matching Job."""

    run: str
    experiment: str
    state: str = NOT_STARTED
    step: int | None = None
    max_steps: int | None = None
    progress: float | None = None
    loss: float | None = None
    eta_seconds: float | None = None
    updated_seconds_ago: float | None = None
    run_id: str | None = None
    k8s_job: str | None = None
    job_phase: str | None = None
    pod: str | None = None
    pod_phase: str | None = None
    restarts: int | None = None

    def row(self) -> dict[str, Any]:
        """The terminal table's row: durations and progress in human units."""
        row: dict[str, Any] = {
            "run": self.run, "state": self.state, "progress": _progress(self), "loss": self.loss,
            "eta": _duration(self.eta_seconds), "updated": _ago(self.updated_seconds_ago),
        }
        if self.job_phase is not None or self.pod_phase is not None:
            row.update({"job": self.job_phase, "pod": self.pod_phase, "restarts": self.restarts})
        row["run id"] = self.run_id[:12] if self.run_id else None
        return row


def _progress(s: Status) -> str | None:
    if s.progress is None:
        return None
    steps = f" ({s.step}/{s.max_steps})" if s.step is not None and s.max_steps else ""
    return f"{100 * s.progress:.0f}%{steps}"


def _duration(seconds: float | None) -> str | None:
    return None if seconds is None else str(timedelta(seconds=round(seconds)))


def _ago(seconds: float | None) -> str | None:
    return None if seconds is None else f"{_duration(seconds)} ago"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    selection_arguments(parser)
    parser.add_argument("-n", "--namespace", help="Kubernetes namespace (default: the kubeconfig context's)")
    parser.add_argument("--kube", choices=("auto", "on", "off"), default="auto",
                        help="query Kubernetes: auto = when a kubeconfig exists (default)")
    parser.add_argument("--json", action="store_true", help="print JSON (one object per run) instead of a table")


def main(args: argparse.Namespace) -> int:
    from mlflow import MlflowClient

    if not (args.values or args.release or args.experiments or args.filter or args.run_ids):
        raise errors.UserError("status: say which runs: -f VALUES, --release NAME, --experiment NAME, --filter or "
                               "--run-ids")
    uri, sel, values_runs = from_args(args)
    client = MlflowClient(tracking_uri=uri)
    statuses = mlflow_statuses(client, search(client, sel), time.time())
    for run in values_runs:  # runs of the file that never reached MLflow
        if not any(s.run == run.name and s.experiment == run.experiment for s in statuses):
            statuses.append(Status(run=run.name, experiment=run.experiment))
    if _use_kube(args.kube):
        experiments = {r.experiment for r in values_runs} | set(args.experiments)
        jobs = kube_jobs(args.namespace, args.release, experiments)
        if values_runs:  # only the file's (selected) runs, not every Job of its experiment
            jobs = [j for j in jobs if j.run in {r.name for r in values_runs}]
        merge_kube(statuses, jobs)
    if not statuses:
        raise errors.UserError(f"no runs found ({sel.describe()}) at {redact(uri)}")
    if args.json:
        print(json.dumps([asdict(s) for s in statuses], indent=2))
    else:
        print(text_table([s.row() for s in statuses]), end="")
    return errors.OK


# --------------------------------------------------------------------------------------------------
# MLflow


def mlflow_statuses(client: Any, infos: list[Any], now: float) -> list[Status]:
    return [mlflow_status(client, info, now) for info in infos]


def mlflow_status(client: Any, info: Any, now: float) -> Status:
    """State, progress and loss as last logged; a running run's ETA counts down from its last report.

    Progress, step and ETA are read from the same logged points (not the run's metric snapshot), so they
    agree with each other while the run keeps logging.
    """
    m = info.metrics
    progress = _last_point(client, info.run_id, "progress") if "progress" in m else None
    eta = _last_point(client, info.run_id, "eta_seconds") if "eta_seconds" in m else None
    s = Status(run=info.name, experiment=info.tags.get(tags.EXPERIMENT, info.experiment),
               state=info.status, run_id=info.run_id, loss=m.get("loss"),
               max_steps=int(m["max_steps"]) if "max_steps" in m else None)
    if progress is not None:
        s.progress, s.step = progress.value, int(progress.step)
    reported = max(t for t in (info.run.info.start_time, info.run.info.end_time, progress and progress.timestamp)
                   if t)
    s.updated_seconds_ago = max(0.0, now - reported / 1000)
    if info.status == "RUNNING" and eta is not None:
        s.eta_seconds = max(0.0, eta.value - (now - eta.timestamp / 1000))
    elif info.status == "FINISHED":
        s.eta_seconds = 0.0
    return s


def _last_point(client: Any, run_id: str, key: str) -> Any:
    points = client.get_metric_history(run_id, key)
    return max(points, key=lambda p: (p.step, p.timestamp)) if points else None


# --------------------------------------------------------------------------------------------------
# Kubernetes


def kubeconfig() -> str:
    """$KUBECONFIG (paths joined by os.pathsep, merged by the client) or ~/.kube/config, read now: the
    kubernetes client reads $KUBECONFIG once, at import."""
    return os.environ.get("KUBECONFIG") or str(Path("~/.kube/config").expanduser())


def kubeconfig_present() -> bool:
    return any(Path(p).expanduser().is_file() for p in kubeconfig().split(os.pathsep) if p)


def _use_kube(mode: str) -> bool:
    if mode == "off":
        return False
    if mode == "on" or kubeconfig_present():
        try:
            import kubernetes  # noqa: F401
        except ImportError:
            if mode == "on":
                raise errors.UserError("--kube on needs the kubernetes client: pip install kubernetes") from None
            log.info("kubeconfig found but the kubernetes client is not installed; MLflow status only")
            return False
        return True
    return False


@dataclass
class KubeJob:
    """A run's newest Job and what its pods are doing."""

    name: str
    run: str
    experiment: str
    phase: str
    pod: str | None
    pod_phase: str | None
    restarts: int


def kube_jobs(namespace: str | None, release: str | None, experiments: set[str]) -> list[KubeJob]:
    """The newest Job per run of ``release`` (or of the named experiments); [] when the API says no."""
    from kubernetes import client, config
    from kubernetes.client.exceptions import ApiException

    config.load_kube_config(config_file=kubeconfig())
    ns = namespace or _context_namespace()
    batch, core = client.BatchV1Api(), client.CoreV1Api()
    selector = f"{RELEASE_LABEL}={release}" if release else PART_OF_SELECTOR
    try:
        jobs = batch.list_namespaced_job(ns, label_selector=selector, _request_timeout=API_TIMEOUT_S).items
        if not release:
            jobs = [j for j in jobs if (j.metadata.annotations or {}).get(EXPERIMENT_ANNOTATION) in experiments]
        return [_kube_job(core, ns, job) for job in newest_per_run(jobs)]
    except (ApiException, OSError) as e:  # no RBAC, cluster down: MLflow's view is still worth printing
        log.warning("Kubernetes: cannot list Jobs in namespace %s (%s); MLflow status only", ns,
                    getattr(e, "reason", e))
        return []


def _context_namespace() -> str:
    from kubernetes import config

    _, active = config.list_kube_config_contexts(config_file=kubeconfig())
    return (active or {}).get("context", {}).get("namespace") or "default"


def run_key(job: Any) -> tuple[str, str]:
    """(experiment, run key) a Job runs, from the chart's annotations (the label is a slug, lossy)."""
    ann, labels = job.metadata.annotations or {}, job.metadata.labels or {}
    return ann.get(EXPERIMENT_ANNOTATION, ""), ann.get(RUN_NAME_ANNOTATION) or labels.get(RUN_LABEL, job.metadata.name)


def newest_per_run(jobs: list[Any]) -> list[Any]:
    """``helm upgrade`` leaves the previous revision's Jobs until they are cleaned up: keep the newest."""
    best: dict[tuple[str, str], Any] = {}
    for job in jobs:
        key = run_key(job)
        if key not in best or _revision(job) > _revision(best[key]):
            best[key] = job
    return list(best.values())


def _revision(job: Any) -> tuple[int, float]:
    rev = (job.metadata.labels or {}).get(REVISION_LABEL, "0")
    created = job.metadata.creation_timestamp
    return int(rev) if rev.isdigit() else 0, created.timestamp() if created else 0.0


def job_phase(job: Any) -> str:
    """Complete, Failed (reason), Suspended (e.g. queued by Kueue), Running, or Pending."""
    st = job.status
    true = {c.type: c for c in (st.conditions or []) if c.status == "True"}
    if "Complete" in true:
        return "Complete"
    if "Failed" in true:
        reason = true["Failed"].reason
        return f"Failed ({reason})" if reason else "Failed"
    if "Suspended" in true:
        return "Suspended"
    return "Running" if st.active else "Pending"


def pod_phase(pod: Any) -> str:
    """The pod's phase and, when a container is stuck or died, why (waiting or termination reason)."""
    reasons = []
    for cs in [*(pod.status.init_container_statuses or []), *(pod.status.container_statuses or [])]:
        if cs.state and cs.state.waiting and cs.state.waiting.reason:
            reasons.append(cs.state.waiting.reason)
        elif cs.state and cs.state.terminated and cs.state.terminated.exit_code:
            reasons.append(f"{cs.state.terminated.reason or 'exit'} {cs.state.terminated.exit_code}")
    phase = pod.status.phase or "Unknown"
    return f"{phase} ({', '.join(reasons)})" if reasons else phase


def _kube_job(core: Any, ns: str, job: Any) -> KubeJob:
    pods = core.list_namespaced_pod(ns, label_selector=f"{JOB_NAME_LABEL}={job.metadata.name}",
                                    _request_timeout=API_TIMEOUT_S).items
    newest = max(pods, key=lambda p: p.metadata.creation_timestamp.timestamp()) if pods else None
    container_restarts = sum(cs.restart_count or 0 for p in pods for cs in (p.status.container_statuses or []))
    experiment, run = run_key(job)
    return KubeJob(name=job.metadata.name, run=run, experiment=experiment, phase=job_phase(job),
                   pod=newest.metadata.name if newest else None, pod_phase=pod_phase(newest) if newest else None,
                   restarts=container_restarts + (job.status.failed or 0))


def merge_kube(statuses: list[Status], jobs: list[KubeJob]) -> None:
    """Attach each Job to its run's row (by run key, and experiment when both know it); add rows for Jobs
    whose run has not reached MLflow yet."""
    for kj in jobs:
        match = next((s for s in statuses if s.run == kj.run and kj.experiment in ("", s.experiment)), None)
        if match is None:
            match = Status(run=kj.run, experiment=kj.experiment)
            statuses.append(match)
        match.k8s_job, match.job_phase, match.pod, match.pod_phase = kj.name, kj.phase, kj.pod, kj.pod_phase
        match.restarts = kj.restarts
