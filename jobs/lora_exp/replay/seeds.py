"""``lora-exp replay``: run every seed experiment from its values file, as written, and check that each output
the seed's document promises was written (``make seeds``).

Model weights and data sets cannot be downloaded here, so a replay changes exactly three things, written into
a derived values file beside the results (``<out>/<seed>/<values>.yaml``) and listed in the report:

- **model source**: each hub model is replaced by a local directory with its real architecture (``full``),
  or the same family scaled down (``small``, ``tiny``), random weights and a tokenizer trained on the replay
  data (``lora_exp.replay.replicas``);
- **data source**: ``data.data_files`` points at small local JSONL files in the hub data set's schema and
  split names (MNLI's validation_matched/validation_mismatched, SQuAD v2's empty answer lists, ...);
- **step cap**: ``training.max_steps`` (and ``logging_steps`` no larger, so each run logs a loss curve).

Outputs go to ``<out>/<seed>/outputs`` and the runs to an MLflow store ``<out>/<seed>/mlflow.db``:
environment, not experiment. A replay of a seed starts from an empty ``<out>/<seed>``; the replicas in
``<out>/models`` are reused while the same. Every command runs in its own process (``python -m lora_exp
...``, in the seed's directory), as a Job's would, and its log is kept (``<out>/<seed>/logs``).

The shapes: ``--shape full`` everywhere (a GPU machine); ``auto`` (the default) uses the real shape for
models up to ``--cpu-max-params`` and ``small`` above; ``tiny`` everywhere (CI). A promised output that is
missing fails the replay with a line naming the seed and the file (exit 1).
"""

from __future__ import annotations

import argparse
import csv
import fnmatch
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import yaml

from lora_exp.config.loading import resolve_runs
from lora_exp.core import errors
from lora_exp.core.tables import markdown_table, text_table

HELP = "run every seed experiment (random-weight models of the real shapes, hub-format local data, a step cap) " \
       "and check each promised output"
log = logging.getLogger(__name__)

CPU_MAX_PARAMS = 800_000_000  # gpt2-large (774M) trains at its real shape on 2 CPU cores; TinyLlama (1.1B) not
ROWS = {"train": 64, "eval": 24, "test": 8}
LM_ROWS = {"train": 240, "eval": 120, "test": 24}  # text lines: enough for a few 256-token blocks per split


@dataclass(frozen=True)
class Promise:
    """An output a seed's document promises: a path (glob) under the seed's directory, how many files must
    match, and keys each must hold (JSON keys or CSV columns; glob patterns such as ``*_bleu``)."""

    what: str
    path: str
    keys: tuple[str, ...] = ()
    count: int = 1
    text: tuple[str, ...] = ()  # for text files: strings that must appear
    pattern: str | None = None  # for text files: a regular expression that must match
    gpu_keys: tuple[str, ...] = ()  # keys required too when the replay runs on a GPU
    values: str | None = None  # the values file whose experiment ``{exp}`` is (default: each of the seed's)


@dataclass(frozen=True)
class Seed:
    id: str
    title: str
    values: tuple[str, ...]
    promises: tuple[Promise, ...]
    sanity_runs: tuple[tuple[str, str], ...] = ()  # (values file, run): seed 001's pre-flight checks
    generate: str | None = None  # a model whose generation is checked (seed 004's problem 0)


def _eval(run: str, split: str, job: str = "eval") -> tuple[Promise, ...]:
    d = f"outputs/{{exp}}/{run}/{job}/{split}"
    return (Promise(f"{run}: {split} results", f"{d}/results.json", ("accuracy",)),
            Promise(f"{run}: {split} confusion matrix", f"{d}/confusion_matrix.png"),
            Promise(f"{run}: {split} predictions", f"{d}/predictions.csv"))


def _report(*keys: str, gpu_keys: tuple[str, ...] = ()) -> tuple[Promise, ...]:
    return (Promise("comparison table", "comparison/{exp}/comparison_table.csv", ("run",)),
            Promise("method table", "comparison/{exp}/method_table.csv", ("run", *keys), gpu_keys=gpu_keys),
            Promise("report", "comparison/{exp}/report.md"))


GENERATION_PROMPT = "The film was"
# generate prints a header naming the prompt, then the prompt and its continuation on a line of their own
GENERATED = r"(?m)^" + re.escape(GENERATION_PROMPT) + r"[ \t]*\S"
SANITY_CHECKS = ("model_loads", "trainable", "data", "gradient_flow", "overfit", "mlflow", "reproducible")
SEEDS: tuple[Seed, ...] = (
    Seed("000", "GPT-2 large LoRA on MultiNLI, baseline vs fine-tuned", ("mnli.yaml",), (
        *_eval("baseline", "validation_matched", "eval-job"), *_eval("baseline", "validation_mismatched", "eval-job"),
        *_eval("lora", "validation_matched"), *_eval("lora", "validation_mismatched"),
        Promise("lora: combined results", "outputs/{exp}/lora/metrics.json",
                ("validation_matched_accuracy", "validation_mismatched_accuracy")),
        Promise("lora: adapter", "outputs/{exp}/lora/final/adapter_model.safetensors"),
        *_report("trainable_params"),
        Promise("baseline vs fine-tuned plot", "comparison/{exp}/comparison.png"),
        Promise("improvements", "comparison/{exp}/improvements.json", ("improvements",)),
    )),
    Seed("001", "TinyLlama LoRA vs full fine-tuning on MRPC, SST-2, RTE and SQuAD v2, with sanity checks",
         ("glue.yaml", "squad_v2.yaml"), (
             *(Promise(f"{t}-{m}: validation results", f"outputs/{{exp}}/{t}-{m}/eval/validation/results.json",
                       ("accuracy",), values="glue.yaml") for t in ("mrpc", "sst2", "rte") for m in ("lora", "full")),
             *(Promise(f"squad {m}: EM/F1/HasAns/NoAns", f"outputs/{{exp}}/{m}/eval/validation/results.json",
                       ("exact", "f1", "HasAns_exact", "HasAns_f1", "NoAns_exact", "NoAns_f1"), values="squad_v2.yaml")
               for m in ("lora", "full")),
             *_report("trainable_params", "train_runtime_s"),
             *(Promise(f"sanity checks ({run})", f"logs/sanity-{run}.txt", text=SANITY_CHECKS)
               for run in ("mrpc-lora", "mrpc-full")),
         ), sanity_runs=(("glue.yaml", "mrpc-lora"), ("glue.yaml", "mrpc-full"))),
    Seed("002", "GPT-2 on IMDB: head-only vs LoRA vs QLoRA (nf4, double quantisation, checkpointing)",
         ("imdb.yaml",), (
             *(p for run in ("head-only", "lora", "qlora") for p in _eval(run, "test")),
             *(Promise(f"{run}: results", f"outputs/{{exp}}/{run}/metrics.json", ("test_accuracy",))
               for run in ("head-only", "lora", "qlora")),
             Promise("qlora: nf4 double-quantised spec", "outputs/{exp}/qlora/final/lora_exp_run.yaml",
                     text=("quant_type: nf4", "double_quant: true", "gradient_checkpointing: true")),
             *_report("trainable_params", "trainable_share"),
         )),
    Seed("003", "GPT-2 on WikiText-2: full fine-tuning vs LoRA, the full comparison table", ("wikitext.yaml",), (
        *(Promise(f"{run}: results", f"outputs/{{exp}}/{run}/metrics.json", ("validation_loss",))
          for run in ("full", "lora")),
        *_report("size_mb", "trainable_params", "train_runtime_s", "peak_cpu_memory_mb", "best_train_loss",
                 "best_val_loss", "*_bleu", "*_sacrebleu", "*_rouge1", "*_rouge2", "*_rougeL", "*_ter", "*_chrf",
                 "*_meteor", gpu_keys=("peak_gpu_memory_mb",)),
    )),
    Seed("004", "GPT-2 LoRA on CoLA, KD and no-KD RNN students, generation check", ("cola.yaml",), (
        *(Promise(f"{run}: validation accuracy", f"outputs/{{exp}}/{run}/metrics.json", ("validation_accuracy",))
          for run in ("gpt2-base", "gpt2-medium")),
        Promise("KD students (3 seeds)", "outputs/{exp}/kd-rnn/seed-*/metrics.json", ("validation_accuracy",), 3),
        Promise("no-KD students (3 seeds)", "outputs/{exp}/no-kd-rnn/seed-*/metrics.json",
                ("validation_accuracy",), 3),
        *_report("trainable_params"),
        Promise("KD vs no KD across seeds", "comparison/{exp}/arms_table.csv", ("arm",)),
        Promise("learning curves", "comparison/{exp}/learning_curves.png"),
        Promise("generation check (text after the prompt)", "logs/generate.txt", pattern=GENERATED),
    ), generate="openai-community/gpt2"),
)


@dataclass
class SeedResult:
    seed: Seed
    shapes: dict[str, str] = field(default_factory=dict)  # model -> shape used, with its parameter count
    overrides: list[str] = field(default_factory=list)
    commands: list[dict[str, Any]] = field(default_factory=list)
    outputs: list[dict[str, Any]] = field(default_factory=list)
    measured: list[dict[str, Any]] = field(default_factory=list)  # per train run: speed and peak memory
    seconds: float = 0.0

    @property
    def missing(self) -> list[str]:
        return [f"seed {self.seed.id}: {o['what']}: {o['path']} {o['problem']}" for o in self.outputs if o["problem"]]

    @property
    def failed_commands(self) -> list[str]:
        return [f"seed {self.seed.id}: `{c['command']}` exited {c['exit']} (log: {c['log']})"
                for c in self.commands if c["exit"] not in (0, *c.get("accept", ()))]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seeds", default=",".join(s.id for s in SEEDS),
                   help="comma-separated seed ids (default: all: %(default)s)")
    p.add_argument("--shape", choices=("auto", "full", "small", "tiny"), default="auto",
                   help="model shapes: auto = real up to --cpu-max-params, small above (CPU); full = every model "
                        "at its real shape (GPU); tiny = the smallest of each family (CI)")
    p.add_argument("--cpu-max-params", type=float, default=CPU_MAX_PARAMS,
                   help="auto: largest model replayed at its real shape (default %(default).0f)")
    p.add_argument("--steps", type=int, default=2, help="training.max_steps of every train run (default 2)")
    p.add_argument("--values-dir", default="values", help="where the seeds' values files are")
    p.add_argument("--out", default="outputs/seeds", help="replay directory (models, data, runs, report)")
    p.add_argument("--check-only", action="store_true",
                   help="run nothing: check the promised outputs of an earlier replay in --out and rewrite its report")


def main(args: argparse.Namespace) -> int:
    wanted = [s.strip() for s in args.seeds.split(",") if s.strip()]
    unknown = sorted(set(wanted) - {s.id for s in SEEDS})
    if unknown:
        raise errors.UserError(f"--seeds: unknown seed(s) {unknown}; the seeds are {[s.id for s in SEEDS]}")
    if args.steps < 1:
        raise errors.UserError("--steps: must be at least 1")
    values_dir = Path(args.values_dir)
    for seed in SEEDS:
        for v in seed.values:
            if seed.id in wanted and not (values_dir / v).is_file():
                raise errors.UserError(f"--values-dir: {values_dir / v} (seed {seed.id}) not found")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    results = [replay_seed(seed, values_dir, out, args) for seed in SEEDS if seed.id in wanted]
    write_report(results, out, args)
    problems = [p for r in results for p in (*r.failed_commands, *r.missing)]
    for p in problems:
        log.error("%s", p)
    log.info("replay report: %s", out / "report.md")
    return errors.INTERNAL if problems else errors.OK


def shape_for(name: str, args: argparse.Namespace) -> tuple[str, int, str]:
    """The shape ``name`` is replayed at, its parameter count and why. ``auto``: the real shape up to
    ``--cpu-max-params``, ``small`` above.

    Why not ``lora-exp plan``: it sizes every batch at ``model.max_length`` (the worst case a run must
    survive), and the replay's rows are short: it judged gpt2-medium's CoLA LoRA run (batch 128) at 41 GB,
    which ran here at its real shape in 6.8 GB.
    """
    from lora_exp.replay.replicas import parameter_count

    if args.shape != "auto":
        return args.shape, parameter_count(name, args.shape), f"--shape {args.shape}"
    full = parameter_count(name)
    if full > args.cpu_max_params:
        return ("small", parameter_count(name, "small"),
                f"{full / 1e6:,.0f}M parameters at its real shape, above --cpu-max-params "
                f"{args.cpu_max_params / 1e6:,.0f}M (minutes per step on CPU)")
    return "full", full, f"real shape (within --cpu-max-params {args.cpu_max_params / 1e6:,.0f}M)"


def replay_seed(seed: Seed, values_dir: Path, out: Path, args: argparse.Namespace) -> SeedResult:
    start = time.monotonic()
    res = SeedResult(seed)
    seed_dir = out / seed.id
    (seed_dir / "logs").mkdir(parents=True, exist_ok=True)
    log.info("seed %s: %s", seed.id, seed.title)
    docs = {v: yaml.safe_load((values_dir / v).read_text()) for v in seed.values}
    if not args.check_only:
        # A replay starts from nothing: a finished run from an earlier replay would otherwise be taken as done,
        # and one with other --steps or --shape refused as a changed spec.
        shutil.rmtree(seed_dir)
        (seed_dir / "logs").mkdir(parents=True)
        run_seed(seed, docs, values_dir, out, args, res)
    exps = {v: d["experiment"]["name"] for v, d in docs.items()}
    res.outputs = [check(p, seed_dir, exp) for p in seed.promises for exp in _experiments_of(p, exps)]
    res.measured = measured(seed_dir)
    res.seconds = time.monotonic() - start
    log.info("seed %s: %d of %d promised outputs present (%.0f s)", seed.id,
             sum(not o["problem"] for o in res.outputs), len(res.outputs), res.seconds)
    return res


def run_seed(seed: Seed, docs: dict[str, Any], values_dir: Path, out: Path, args: argparse.Namespace,
             res: SeedResult) -> None:
    """Make the seed's data and models, write its derived values files and run its commands."""
    from lora_exp.core import registry
    from lora_exp.replay import replicas
    from lora_exp.tasks import Task

    seed_dir = out / seed.id
    runs = [r for v in docs for r in resolve_runs(str(values_dir / v), None, [])]
    # Data: one set of hub-format files per task the seed's runs use.
    files: dict[str, dict[str, str]] = {}
    tasks = {r.spec.task.name: cast(Task, registry.TASKS.get(r.spec.task.name)) for r in runs}
    for name, task in tasks.items():
        files[name] = replicas.write_data(task, out / "data" / name, LM_ROWS if task.kind == "lm" else ROWS)
    corpus = replicas.corpus_of((p for f in files.values() for p in f.values()), tasks.values())
    # Models: one replica per hub model the seed names (and the generation check's).
    models = {r.spec.model.name for r in runs} | ({seed.generate} if seed.generate else set())
    local: dict[str, str] = {}
    for name in sorted(models):
        shape, params, why = shape_for(name, args)
        # One replica per model, shape and corpus: seeds whose data differ train tokenizers of their own, and an
        # earlier seed's adapters keep the base model they were trained on.
        slug = f"{replicas.canonical(name).replace('/', '--')}-{shape}-{replicas.corpus_digest(corpus)[:8]}"
        local[name] = str(replicas.write_model(name, out / "models" / slug, shape, corpus))
        res.shapes[name] = f"{shape} ({params / 1e6:,.1f}M parameters): {why}"
        log.info("seed %s: %s as %s", seed.id, name, res.shapes[name])
    # A store per seed, in the seed's directory (artifacts too: ./mlartifacts of the commands' working directory).
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{seed_dir / 'mlflow.db'}"}
    sets = [f"output_root={seed_dir / 'outputs'}", f"training.max_steps={args.steps}"]
    for v, doc in docs.items():
        derived = seed_dir / v
        res.overrides += rewrite(doc, local, files, args.steps)
        derived.write_text(f"# {values_dir / v} for `lora-exp replay` (seed {seed.id}): model and data sources "
                           "replaced, steps capped.\n" + yaml.dump(doc, Dumper=_NoAliases, sort_keys=False))
        exp = doc["experiment"]["name"]
        stem = Path(v).stem
        _command(res, seed_dir, f"run-{stem}", ["run", "-f", str(derived), *_sets(sets)], env)
        _command(res, seed_dir, f"compare-{stem}",
                 ["compare", "-f", str(derived), "--out", str(seed_dir / "comparison" / exp)], env)
    for v, run in seed.sanity_runs:
        # A FAIL verdict (exit 3) is a finding about random weights, not a missing output: the table is checked.
        _command(res, seed_dir, f"sanity-{run}", ["sanity", "-f", str(seed_dir / v), "--run", run, *_sets(sets)], env,
                 accept=(errors.SANITY_FAILED,))
    if seed.generate:
        _command(res, seed_dir, "generate", ["generate", "--model", local[seed.generate], "--max-new-tokens", "16",
                                             "--prompt", GENERATION_PROMPT], env)


def _experiments_of(p: Promise, exps: dict[str, str]) -> list[str]:
    """The experiments a promise is checked in: its own values file's, else each of the seed's."""
    if "{exp}" not in p.path:
        return [""]
    return [exps[p.values]] if p.values else list(exps.values())


def _sets(sets: list[str]) -> list[str]:
    return [a for s in sets for a in ("--set", s)]


def _command(res: SeedResult, seed_dir: Path, name: str, argv: list[str], env: dict[str, str],
             accept: tuple[int, ...] = ()) -> None:
    logfile = seed_dir / "logs" / f"{name}.txt"
    cmd = [sys.executable, "-m", "lora_exp", *argv]
    log.info("seed %s: lora-exp %s (log: %s)", res.seed.id, " ".join(argv[:3]), logfile)
    start = time.monotonic()
    with logfile.open("w") as fh:
        code = subprocess.call(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=seed_dir)
    seconds = time.monotonic() - start
    log.info("seed %s: %s exited %d after %.0f s", res.seed.id, name, code, seconds)
    res.commands.append({"command": "lora-exp " + " ".join(argv), "exit": code, "accept": list(accept),
                         "seconds": round(seconds, 1), "log": str(logfile)})


def _run_tasks(exp: dict[str, Any]) -> dict[str, str]:
    """Run name -> task name, from the file as written (a run's task over the defaults')."""
    default = ((exp.get("defaults") or {}).get("task") or {}).get("name")
    return {name: str(((run or {}).get("task") or {}).get("name", default)) for name, run in exp["runs"].items()}


def rewrite(doc: dict[str, Any], local: dict[str, str], files: dict[str, dict[str, str]], steps: int) -> list[str]:
    """Point the file's models and data at the replicas (in place); returns what changed, one line each."""
    exp = doc["experiment"]
    changes = []
    exp["defaults"] = exp.get("defaults") or {}
    layers = {"defaults": exp["defaults"], **{f"runs.{n}": r or {} for n, r in exp["runs"].items()}}
    for where, layer in layers.items():
        model = layer.get("model")
        if model and model.get("name") in local:
            layer["model"] = {**model, "name": local[model["name"]]}
            changes.append(f"{where}.model.name: {model['name']} -> {local[model['name']]}")
    for name, task in _run_tasks(exp).items():
        run = exp["runs"][name] = dict(exp["runs"][name] or {})
        run["data"] = {**(run.get("data") or {}), "data_files": files[task]}
        changes.append(f"runs.{name}.data.data_files: {task} in the hub's splits {sorted(files[task])}")
        training = {**(exp["defaults"].get("training") or {}), **(run.get("training") or {})}
        if training.get("logging_steps", 10) > steps:
            run["training"] = {**(run.get("training") or {}), "logging_steps": steps}
            changes.append(f"runs.{name}.training.logging_steps: {training.get('logging_steps', 10)} -> {steps} "
                           "(the step cap would leave no loss curve)")
    changes.append(f"training.max_steps: {steps} (--set)")
    return changes


class _NoAliases(yaml.SafeDumper):
    """The derived file spells every merged anchor out: it is read by people comparing it with the original."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def check(p: Promise, seed_dir: Path, exp: str) -> dict[str, Any]:
    """Whether a promised output is there and holds what it should; ``problem`` is empty when it does."""
    pattern = p.path.format(exp=exp)
    found = sorted(seed_dir.glob(pattern))
    problem = ""
    if len(found) < p.count:
        problem = f"missing ({len(found)} of {p.count} files)" if p.count > 1 else "missing"
    for f in found:
        if problem:
            break
        keys = (*p.keys, *(p.gpu_keys if _cuda() else ()))
        if keys:
            have = _keys(f)
            lost = [k for k in keys if not fnmatch.filter(have, k)]
            if lost:
                problem = f"lacks {lost} ({f.name} has {sorted(have)[:12]}...)"
        if p.text or p.pattern:
            body = f.read_text(errors="replace")
            lost = [t for t in p.text if t not in body]
            if p.pattern and not re.search(p.pattern, body):
                lost.append(p.pattern)
            if lost:
                problem = f"lacks {lost}"
    return {"what": p.what, "path": str(seed_dir / pattern), "files": [str(f) for f in found], "problem": problem}


def _keys(path: Path) -> list[str]:
    if path.suffix == ".json":
        doc = json.loads(path.read_text())
        return list(doc) if isinstance(doc, dict) else []
    if path.suffix == ".csv":
        with path.open() as fh:
            header = next(csv.reader(fh), [])
        # A column counts only where some row fills it: an empty column is a promise not kept.
        with path.open() as fh:
            rows = list(csv.DictReader(fh))
        return [h for h in header if any(r.get(h) not in ("", None) for r in rows)]
    return []


MEASURED = ("train_samples_per_second", "train_runtime_s", "peak_gpu_memory_mb", "peak_cpu_memory_mb",
            "trainable_params")


def measured(seed_dir: Path) -> list[dict[str, Any]]:
    """Samples/s and peak memory of each trained run, from the comparisons' method tables."""
    rows = []
    for table in sorted(seed_dir.glob("comparison/*/method_table.csv")):
        with table.open() as fh:
            for r in csv.DictReader(fh):
                if r.get("train_runtime_s"):
                    rows.append({"experiment": table.parent.name, "run": r["run"],
                                 **{k: r.get(k, "") for k in MEASURED}})
    return rows


def _cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def _device() -> str:
    import torch

    return f"GPU {torch.cuda.get_device_name()}" if _cuda() else f"CPU, {os.cpu_count()} cores"


def write_report(results: list[SeedResult], out: Path, args: argparse.Namespace) -> None:
    lines = [f"# Seed replay ({args.shape} shapes, {args.steps} steps per train run, {_device()})\n",
             "Random-weight models of the seeds' architectures on hub-format local data: this shows that each "
             "experiment starts, fits, finishes and writes its outputs, not what it scores.\n"]
    for r in results:
        ok = not (r.missing or r.failed_commands)
        lines += [f"## Seed {r.seed.id}: {r.seed.title} ({'PASS' if ok else 'FAIL'}, {r.seconds:.0f} s)\n",
                  "Models: " + "; ".join(f"`{k}` {v}" for k, v in r.shapes.items()) + "\n",
                  "Overrides:\n", *(f"- {c}" for c in r.overrides), "",
                  markdown_table([{"command": f"`{c['command'][:90]}`", "exit": c["exit"], "seconds": c["seconds"]}
                                  for c in r.commands]), "",
                  markdown_table([{"output": o["what"], "status": o["problem"] or "ok",
                                   "path": ", ".join(o["files"][:3]) or o["path"]} for o in r.outputs]), "",
                  "Measured (the comparison's method table):\n", markdown_table(r.measured) if r.measured else "none",
                  ""]
    (out / "report.md").write_text("\n".join(lines))
    (out / "report.json").write_text(json.dumps([{
        "seed": r.seed.id, "title": r.seed.title, "shapes": r.shapes, "overrides": r.overrides,
        "commands": r.commands, "outputs": r.outputs, "measured": r.measured, "seconds": round(r.seconds, 1)}
        for r in results], indent=2))
    print(text_table([{"seed": r.seed.id, "outputs": f"{sum(not o['problem'] for o in r.outputs)}/{len(r.outputs)}",
                       "commands failed": len(r.failed_commands), "seconds": round(r.seconds)} for r in results]))
