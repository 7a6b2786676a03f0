"""The sweep job: a hyper-parameter search with Optuna over any spec fields (``sweep:`` in a run).

Workers (processes here, the pods of the chart's Indexed Job there) share one Optuna study, stored in a journal
file beside the trials (Optuna's file journal, safe on a shared volume) or in a database (``sweep.storage``),
so trials are handed out by Optuna's storage, not by a scheduler of ours. Each trial is an ordinary train run,
``<run>/trial-<n>``, trained by the one training path and logged as an MLflow child run of the sweep's parent
run. A worker remembers the trial it runs: preempted, its next attempt resumes that trial (from the trial's
checkpoint) instead of asking for a new one, so no trial runs twice. When the last trial ends, the parent run
receives the best parameters and value, the trial table, and the optimisation-history and parameter-importance
plots.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

from filelock import FileLock

from lora_exp.config.loading import Run, trial_spec
from lora_exp.config.schema import SweepSpec
from lora_exp.core import tags
from lora_exp.core.errors import Preempted, UserError
from lora_exp.core.layout import RunDir, write_json
from lora_exp.engine.fit import train_run
from lora_exp.engine.prepare import prepare
from lora_exp.engine.process import fresh_process_state
from lora_exp.tracking.runs import ensure_run, mlflow_run

log = logging.getLogger(__name__)
JOURNAL = "study.journal"
RESULT = "sweep.json"  # written by the worker that finishes the sweep: best params and value
MINIMIZED = ("loss", "perplexity", "ter")  # metric names where lower is better


def direction(s: SweepSpec) -> str:
    """maximize, unless the spec says otherwise or the metric is one where lower is better."""
    return s.direction or ("minimize" if any(s.metric.endswith("_" + m) for m in MINIMIZED) else "maximize")


def study_for(run: Run) -> Any:
    import optuna

    s = run.spec.sweep
    assert s is not None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if s.storage:
        storage: Any = s.storage
    else:
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        run.output_dir.mkdir(parents=True, exist_ok=True)
        storage = JournalStorage(JournalFileBackend(str(run.output_dir / JOURNAL)))
    samplers = {
        "tpe": lambda: optuna.samplers.TPESampler(seed=s.seed),
        "random": lambda: optuna.samplers.RandomSampler(seed=s.seed),
        "grid": lambda: optuna.samplers.GridSampler({k: p.grid() for k, p in s.params.items()}, seed=s.seed),
    }
    return optuna.create_study(storage=storage, study_name=f"{run.experiment}/{run.name}", load_if_exists=True,
                               sampler=samplers[s.sampler](), direction=direction(s))


def suggest(trial: Any, s: SweepSpec) -> dict[str, Any]:
    values = {}
    for path, p in s.params.items():
        if p.choices is not None:
            values[path] = trial.suggest_categorical(path, p.choices)
        elif p.is_int:
            assert p.low is not None and p.high is not None
            values[path] = trial.suggest_int(path, int(p.low), int(p.high), step=int(p.step or 1), log=p.log)
        else:
            assert p.low is not None and p.high is not None
            values[path] = trial.suggest_float(path, p.low, p.high, step=p.step, log=p.log)
    return values


class Worker:
    """One worker's memory of the trial it runs (``workers/<index>.json``)."""

    def __init__(self, run: Run, index: int) -> None:
        self.path = run.output_dir / "workers" / f"{index}.json"

    def current(self) -> int | None:
        return int(json.loads(self.path.read_text())["trial"]) if self.path.is_file() else None

    def start(self, number: int) -> None:
        write_json(self.path, {"trial": number})

    def done(self) -> None:
        self.path.unlink(missing_ok=True)


def next_trial(study: Any, s: SweepSpec, worker: Worker) -> tuple[int, dict[str, Any]] | None:
    """(trial number, values): this worker's unfinished trial, else a new one from the study; None when the
    budget is spent."""
    from optuna.trial import TrialState

    mine = worker.current()
    if mine is not None:
        frozen = study.trials[mine]
        if frozen.state == TrialState.RUNNING:
            log.info("resuming trial %d (%s)", mine, frozen.params)
            return mine, dict(frozen.params)
        worker.done()
    if len(study.get_trials(deepcopy=False)) >= s.trials:
        return None
    trial = study.ask()
    if trial.number >= s.trials:  # another worker took the last place a moment ago
        study.tell(trial, state=TrialState.PRUNED)
        return None
    values = suggest(trial, s)
    worker.start(trial.number)
    return trial.number, values


def trial_run(run: Run, number: int, values: dict[str, Any], parent_id: str) -> Run:
    spec = trial_spec(run.spec, values)
    return Run(experiment=run.experiment, name=f"{run.name}/trial-{number}", spec=spec, source=run.source,
               parent_run_id=parent_id, sweep=run.name)


def sweep(run: Run, worker_index: int = 0) -> dict[str, float]:
    """Run trials until the study's budget is spent; the worker that ends the sweep summarises it."""
    from optuna.trial import TrialState

    s = run.spec.sweep
    assert s is not None
    study = study_for(run)
    with FileLock(str(run.output_dir / "parent.lock"), timeout=600):
        parent_id = ensure_run(run, tags.SWEEP, RunDir(run.output_dir))
    worker = Worker(run, worker_index)
    while (picked := next_trial(study, s, worker)) is not None:
        number, values = picked
        trial = trial_run(run, number, values, parent_id)
        log.info("sweep %s: trial %d of %d: %s", run.name, number, s.trials,
                 ", ".join(f"{k}={v}" for k, v in values.items()))
        try:
            with fresh_process_state():  # a ZeRO-3 trial must not leave DeepSpeed state to the next trial
                metrics = train_run(trial, prepare)
        except (Preempted, UserError):
            raise  # preempted: resumed by the next attempt; a user error fails every trial alike
        except Exception:
            log.exception("trial %d failed", number)
            study.tell(number, state=TrialState.FAIL)
            worker.done()
            continue
        if s.metric not in metrics:
            raise UserError(f"sweep.metric: trial {number} reported no {s.metric!r} (it has {sorted(metrics)})")
        study.tell(number, metrics[s.metric])
        worker.done()
    return finish(run, study, parent_id)


def finish(run: Run, study: Any, parent_id: str) -> dict[str, float]:
    """When no trial is left running, summarise the sweep in its parent run (once, by whichever worker)."""
    from optuna.trial import TrialState

    result = run.output_dir / RESULT
    with FileLock(str(run.output_dir / "parent.lock"), timeout=600):
        if result.is_file():
            return dict(json.loads(result.read_text())["best_metrics"])
        trials = study.get_trials(deepcopy=False)
        if any(t.state == TrialState.RUNNING for t in trials):
            log.info("sweep %s: other workers still run trials; the last one to finish summarises", run.name)
            return {}
        done = [t for t in trials if t.state == TrialState.COMPLETE]
        if not done:
            raise UserError(f"sweep {run.name}: no trial completed")
        best = study.best_trial
        s = run.spec.sweep
        assert s is not None
        with mlflow_run(run, tags.SWEEP, state_dir=RunDir(run.output_dir)) as tracker, \
                tempfile.TemporaryDirectory(prefix="lora-exp-sweep-") as tmp:
            tracker.set_tags({f"best.{k}": str(v) for k, v in best.params.items()}
                             | {"best.trial": str(best.number)})
            tracker.log_metrics({f"best_{s.metric}": float(best.value), "trials_complete": len(done),
                                 "trials_failed": sum(t.state == TrialState.FAIL for t in trials)})
            for path in (trial_table(study, Path(tmp)), *plots(study, Path(tmp))):
                tracker.log_artifact(path)
        summary = {"best_trial": best.number, "best_params": best.params, "best_value": best.value,
                   "best_metrics": {s.metric: best.value}, "parent_run_id": parent_id}
        write_json(result, summary)
        log.info("sweep %s: best trial %d, %s = %.4g with %s", run.name, best.number, s.metric, best.value,
                 best.params)
        return {s.metric: float(best.value)}


def trial_table(study: Any, tmp: Path) -> Path:
    """``trials.csv``: Optuna's own table of the study, one row per trial (number, state, value, each parameter
    as ``params_<field>``, start and duration)."""
    path = tmp / "trials.csv"
    study.trials_dataframe(attrs=("number", "state", "value", "params", "datetime_start", "duration")).to_csv(
        path, index=False)
    return path


def plots(study: Any, tmp: Path) -> list[Path]:
    """Optuna's optimisation history and parameter importances (the latter needs two finished trials)."""
    import matplotlib

    matplotlib.use("Agg")  # headless: no display in a pod
    import matplotlib.pyplot as plt  # optuna's plots draw on pyplot figures
    from optuna.visualization import matplotlib as ov

    out = []
    for name, draw in (("optimization_history.png", ov.plot_optimization_history),
                       ("param_importances.png", ov.plot_param_importances)):
        try:
            ax = draw(study)
        except (ValueError, RuntimeError) as e:  # e.g. importances of a single completed trial
            log.info("sweep plot %s skipped: %s", name, e)
            continue
        fig = ax.figure if hasattr(ax, "figure") else ax[0].figure
        fig.savefig(tmp / name, dpi=100, bbox_inches="tight")
        plt.close(fig)
        out.append(tmp / name)
    return out
