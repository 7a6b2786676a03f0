"""Every check that can run before anything is loaded or written: what ``lora-exp validate`` runs, and what
every job runs first, so a bad input fails in seconds with exit 2 whether it is caught by the chart's
validate init container or by the job itself.

The spec was already checked against the schema and its task, formulation and method when it was resolved
(``lora_exp.config.loading``); this adds what needs the file system and the environment: the model source
(config, tokenizer files, position limit, the offline cache), the data rows, the output directory, the
tracking URI, optional packages and WordNet. It imports no ML library.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

from lora_exp.config.fields import tracking_scheme_problem
from lora_exp.config.loading import Run, flatten
from lora_exp.config.schema import RunSpec
from lora_exp.core import hub
from lora_exp.core.errors import SpecError, UserError
from lora_exp.core.layout import SPEC_FILE
from lora_exp.engine.data import validate_data
from lora_exp.methods import get_method
from lora_exp.metrics.generation import check_wordnet
from lora_exp.tasks import LM, formulation_kind, get_task
from lora_exp.tracking.faults import missing_package
from lora_exp.tracking.server import redact, tracking_uri

# A saved tokenizer has at least one of these (fast tokenizers: tokenizer.json; slow ones: their vocab).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model")
# Where model configs keep the longest sequence the position embeddings allow.
POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def preflight(run: Run) -> list[str]:
    """Raise UserError/SpecError/DataError on the first problem; else one summary line per area checked."""
    spec = run.spec
    lines = [check_output_root(spec), check_tracking_uri(spec), check_resume(run)]
    lines.append(check_model(spec))
    check_packages(spec)
    check_model_sources(run)
    task = get_task(spec)
    if task.kind == LM and spec.eval.generation_samples > 0:
        check_wordnet()
    lines.append(check_hub_data(spec) or validate_data(spec))
    return lines


def is_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or Path(name).expanduser().exists()


def check_output_root(spec: RunSpec) -> str:
    """<output_root> is (or can become) a writable directory: not a file, not under one."""
    root = Path(spec.output_root).expanduser()
    probe = root
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        where = "is a file" if probe == root else f"is under a file ({probe})"
        raise SpecError(f"output_root: {root} {where}")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"output_root: {probe} is not writable (by uid {os.getuid()})")
    return f"outputs: {root}"


# The same store may be reached another way (a new password); what is sampled about the machine is no experiment.
IGNORED_CHANGES = ("tracking.tracking_uri", "tracking.system_metrics", "tracking.system_metrics_interval")


def changed_fields(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """``path: old -> new`` for each field that differs (fields a newer version added are not changes)."""
    old, new = flatten(before), flatten(after)
    return [f"{k}: {old[k]!r} -> {new.get(k)!r}" for k in old
            if k not in IGNORED_CHANGES and old[k] != new.get(k)]


def check_resume(run: Run) -> str:
    """A run directory belongs to the spec it started with: its checkpoints and MLflow run continue that
    experiment. Rerunning it with another spec would mix two experiments in one result, so it is refused."""
    started = run.dir.started_spec()
    if started is None or run.spec.job == "eval":
        return f"run dir: {run.dir.root} (new)" if started is None else f"run dir: {run.dir.root}"
    changes = changed_fields(started, run.spec.model_dump(mode="json"))
    if changes:
        shown = "; ".join(changes[:5]) + (f"; and {len(changes) - 5} more" if len(changes) > 5 else "")
        raise SpecError(f"run {run.name}: {run.dir.root} holds a run started with another spec ({shown}); rerun "
                        "with --restart to move it aside and start afresh, or restore the spec")
    return f"run dir: {run.dir.root} ({'finished' if run.dir.finished else 'resumes'})"


def check_tracking_uri(spec: RunSpec) -> str:
    """The URI names a store MLflow has, whose packages import here (``lora_exp.tracking.faults``: a missing
    cryptography or psycopg is exit 2 now, not a retried 'server does not answer' later), and a sqlite store
    can be created."""
    uri = tracking_uri(spec.tracking.tracking_uri)
    source = ("tracking.tracking_uri" if spec.tracking.tracking_uri else
              "$MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI") else "tracking (the default store)")
    problem = tracking_scheme_problem(uri)
    if problem:
        raise SpecError(f"{source}: {redact(uri)}: {problem}")
    problem = missing_package(uri)
    if problem:
        raise UserError(f"{source}: {redact(uri)}: {problem}")
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        parent = db.parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if not parent.is_dir() or not os.access(parent, os.W_OK):
            raise UserError(f"tracking: the sqlite store {db} cannot be created ({parent} is not a writable dir)")
    return f"tracking: {redact(uri)}"


def local_model_config(name: str) -> dict[str, Any]:
    """A local model directory's config.json, after checking it holds a model and a tokenizer."""
    path = Path(name).expanduser()
    if not (path / "config.json").is_file():
        raise UserError(f"model.name: {name} is not a saved model directory (no config.json)"
                        + ("" if path.exists() else "; it does not exist"))
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise UserError(f"model.name: {name} has no tokenizer files (one of {', '.join(TOKENIZER_FILES)}); save "
                        "the tokenizer with the model (tokenizer.save_pretrained)")
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"model.name: {path / 'config.json'} is not readable JSON ({e})") from None
    if not isinstance(config, dict):
        raise UserError(f"model.name: {path / 'config.json'} is not a JSON object")
    check_model_files(path)
    return config


def check_model_files(path: Path) -> None:
    """What loading would trip on after seconds of work, found by reading headers only: every safetensors file
    whole (its header's tensors inside the file: a truncated download or copy), tokenizer.json parseable."""
    from safetensors import SafetensorError, safe_open  # the Rust reader alone: no framework is imported

    for weights in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(str(weights), framework="numpy"):
                pass
        except (SafetensorError, OSError) as e:
            raise UserError(f"model.name: {weights} is not a whole safetensors file ({e}); download or copy it "
                            "again") from None
    tokenizer = path / "tokenizer.json"
    if tokenizer.is_file():
        try:
            json.loads(tokenizer.read_bytes())
        except (OSError, ValueError) as e:
            raise UserError(f"model.name: {tokenizer} is not readable JSON ({e}); save the tokenizer again") from None


def cached_hub_config(name: str, revision: str | None) -> dict[str, Any] | None:
    """The config of a hub model from the local hub cache, without any network access (None if absent)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - transformers depends on it
        return None
    found = try_to_load_from_cache(name, "config.json", revision=revision)
    if not isinstance(found, str):
        return None
    try:
        config = json.loads(Path(found).read_text())
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def check_position_limit(spec: RunSpec, config: dict[str, Any], where: str) -> None:
    limits = {k: config[k] for k in POSITION_KEYS if isinstance(config.get(k), int) and config[k] > 0}
    if limits:
        key, limit = next(iter(limits.items()))
        if spec.model.max_length > limit:
            raise SpecError(f"model.max_length: {spec.model.max_length} is beyond the model's {limit} positions "
                            f"({where} {key}); lower it to {limit} or less")


def check_model(spec: RunSpec) -> str:
    """The model source: a local dir with config and tokenizer, or a hub id (in the cache when offline)."""
    name = spec.model.name
    if is_local(name):
        config: dict[str, Any] | None = local_model_config(name)
        where = f"{name}/config.json"
    else:
        config = cached_hub_config(name, spec.model.revision)
        where = f"{name} config.json (hub cache)"
        if config is None and hub.hub_offline():
            raise UserError(f"model.name: {name} is not in the local hub cache and the hub is off "
                            f"({hub.which(hub.HUB_VARIABLES)}); fill the cache first "
                            "(README: Air-gapped mode)")
    if config is not None:
        check_position_limit(spec, config, where)
        get_method(spec.method.name).check_model(spec, config)
        return f"model: {name} ({config.get('model_type', '?')})"
    return f"model: hub {name} (checked when the job loads it)"


def check_packages(spec: RunSpec) -> None:
    """Optional dependencies a spec needs, found without importing them."""
    if spec.training.zero_stage and spec.training.sharding == "zero" and importlib.util.find_spec("deepspeed") is None:
        raise UserError("training.zero_stage needs DeepSpeed: pip install --no-build-isolation 'lora-exp[deepspeed]'")
    if spec.training.liger_kernels is True and importlib.util.find_spec("liger_kernel") is None:
        raise UserError("training.liger_kernels needs the liger-kernel package (CUDA GPUs): pip install liger-kernel")
    flash = {"flash_attention_2": ("flash_attn", "flash-attn"), "flash_attention_3": ("flash_attn_interface",
                                                                                     "flash-attn-3 (Hopper)")}
    if spec.model.attn_implementation in flash:
        module, package = flash[spec.model.attn_implementation]
        if importlib.util.find_spec(module) is None:
            raise UserError(f"model.attn_implementation {spec.model.attn_implementation} needs the {package} package "
                            "(CUDA GPUs only); or use auto/sdpa")
    for package in get_method(spec.method.name).packages:
        if importlib.util.find_spec(package) is None:
            raise UserError(f"method {spec.method.name} needs {package}: pip install 'lora-exp[{spec.method.name}]'")


def check_model_sources(run: Run) -> None:
    """Artifacts named by path (an eval job's model, a distillation teacher) exist, are lora-exp artifacts
    and fit this run (formulation and labels)."""
    from lora_exp.engine.artifacts import read_spec

    spec = run.spec
    paths = [("eval.model_path", spec.eval.model_path)]
    if spec.distill is not None:
        paths.append(("distill.teacher.model_path", spec.distill.teacher.model_path))
    siblings = run.experiment_dir.resolve()  # where the other runs of this experiment write
    for field, value in paths:
        if not value:
            continue
        if not Path(value).exists() and Path(value).resolve().is_relative_to(siblings):
            continue  # another run of this experiment produces it (possibly in a Job running beside this one)
        if not (Path(value) / SPEC_FILE).is_file():
            raise UserError(f"{field}: {value} is not a lora-exp artifact (no {SPEC_FILE})"
                            + ("" if Path(value).exists() else "; it does not exist"))
        trained = read_spec(Path(value))
        task, trained_task = get_task(spec), get_task(trained)
        if getattr(task, "labels", ()) != getattr(trained_task, "labels", ()):
            raise UserError(f"{field}: {value} was trained for labels {list(getattr(trained_task, 'labels', ()))}, "
                            f"this run has {list(getattr(task, 'labels', ()))}")
        if field == "eval.model_path" and formulation_kind(trained, trained_task) != formulation_kind(spec, task):
            raise UserError(f"{field}: {value} was trained with formulation "
                            f"{formulation_kind(trained, trained_task)!r}, this run uses "
                            f"{formulation_kind(spec, task)!r}")


def check_hub_data(spec: RunSpec) -> str | None:
    """Hub data sets load when the job starts; offline they must already be cached. None for local files."""
    if spec.data.data_files:
        return None
    task = get_task(spec)
    path = spec.data.hub_path or task.hub_path
    config = spec.data.hub_config or task.hub_config
    if not path:
        raise SpecError(f"data: task {task.name!r} has no hub data set; give data.data_files")
    label = f"{path}{'/' + config if config else ''}"
    if hub.datasets_offline() and not hub_dataset_cached(path):
        raise UserError(f"data: hub data set {label} is not in the local cache and the hub is off "
                        f"({hub.which(hub.DATASETS_VARIABLES)}); fill the cache first "
                        "(README: Air-gapped mode)")
    return f"data: hub data set {label} (checked when the job loads it)"


def hub_dataset_cached(path: str) -> bool:
    """Either cache ``datasets`` reads offline: the hub's snapshot cache or its own processed cache."""
    from huggingface_hub import constants

    hub = Path(constants.HF_HUB_CACHE) / f"datasets--{path.replace('/', '--')}"
    datasets_cache = Path(os.environ.get("HF_DATASETS_CACHE") or Path(constants.HF_HOME) / "datasets")
    return hub.is_dir() or (datasets_cache / path.replace("/", "___")).is_dir()
