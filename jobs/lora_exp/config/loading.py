"""Values file -> named, fully resolved, checked runs.

``resolve_runs`` reads the ``experiment`` section, deep-merges each run over ``defaults`` and the ``--set``
overrides, validates the result as a :class:`RunSpec` and asks the run's task and method whether the spec
fits them (``check_run``). Every problem is one line naming the file, the layer (defaults, a run, --set)
and the path as the user wrote it.
"""

from __future__ import annotations

import argparse
import copy
import os
from pathlib import Path
from typing import Any, Protocol, cast

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from lora_exp.config.fields import redact_uri
from lora_exp.config.schema import ExperimentFile, RunSpec
from lora_exp.core import registry
from lora_exp.core.errors import SpecError
from lora_exp.core.layout import RunDir


class Run(BaseModel):
    """A resolved run and where it came from (for messages and MLflow tags). A repeat of a run that declares
    ``repeats``/``seeds`` is named ``<run>/seed-<seed>`` and belongs to the group ``<run>``."""

    model_config = ConfigDict(frozen=True, defer_build=True)  # built at first use: the plugins registered by then
    experiment: str
    name: str
    spec: RunSpec
    source: str
    group: str | None = None
    sweep: str | None = None  # the sweep (run key) this run is a trial of
    parent_run_id: str | None = None  # its MLflow parent run (the sweep's)

    @property
    def experiment_dir(self) -> Path:
        """Where every run of the experiment writes: ``<output_root>/<experiment>``."""
        return Path(self.spec.output_root) / self.experiment

    @property
    def output_dir(self) -> Path:
        return self.experiment_dir / self.name

    @property
    def dir(self) -> RunDir:
        return RunDir(self.output_dir)

    @property
    def experiment_name(self) -> str:
        return self.spec.tracking.experiment_name or self.experiment

    @property
    def run_name(self) -> str:
        return self.spec.tracking.run_name or self.name


class _SpecChecker(Protocol):
    def check_spec(self, spec: RunSpec) -> None: ...


def check_run(spec: RunSpec) -> None:
    """What the schema alone cannot see: does the spec fit its task (fields, template, formulation, the
    metric a sweep optimises) and its method (e.g. head-only needs a head)? Each plugin raises SpecError
    naming the field. A sweep's fields must be spec fields that take the values it tries."""
    cast(_SpecChecker, registry.TASKS.get(spec.task.name)).check_spec(spec)
    cast(_SpecChecker, registry.METHODS.get(spec.method.name)).check_spec(spec)
    if spec.sweep is not None:
        check_sweep_params(spec)


def set_path(doc: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A copy of ``doc`` with the dotted ``path`` set to ``value``."""
    return deep_merge(doc, _nested(path.split("."), value))


def _nested(parts: list[str], value: Any) -> dict[str, Any]:
    return {parts[0]: _nested(parts[1:], value) if len(parts) > 1 else value}


def trial_spec(spec: RunSpec, values: dict[str, Any]) -> RunSpec:
    """The spec of one sweep trial: ``values`` (dotted path -> value) set, the sweep itself removed."""
    doc = spec.model_dump(mode="json", exclude={"sweep"})
    for path, value in values.items():
        doc = set_path(doc, path, value)
    return RunSpec.model_validate(doc)


def check_sweep_params(spec: RunSpec) -> None:
    """Every searched field exists and takes every value tried (the range's ends, each choice)."""
    assert spec.sweep is not None
    for path, param in spec.sweep.params.items():
        if path.split(".")[0] in ("sweep", "repeats", "seeds", "job"):
            raise SpecError(f"sweep.params.{path}: not a field a trial can vary")
        tried = param.choices if param.choices is not None else [param.low, param.high]
        for value in tried:
            if param.is_int and isinstance(value, float):
                value = int(value)
            try:
                check_run(trial_spec(spec, {path: value}))
            except ValidationError as e:
                first = e.errors()[0]
                where = ".".join(str(x) for x in first["loc"])
                problem = "no such field" if first["type"] == "extra_forbidden" else first["msg"]
                raise SpecError(f"sweep.params.{path}: {value!r} does not fit the spec ({where}: {problem})") \
                    from None


def parse_run_spec(data: Any) -> RunSpec:
    """Validate and check a complete run spec (e.g. the one stored in an artifact)."""
    spec = RunSpec.model_validate(data)
    check_run(spec)
    return spec


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Return ``base`` updated by ``over``, recursing into mappings (lists and scalars replace)."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_set(items: list[str]) -> dict[str, Any]:
    """Turn ``["training.epochs=1", "method.r=4"]`` into a nested dict; values are parsed as YAML scalars."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise SpecError(f"--set {item!r}: expected KEY=VALUE, e.g. training.epochs=1")
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise SpecError(f"--set {item!r}: {part} is both a value and a section")
        value = yaml.safe_load(raw) if raw else ""
        if isinstance(value, (dict, list)) and not raw.lstrip().startswith(("{", "[")):
            value = raw  # "a: b" is text here, not a mapping (templates contain colons)
        node[parts[-1]] = value
    return out


def format_errors(err: ValidationError, where: str, origins: list[tuple[str, dict[str, Any]]] | None = None) -> str:
    """One line per problem, ``<file>: <path>: <message>``, the path as the user wrote it.

    ``origins`` are the layers a run was merged from (label, dict), last wins; a path is reported under
    the last layer that holds it, so a typo in ``defaults`` is not blamed on a run.
    """
    method_tags = set(registry.METHODS.names())
    lines = []
    for e in err.errors():
        # Drop discriminator tags (e.g. 'lora' in method.lora.r) so the path is what the user wrote.
        loc = [str(p) for i, p in enumerate(e["loc"])
               if not (i > 0 and e["loc"][i - 1] == "method" and isinstance(p, str) and p in method_tags)]
        path = ".".join(loc) or "(top level)"
        prefix = where
        for label, layer in reversed(origins or []):
            if _has_path(layer, loc):
                prefix = label
                break
        msg = "unknown key (misspelled?)" if e["type"] == "extra_forbidden" else e["msg"]
        lines.append(f"{prefix}{path}: {msg}")
    return "\n".join(lines)


def _has_path(d: Any, loc: list[str]) -> bool:
    for part in loc:
        if not isinstance(d, dict) or part not in d:
            return False
        d = d[part]
    return bool(loc)


# Bounds on what a values file may make the parser build, refused while composing (before anything is built
# from it): aliases may add at most MAX_ALIAS_NODES nodes to what the file spells out (a 1 kB "billion laughs"
# file expands to millions, and merging each run over the defaults walks every one of them: minutes of CPU), and
# nothing nests deeper than MAX_DEPTH (a spec is a dozen levels deep; Python's recursion limit is 1000).
MAX_ALIAS_NODES = 50_000
MAX_DEPTH = 100


class YamlBoundExceeded(yaml.YAMLError):
    """A values file beyond MAX_ALIAS_NODES or MAX_DEPTH: ``line`` (1-based) and ``problem``."""

    def __init__(self, problem: str, mark: Any) -> None:
        self.line, self.problem = int(getattr(mark, "line", -1)) + 1, problem
        super().__init__(f"line {self.line}: {problem}")


class _StrictLoader(yaml.SafeLoader):
    """YAML as Helm reads it, except that a key given twice in one mapping is an error (PyYAML and Helm keep
    the last one silently, so a pasted duplicate overrides the value above it without a word), and that aliases
    and nesting are bounded (MAX_ALIAS_NODES, MAX_DEPTH)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._open: list[str | None] = []  # the anchors of the nodes being composed (an alias to one: a cycle)
        self._measured: dict[int, tuple[int, int]] = {}  # id(node) -> (nodes, height), the alias expanded
        self._added = 0  # nodes that aliases added so far

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            if event.anchor in self._open:
                raise YamlBoundExceeded(f"alias *{event.anchor} refers to a node that contains it", event.start_mark)
            node = super().compose_node(parent, index)
            nodes, height = self._measure(node)
            self._added += nodes
            if self._added > MAX_ALIAS_NODES:
                raise YamlBoundExceeded(f"aliases expand to more than {MAX_ALIAS_NODES} nodes (an alias bomb?); "
                                        "write the values out or alias less", event.start_mark)
            if self._depth + height > MAX_DEPTH:
                raise YamlBoundExceeded(f"alias *{event.anchor} nests deeper than {MAX_DEPTH} levels",
                                        event.start_mark)
            return node
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise YamlBoundExceeded(f"nested deeper than {MAX_DEPTH} levels", event.start_mark)
        self._open.append(getattr(event, "anchor", None))
        try:
            return super().compose_node(parent, index)
        finally:
            self._open.pop()
            self._depth -= 1

    def _measure(self, node: yaml.Node | None) -> tuple[int, int]:
        """(nodes, height) of ``node`` with its aliases expanded; each distinct node measured once, so a bomb
        costs what its text does."""
        if id(node) not in self._measured:
            if isinstance(node, yaml.MappingNode):
                children = [n for pair in node.value for n in pair]
            else:
                children = node.value if isinstance(node, yaml.SequenceNode) else []
            sizes = [self._measure(child) for child in children]
            self._measured[id(node)] = (1 + sum(n for n, _ in sizes), 1 + max((h for _, h in sizes), default=0))
        return self._measured[id(node)]

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *anchor` merges may be overridden by explicit keys: that is their purpose
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, str | int | float | bool) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice in this mapping (first on line {seen[key] + 1})",
                    key_node.start_mark)
            if isinstance(key, str | int | float | bool):
                seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def parse_yaml(text: str) -> Any:
    """Parse YAML text, refusing duplicated keys, alias bombs and deep nesting (YamlBoundExceeded)."""
    return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader subclass)


def load_values(path: str | os.PathLike[str]) -> dict[str, Any]:
    p = Path(path)
    try:
        text = p.read_bytes().decode("utf-8")
    except OSError as e:
        raise SpecError(f"{p}: cannot read values file ({e.strerror})") from None
    except UnicodeDecodeError as e:
        line = p.read_bytes()[: e.start].count(b"\n") + 1
        raise SpecError(f"{p}: line {line}: not UTF-8 text (byte 0x{p.read_bytes()[e.start]:02x}); save the file "
                        "as UTF-8") from None
    try:
        doc = parse_yaml(text) or {}
    except YamlBoundExceeded as e:
        raise SpecError(f"{p}: {e}") from None
    except yaml.YAMLError as e:
        raise SpecError(f"{p}: not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(doc, dict) or "experiment" not in doc:
        raise SpecError(f"{p}: no 'experiment' section (a values file holds the spec under 'experiment:')")
    return doc


def load_experiment(path: str | os.PathLike[str]) -> ExperimentFile:
    doc = load_values(path)
    try:
        return ExperimentFile.model_validate(doc["experiment"])
    except ValidationError as e:
        raise SpecError(format_errors(e, f"{path}: experiment.")) from None


def resolve_runs(
    path: str | os.PathLike[str],
    run: str | None = None,
    overrides: list[str] | None = None,
    under: dict[str, Any] | None = None,
) -> list[Run]:
    """Resolve the values file's runs (or the one named) into validated, checked specs, in file order.
    ``under``: defaults layered under ``experiment.defaults`` (a hardware profile's training defaults, as the
    chart layers them)."""
    exp = load_experiment(path)
    if under:
        exp = exp.model_copy(update={"defaults": deep_merge(under, exp.defaults)})
    base = run.split("/seed-", 1)[0] if run is not None else None
    if base is not None and base not in exp.runs:
        raise SpecError(f"{path}: no run named {run!r}; runs are: {', '.join(exp.runs)}")
    names = [base] if base is not None else list(exp.runs)
    sets = parse_set(overrides or [])
    resolved = []
    for name in names:
        own = exp.runs[name] or {}
        merged = deep_merge(deep_merge(exp.defaults, own), sets)
        try:
            spec = RunSpec.model_validate(merged)
            check_run(spec)
            check_teacher_run(exp, spec)
        except ValidationError as e:
            origins = [(f"{path}: experiment.defaults.", exp.defaults), (f"{path}: experiment.runs.{name}.", own),
                       ("--set ", sets)]
            raise SpecError(format_errors(e, f"{path}: run {name!r}: ", origins)) from None
        except SpecError as e:
            raise SpecError(f"{path}: run {name!r}: {e}") from None
        resolved += expand_repeats(Run(experiment=exp.name, name=name, spec=spec, source=str(path)))
    if run is not None and base is not None and run != base:
        resolved = [r for r in resolved if r.name == run]
        if not resolved:
            raise SpecError(f"{path}: no run named {run!r}; run {base!r} repeats with seeds "
                            f"{[s.spec.training.seed for s in expand_repeats_of(exp, base, sets)]}")
    return resolved


def repeat_seeds(spec: RunSpec) -> list[int] | None:
    """The seeds a run repeats with (None: it runs once, as it is)."""
    if spec.seeds is not None:
        return list(spec.seeds)
    if spec.repeats is not None:
        return [spec.training.seed + i for i in range(spec.repeats)]
    return None


def expand_repeats(run: Run) -> list[Run]:
    """One run per seed, ``<run>/seed-<seed>``, with training.seed and data.seed set to it (so the data order,
    subset, initialisation and dropout all follow the seed) and ``seeds: [seed]`` (so that a spec file holding
    one repeat resolves to the same name)."""
    seeds = repeat_seeds(run.spec)
    if seeds is None:
        return [run]
    out = []
    for seed in seeds:
        spec = run.spec.model_copy(update={
            "repeats": None, "seeds": [seed],
            "training": run.spec.training.model_copy(update={"seed": seed}),
            "data": run.spec.data.model_copy(update={"seed": seed}),
        })
        out.append(run.model_copy(update={"name": f"{run.name}/seed-{seed}", "spec": spec, "group": run.name}))
    return out


def expand_repeats_of(exp: ExperimentFile, name: str, sets: dict[str, Any]) -> list[Run]:
    spec = RunSpec.model_validate(deep_merge(deep_merge(exp.defaults, exp.runs[name] or {}), sets))
    return expand_repeats(Run(experiment=exp.name, name=name, spec=spec, source=""))


def check_teacher_run(exp: ExperimentFile, spec: RunSpec) -> None:
    """A distillation teacher named by run key, when it is a run of this file, must be one that trains (it may
    also be a run of another values file of the same experiment)."""
    if spec.distill is None or spec.distill.teacher.run is None or spec.distill.teacher.run not in exp.runs:
        return
    teacher = spec.distill.teacher.run
    job = deep_merge(exp.defaults, exp.runs[teacher] or {}).get("job", "train")
    if job != "train":
        raise SpecError(f"distill.teacher.run: run {teacher!r} is a {job} run; the teacher must be a train run")


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``: MLflow params are flat."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def add_spec_arguments(p: argparse.ArgumentParser) -> None:
    """``-f VALUES [--run NAME] [--set KEY=VALUE]``: how every spec-reading command names its runs."""
    p.add_argument("-f", "--values", required=True, help="values file whose 'experiment' section is the spec")
    p.add_argument("--run", help="run only this named run (default: every run, in file order)")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a spec field, e.g. --set training.epochs=1 (repeatable)",
    )


def write_spec(run: Run, path: Path) -> Path:
    """The resolved spec travels with every artifact (``SPEC_FILE``)."""
    spec = run.spec.model_dump(mode="json")
    if spec["tracking"].get("tracking_uri"):
        spec["tracking"]["tracking_uri"] = redact_uri(spec["tracking"]["tracking_uri"])
    doc = {"experiment": run.experiment, "run": run.name, "source": run.source, "spec": spec}
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path
