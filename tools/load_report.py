"""What `make load-test` writes: the machine and versions it ran on, one line per phase while it runs, the knee,
and a Markdown report (the figures docs/reliability.md quotes)."""

from __future__ import annotations

import os
import platform
from importlib import metadata
from typing import Any

# The knee: log_batch p95 this many times the smallest N's; or the spool still draining this long after training
# ended (a share of the nominal training time, at least DRAIN_FLOOR_S): the server takes less than jobs offer.
LATENCY_FACTOR = 3.0
DRAIN_SHARE, DRAIN_FLOOR_S = 0.25, 5.0


def machine() -> str:
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    with open("/proc/cpuinfo") as fh:
        cpu = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), platform.processor())
    return f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB, {platform.system()} {platform.release()}, loopback"


def versions(pg: Any) -> dict[str, str]:
    out = {"python": platform.python_version(), "postgresql": pg.version()}
    for name in ("mlflow", "sqlalchemy", "uvicorn", "requests"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "-"
    return out


def _f(x: float | None, fmt: str = ".0f") -> str:
    return "-" if x is None else format(x, fmt)


def line(s: dict[str, Any]) -> str:
    c = s["check"]
    return (f"[{s['name']}] {s['jobs_ok']}/{s['jobs']} jobs ok in {s['elapsed_s']:.0f} s; "
            f"{_f(s['stored_points_per_s'])} points/s stored of {s['offered_points_per_s']:.0f} offered; "
            f"log_batch p50/p95 {_f(s['log_batch_ms']['p50'])}/{_f(s['log_batch_ms']['p95'])} ms "
            f"({s['points_per_batch']:.0f} points each); drain max {_f(s['drain_s']['max'], '.1f')} s; "
            f"pace {_f(s['train_pace'], '.2f')}; errors {s['error_count']}; lost {c.get('lost_points')} "
            f"dup {c.get('duplicate_points')} wrong {c.get('wrong_values')} "
            f"unfinished {c.get('runs_not_finished')} artifacts missing {c.get('artifacts_missing')}")


def knee(steps: list[dict[str, Any]]) -> dict[str, Any]:
    """The first step-up phase where a job failed, a point was lost, log_batch's p95 reached LATENCY_FACTOR x
    the smallest N's, or the spool drained slower than the jobs logged; None when no phase got there."""
    if not steps:
        return {"jobs": None, "why": "no step-up phase"}
    base = steps[0]["log_batch_ms"]["p95"] or 0.0
    for s in steps:
        c, nominal = s["check"], s["steps"] * s["step_ms"] / 1000
        why = []
        if s["jobs_failed"] or s["timed_out"]:
            why.append(f"{s['jobs_failed']} jobs failed")
        if c.get("lost_points") or c.get("duplicate_points") or c.get("wrong_values"):
            why.append("points lost or doubled")
        if base and (s["log_batch_ms"]["p95"] or 0) >= LATENCY_FACTOR * base:
            why.append(f"log_batch p95 {s['log_batch_ms']['p95']:.0f} ms >= {LATENCY_FACTOR:g} x {base:.0f} ms")
        if (s["drain_s"]["max"] or 0) > max(DRAIN_FLOOR_S, DRAIN_SHARE * nominal):
            why.append(f"spool drained {s['drain_s']['max']:.0f} s after training (server behind the jobs)")
        if why:
            return {"jobs": s["jobs"], "offered_points_per_s": s["offered_points_per_s"],
                    "stored_points_per_s": s["stored_points_per_s"], "why": "; ".join(why)}
    return {"jobs": None, "why": f"not reached up to {steps[-1]['jobs']} jobs"}


def markdown(r: dict[str, Any]) -> str:
    v = r["versions"]
    out = [f"# Load test, {r['started']}", "",
           f"Machine: {r['machine']}. MLflow {v['mlflow']} (uvicorn {v['uvicorn']}, SQLAlchemy {v['sqlalchemy']}), "
           f"PostgreSQL {v['postgresql']}, Python {v['python']}. Server start (exec to /health): "
           f"{r['server_start_s']:.1f} s. Total wall time {r.get('wall_s', 0):.0f} s.", "",
           "| phase | jobs x steps | ms/step | latency ms | points/s offered | points/s stored | log_batch p50/p95 ms "
           "| points/batch | lag p95 s | drain max s | train pace | job wall p50/p95 s | errors (retried) "
           "| failed jobs | lost / dup / wrong | unfinished / no adapter |",
           "|" + "---|" * 16]
    for s in r["phases"]:
        c = s["check"]
        out.append(
            f"| {s['name']} | {s['jobs']} x {s['steps']} | {s['step_ms']:g} | {s['latency_ms']:g} "
            f"| {s['offered_points_per_s']:.0f} | {_f(s['stored_points_per_s'])} "
            f"| {_f(s['log_batch_ms']['p50'])} / {_f(s['log_batch_ms']['p95'])} | {s['points_per_batch']:.0f} "
            f"| {_f((s['lag_ms']['p95'] or 0) / 1000, '.1f')} | {_f(s['drain_s']['max'], '.1f')} "
            f"| {_f(s['train_pace'], '.2f')} | {_f(s['wall_s']['p50'])} / {_f(s['wall_s']['p95'])} "
            f"| {s['error_count']} | {s['jobs_failed']}{' (timed out)' if s['timed_out'] else ''} "
            f"| {c.get('lost_points')} / {c.get('duplicate_points')} / {c.get('wrong_values')} "
            f"| {c.get('runs_not_finished')} / {c.get('artifacts_missing')} |")
    k = r.get("knee") or {}
    out += ["", f"Knee: {k.get('jobs') or '-'} jobs" + (f" ({k['offered_points_per_s']:.0f} points/s offered, "
                                                         f"{_f(k['stored_points_per_s'])} stored)"
                                                         if k.get("jobs") else "") + f": {k.get('why')}."]
    for s in r["phases"]:
        if s.get("killed_at_s") is not None:
            out.append(f"Restart: server SIGKILLed {s['killed_at_s']:.0f} s after the jobs started (a third into "
                       f"training), back after {s['down_s']:.1f} s (its own start {s['restart_s']:.1f} s).")
        if s["errors"]:
            out.append(f"{s['name']} errors: " + ", ".join(f"{k} x{n}" for k, n in sorted(s["errors"].items())))
    out += ["", "Columns: points/s stored = every metric point of the phase / (first training step to the last job "
            "drained); "
            "lag = a point's age when the request carrying it returned; drain = how long a job waited at its "
            "end for its spool to empty; train pace = nominal / actual training-loop time (1.00: logging never "
            "held a step); errors = failed requests, all retried by the spool.", ""]
    return "\n".join(out)
