"""`make load-test`: how much one PostgreSQL-backed MLflow server (the chart's deployment: `mlflow server
--workers 2 --serve-artifacts`) takes from many training Jobs at once, and what the Jobs do when it is slow or
restarts. Everything on loopback, bounded in job count and wall time per phase.

Phases, each a fresh experiment on the same server and database:
- step-up: N concurrent simulated jobs (tools/load_jobs.py: the real ``Tracker`` spool, params + 8 metrics every
  step + an adapter upload at the end), N from ``--step-up``, stopping after a phase that loses data or fails a
  job. The knee is the first N where a job fails, log_batch's p95 latency triples over the smallest N's, or
  the spool is still draining well after training ended (the server takes less than the jobs offer).
- slow: the same through a proxy that holds every request ``--latency-ms`` (each value a phase).
- restart: the server SIGKILLed a third of the way into training, started again on the same port.

After each phase every point is checked in PostgreSQL: each (run, metric, step) present exactly once with the
value the job logged, every run FINISHED with its params and its adapter in the artifact store.

    python tools/load_test.py --step-up 5,10,20,50 --steps 1000 --latency-ms 200,2000 --restart --out DIR
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import load_jobs as lj  # noqa: E402
import load_report  # noqa: E402
from load_stack import DRIVER_SITE, LatencyProxy, MlflowServer, Postgres  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Phase:
    name: str
    kind: str  # step-up | slow | restart
    jobs: int
    steps: int
    step_ms: float
    latency_ms: float = 0.0
    restart: bool = False


class Stack:
    """PostgreSQL, the MLflow server on it, and a latency proxy in front of it."""

    def __init__(self, work: Path, workers: int) -> None:
        self.work = work
        self.pg = Postgres(work / "pg").start()
        self.artifacts = work / "mlartifacts"
        self.server = MlflowServer(self.pg.uri, self.artifacts, work / "mlflow-server.log", workers)
        self.server_start_s = self.server.start()
        self.proxy = LatencyProxy(self.server.port).start()

    def close(self) -> None:
        self.proxy.stop()
        self.server.kill()
        self.pg.stop()


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run_phase(stack: Stack, ph: Phase, procs: int, deadline_s: float) -> dict[str, Any]:
    """Run one phase's jobs (split over ``procs`` worker processes), with its fault, and check the store."""
    work = stack.work / ph.name
    work.mkdir(parents=True)
    stack.proxy.delay_s = ph.latency_ms / 1000
    uri = stack.proxy.url if ph.latency_ms else stack.server.url
    experiment = f"load-{ph.name}"
    groups = [list(range(w, ph.jobs, procs)) for w in range(min(procs, ph.jobs))]
    go = work / "go"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "jobs"), os.environ.get("PYTHONPATH", "")])}
    workers = []
    for w, group in enumerate(groups):
        cmd = [sys.executable, str(Path(__file__).parent / "load_jobs.py"), "--uri", uri, "--experiment", experiment,
               "--jobs", ",".join(map(str, group)), "--steps", str(ph.steps), "--step-ms", str(ph.step_ms),
               "--deadline", str(deadline_s), "--work", str(work), "--ready", str(work / f"ready-{w}"),
               "--go", str(go), "--out", str(work / f"result-{w}.json")]
        with (work / f"worker-{w}.log").open("wb") as log:  # the child keeps its own descriptor
            workers.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env))
    t_ready = time.monotonic()
    while not all((work / f"ready-{w}").exists() for w in range(len(groups))):
        if time.monotonic() - t_ready > 180 or any(p.poll() is not None for p in workers):
            for p in workers:
                p.kill()
            raise RuntimeError(f"{ph.name}: workers did not start; see {work}/worker-*.log")
        time.sleep(0.1)
    nominal = ph.steps * ph.step_ms / 1000
    bound = 120 + 3 * nominal + deadline_s
    print(f"[{ph.name}] {ph.jobs} jobs x {ph.steps} steps at {ph.step_ms:g} ms/step"
          f"{f', latency {ph.latency_ms:g} ms' if ph.latency_ms else ''}{', restart' if ph.restart else ''}"
          f" (bound {bound:.0f} s)", flush=True)
    go.touch()
    t0 = time.monotonic()
    fault: dict[str, Any] = {}
    if ph.restart:  # a third of the way into training, once every job trains (not while runs open)
        while (time.monotonic() - t0 < 120 and all(p.poll() is None for p in workers)
               and not all((work / f"job-{j:03d}" / "training").exists() for j in range(ph.jobs))):
            time.sleep(0.05)
        time.sleep(nominal / 3)
        fault["killed_at_s"] = time.monotonic() - t0
        stack.server.kill()
        time.sleep(2.0)  # the pod's restart delay, at its shortest
        fault["restart_s"] = stack.server.start()  # from exec to /health answering
        fault["down_s"] = time.monotonic() - t0 - fault["killed_at_s"]
    timed_out = False
    for p in workers:
        try:
            p.wait(max(1.0, bound - (time.monotonic() - t0)))
        except subprocess.TimeoutExpired:
            timed_out = True
            p.kill()
            p.wait()
    elapsed = time.monotonic() - t0
    results = [json.loads((work / f"result-{w}.json").read_text()) for w in range(len(groups))
               if (work / f"result-{w}.json").exists()]
    jobs = sorted((j for r in results for j in r["jobs"]), key=lambda j: j["job"])
    summary = summarize(ph, jobs, results, elapsed, timed_out)
    summary.update(fault)
    summary["check"] = check_store(stack, ph, experiment, jobs)
    summary["failures"] = [{k: j.get(k) for k in ("job", "error", "trace")} for j in jobs if not j["ok"]][:5]
    return summary


def summarize(ph: Phase, jobs: list[dict[str, Any]], results: list[dict[str, Any]], elapsed: float,
              timed_out: bool) -> dict[str, Any]:
    calls: dict[str, list[float]] = {}
    errors: dict[str, int] = {}
    for r in results:
        for name, ms in r["calls_ms"].items():
            calls.setdefault(name, []).extend(ms)
        for kind, n in r["errors"].items():
            errors[kind] = errors.get(kind, 0) + n
    batch = calls.get("log_batch", [])
    lag = [x for r in results for x in r["lag_ms"]]
    points = ph.jobs * (len(lj.STEP_KEYS) * ph.steps + len(lj.FINAL))
    done = [j for j in jobs if "train_s" in j]
    nominal = ph.steps * ph.step_ms / 1000
    return {
        **asdict(ph),
        "offered_points_per_s": ph.jobs * len(lj.STEP_KEYS) / (ph.step_ms / 1000),
        "points": points,
        # From the first training step to the last job drained: the rate the server took the points at.
        "stored_points_per_s": points / span if (span := max((j["t_end"] for j in done if "t_end" in j), default=0)
                                                 - min((j["t_train"] for j in done), default=0)) > 0 else None,
        "elapsed_s": elapsed,
        "timed_out": timed_out,
        "jobs_ok": sum(j["ok"] for j in jobs),
        "jobs_failed": ph.jobs - sum(j["ok"] for j in jobs),
        "requests": {name: len(ms) for name, ms in calls.items()},
        "log_batch_ms": {"p50": pct(batch, 0.5), "p95": pct(batch, 0.95), "max": pct(batch, 1.0)},
        "points_per_batch": sum(r["points_sent"] for r in results) / max(1, len(batch)),
        "lag_ms": {"p50": pct(lag, 0.5), "p95": pct(lag, 0.95), "max": pct(lag, 1.0)},
        "errors": errors,
        "error_count": sum(errors.values()),
        "open_s": {"p50": pct([j["open_s"] for j in jobs if "open_s" in j], 0.5),
                   "max": pct([j["open_s"] for j in jobs if "open_s" in j], 1.0)},
        # The training loop's pace: steps took their nominal time (step_ms) unless logging blocked them.
        "train_pace": statistics.median(nominal / j["train_s"] for j in done) if done else None,
        "worst_log_call_ms": max((j["worst_log_call_ms"] for j in done), default=None),
        "drain_s": {"p50": pct([j["drain_s"] for j in done if "drain_s" in j], 0.5),
                    "max": pct([j["drain_s"] for j in done if "drain_s" in j], 1.0)},
        "wall_s": {"p50": pct([j["wall_s"] for j in jobs], 0.5), "p95": pct([j["wall_s"] for j in jobs], 0.95)},
    }


def check_store(stack: Stack, ph: Phase, experiment: str, jobs: list[dict[str, Any]]) -> dict[str, Any]:
    """Every point of every job in PostgreSQL exactly once with its value; runs FINISHED with their params and
    adapter; no run the jobs do not know of."""
    pg = stack.pg
    exp_id = pg.psql(f"SELECT experiment_id FROM experiments WHERE name = '{experiment}'")
    if not exp_id:
        return {"lost_points": ph.jobs * (len(lj.STEP_KEYS) * ph.steps + len(lj.FINAL)), "note": "no experiment"}
    runs = dict(line.split("|") for line in pg.psql(
        f"SELECT run_uuid, status FROM runs WHERE experiment_id = {exp_id}").splitlines())
    rows = pg.psql(f"SELECT m.run_uuid, m.key, m.step, count(*), min(m.value), max(m.value) FROM metrics m "
                   f"JOIN runs r ON r.run_uuid = m.run_uuid WHERE r.experiment_id = {exp_id} "
                   "GROUP BY m.run_uuid, m.key, m.step").splitlines()
    params = dict(line.split("|") for line in pg.psql(
        f"SELECT p.run_uuid, count(*) FROM params p JOIN runs r ON r.run_uuid = p.run_uuid "
        f"WHERE r.experiment_id = {exp_id} GROUP BY p.run_uuid").splitlines())
    got: dict[tuple[str, str, int], tuple[int, float, float]] = {}
    for line in rows:
        run, key, step, n, lo, hi = line.split("|")
        got[(run, key, int(step))] = (int(n), float(lo), float(hi))
    lost = dup = wrong = 0
    run_of = {j["job"]: j.get("run_id") for j in jobs}
    for job in range(ph.jobs):
        run = run_of.get(job) or ""
        want = {(run, key, k): lj.value(job, key, k, ph.steps) for key in lj.STEP_KEYS for k in range(1, ph.steps + 1)}
        want.update({(run, key, 0): v for key, v in lj.FINAL.items()})
        for at, v in want.items():
            if at not in got:
                lost += 1
                continue
            n, lo, hi = got[at]
            dup += n - 1
            wrong += int(lo != v or hi != v)
    known = {r for r in run_of.values() if r}
    artifacts_missing = sum(
        1 for r in known
        if not any(p.stat().st_size == lj.ADAPTER_BYTES
                   for p in stack.artifacts.glob(f"{exp_id}/{r}/artifacts/model/adapter_model.safetensors"))
        or not list(stack.artifacts.glob(f"{exp_id}/{r}/artifacts/spec.yaml")))
    param_counts = sorted({int(params.get(r, 0)) for r in known})
    return {
        "points_expected": ph.jobs * (len(lj.STEP_KEYS) * ph.steps + len(lj.FINAL)),
        "lost_points": lost, "duplicate_points": dup, "wrong_values": wrong,
        "extra_points": sum(n for (run, _, _), (n, _, _) in got.items() if run not in known),
        "runs": len(runs), "runs_unknown": len(set(runs) - known),
        "runs_not_finished": sum(1 for r in known if runs.get(r) != "FINISHED") + (ph.jobs - len(known)),
        "params_per_run": param_counts, "artifacts_missing": artifacts_missing + (ph.jobs - len(known)),
    }


def broken(s: dict[str, Any]) -> bool:
    c = s["check"]
    return bool(s["jobs_failed"] or s["timed_out"] or c.get("lost_points") or c.get("duplicate_points")
                or c.get("wrong_values") or c.get("runs_not_finished") or c.get("artifacts_missing"))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", type=int, default=None, help="one step-up phase of N jobs (instead of --step-up)")
    p.add_argument("--step-up", default="5,10,20,50", help="the concurrent job counts to step through")
    p.add_argument("--steps", type=int, default=1000, help="logged steps per job")
    p.add_argument("--step-ms", type=float, default=20.0, help="the simulated training step time")
    p.add_argument("--latency-ms", default="200,2000", help="slow-server phases, one per latency ('' for none)")
    p.add_argument("--slow-jobs", type=int, default=10)
    p.add_argument("--restart", action="store_true", help="a phase with the server killed and restarted")
    p.add_argument("--restart-jobs", type=int, default=50)
    p.add_argument("--procs", type=int, default=4, help="worker processes the jobs are spread over")
    p.add_argument("--server-workers", type=int, default=2, help="mlflow server --workers (the chart's: 2)")
    p.add_argument("--deadline", type=float, default=300.0, help="a job's wait for its spool to drain (s)")
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "load-test")
    p.add_argument("--require-jobs", type=int, default=0,
                   help="exit 1 unless every step-up phase up to this many jobs passed (larger ones may break)")
    p.add_argument("--keep", action="store_true", help="keep the work directory (database, logs)")
    a = p.parse_args()

    env = {**os.environ, "PYTHONPATH": str(DRIVER_SITE)}
    if subprocess.run([sys.executable, "-c", "import psycopg2"], env=env, capture_output=True).returncode:
        print("the MLflow server needs psycopg2 (as its image installs it): make load-test-deps", file=sys.stderr)
        return 2
    ns = [a.jobs] if a.jobs else [int(n) for n in a.step_up.split(",") if n]
    phases = [Phase(f"n{n}", "step-up", n, a.steps, a.step_ms) for n in ns]
    phases += [Phase(f"slow{int(float(ms))}ms", "slow", a.slow_jobs, a.steps, a.step_ms, latency_ms=float(ms))
               for ms in a.latency_ms.split(",") if ms]
    if a.restart:
        phases.append(Phase("restart", "restart", a.restart_jobs, a.steps, a.step_ms, restart=True))

    work = Path(tempfile.mkdtemp(prefix="lora-exp-load-"))
    t0 = time.monotonic()
    stack = Stack(work, a.server_workers)
    report: dict[str, Any] = {"started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                              "machine": load_report.machine(), "versions": load_report.versions(stack.pg),
                              "server_start_s": stack.server_start_s, "phases": []}
    stepping = True
    try:
        for ph in phases:
            if ph.kind == "step-up" and not stepping:
                continue
            s = run_phase(stack, ph, a.procs, a.deadline)
            report["phases"].append(s)
            print(load_report.line(s), flush=True)
            if ph.kind == "step-up" and broken(s):
                stepping = False  # something broke: no larger N
    finally:
        stack.close()
        report["wall_s"] = time.monotonic() - t0
        report["knee"] = load_report.knee([s for s in report["phases"] if s["kind"] == "step-up"])
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "report.json").write_text(json.dumps(report, indent=1))
        (a.out / "report.md").write_text(load_report.markdown(report))
        print(f"report: {a.out}/report.md ({report['wall_s']:.0f} s); work: {work}", flush=True)
        if not a.keep:
            subprocess.run(["rm", "-rf", str(work)], check=False)
    required = [ph.name for ph in phases if ph.kind != "step-up" or ph.jobs <= a.require_jobs]
    by_name = {s["name"]: s for s in report["phases"]}
    ok = all(name in by_name and not broken(by_name[name]) for name in required)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
