"""Data: check it before any model loads, then load it as ``datasets`` splits with an integer ``label``.

Local files are read row by row first (``check_local_files``): ``datasets``/pyarrow reject a bad row with an
Arrow error that names neither file nor line, and a user needs both. Hub data sets are checked right after
they load (columns, label range, empty splits), still before the model.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_exp.config.schema import RunSpec
from lora_exp.core import hub
from lora_exp.core.errors import DataError, SpecError
from lora_exp.tasks import Task, get_task

log = logging.getLogger(__name__)

FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
MAX_REPORTED = 5


@dataclass
class SplitReport:
    split: str
    rows: int
    label_counts: dict[str, int]

    def __str__(self) -> str:
        counts = ", ".join(f"{k}={v}" for k, v in self.label_counts.items())
        return f"{self.split}: {self.rows} rows ({counts})"


def required_splits(spec: RunSpec, task: Task) -> list[str]:
    splits = list(task.eval_splits)
    if spec.job in ("train", "distill"):
        splits.insert(0, task.train_split)
    return splits


def _files(spec: RunSpec, split: str) -> list[Path]:
    assert spec.data.data_files is not None
    entry = spec.data.data_files[split]
    return [Path(p) for p in ([entry] if isinstance(entry, str) else entry)]


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json object hook: a key given twice is an error (json.loads would keep the last silently)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"key {key!r} appears twice")
        out[key] = value
    return out


def _read_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (row_number, row_dict) from a JSONL/JSON/CSV/parquet file, with errors naming file and row."""
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise DataError(f"{path}: unsupported file type {suffix!r}; use one of {sorted(FORMATS)}")
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        if suffix == ".parquet":
            yield from _parquet_rows(path)
        elif suffix == ".csv":
            # utf-8-sig: a byte-order mark (Excel writes one) is not part of the first column's name.
            with path.open(newline="", encoding="utf-8-sig") as fh:
                reader = csv.DictReader(fh)
                names = reader.fieldnames or []
                dupes = sorted({n for n in names if names.count(n) > 1})
                if dupes:
                    raise DataError(f"{path}: line 1: column(s) {dupes} appear twice in the header")
                for row in reader:
                    if None in row or any(v is None for v in row.values()):
                        raise DataError(f"{path}: line {reader.line_num}: expected {len(names)} columns "
                                        f"({', '.join(names)})")
                    yield reader.line_num, row
        elif suffix == ".json" and path.read_text(encoding="utf-8-sig").lstrip().startswith("["):
            try:
                rows = json.loads(path.read_text(encoding="utf-8-sig"), object_pairs_hook=_unique_keys)
            except ValueError as e:
                raise DataError(f"{path}: not valid JSON ({e})") from None
            for i, row in enumerate(rows, start=1):
                if not isinstance(row, dict):
                    raise DataError(f"{path}: item {i}: expected a JSON object, got {type(row).__name__}")
                yield i, row
        else:  # JSON Lines
            with path.open(encoding="utf-8-sig") as fh:
                for i, line in enumerate(fh, start=1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line, object_pairs_hook=_unique_keys)
                    except ValueError as e:  # JSONDecodeError is a ValueError; so is a duplicated key
                        raise DataError(f"{path}: line {i}: not valid JSON ({getattr(e, 'msg', e)})") from None
                    if not isinstance(row, dict):
                        raise DataError(f"{path}: line {i}: expected a JSON object, got {type(row).__name__}")
                    yield i, row
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise DataError(f"{path}: unreadable ({e})") from None


def _parquet_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow's ArrowInvalid and friends: not a parquet file, or a damaged one
        raise DataError(f"{path}: not a readable parquet file ({str(e).splitlines()[0] if str(e) else e})") from None
    yield from enumerate(table.to_pylist(), start=1)


def check_local_split(spec: RunSpec, task: Task, split: str) -> SplitReport:
    """Read every row of a split's files: the task's columns are present and each row is usable."""
    needed = list(task.required_columns)
    counts: dict[str, int] = dict.fromkeys(getattr(task, "labels", ()), 0)
    rows = 0
    files = _files(spec, split)
    formats = {FORMATS.get(p.suffix.lower(), p.suffix) for p in files}
    if len(formats) > 1:
        raise DataError(f"data.data_files.{split}: one format per split, got {sorted(map(str, formats))} "
                        f"({', '.join(map(str, files))})")
    for path in files:
        for line, row in _read_rows(path):
            missing = [c for c in needed if c not in row]
            if missing:
                raise DataError(
                    f"{path}: row {line}: missing column(s) {missing} (task {task.name!r} needs {needed})"
                )
            try:
                category = task.check_row(row)
            except ValueError as e:
                raise DataError(f"{path}: row {line}: {e}") from None
            if category is not None:
                counts[category] = counts.get(category, 0) + 1
            rows += 1
    if rows == 0:
        raise DataError(f"data.data_files.{split}: split {split!r} is empty ({', '.join(map(str, files))})")
    return SplitReport(split, rows, counts)


def validate_data(spec: RunSpec) -> str:
    """Every row of the run's local data files (``data.data_files``), before anything loads them. Returns a
    summary. Hub data sets are checked when they load (``engine.preflight`` checks the offline cache)."""
    task = get_task(spec)
    if not spec.data.data_files:
        return "data: hub"
    needed = required_splits(spec, task)
    missing = [s for s in needed if s not in spec.data.data_files]
    if missing:
        raise SpecError(
            f"data.data_files: no file for split(s) {missing}; this {spec.job} run needs {needed} "
            f"(task.eval_splits chooses the evaluated splits)"
        )
    reports = [check_local_split(spec, task, s) for s in needed]
    return "data ok: " + "; ".join(map(str, reports))


# --------------------------------------------------------------------------------------------------
# Loading (imports `datasets`, so kept out of the validate-only path above)


def load_splits(spec: RunSpec, task: Task) -> Any:
    """Load the run's splits as a DatasetDict with the task's text fields and an int ``label`` column."""
    import datasets

    needed = required_splits(spec, task)
    if spec.data.data_files:
        validate_data(spec)
        raw = {}
        for split in needed:  # each split in its own format (train.jsonl with validation.csv is fine)
            files = [str(p) for p in _files(spec, split)]
            try:
                raw[split] = datasets.load_dataset(FORMATS[Path(files[0]).suffix.lower()], data_files={split: files},
                                                   split=split)
            except Exception as e:  # what the row checks above did not foresee: still name the files
                raise DataError(f"data.data_files.{split}: could not load {files}: {e}") from None
    else:
        raw = load_hub_dataset(spec, task)
        absent = [s for s in needed if s not in raw]
        if absent:
            raise DataError(f"data set {spec.data.hub_path or task.hub_path}: no split(s) {absent}; it has "
                            f"{list(raw)}")
    out = datasets.DatasetDict()
    for split in needed:
        ds = raw[split]
        missing = [c for c in task.required_columns if c not in ds.column_names]
        if missing:
            raise DataError(f"split {split!r}: missing column(s) {missing}; it has {ds.column_names}")
        if len(ds) == 0:
            raise DataError(f"split {split!r} is empty")
        out[split] = task.normalise(ds, split)
    return out


def load_hub_dataset(spec: RunSpec, task: Task) -> Any:
    """A hub data set; one that does not exist, or is missing from the cache while offline, is a user error."""
    import datasets
    from datasets.exceptions import DatasetNotFoundError

    path = spec.data.hub_path or task.hub_path
    config = spec.data.hub_config or task.hub_config
    label = f"{path}{'/' + config if config else ''}"
    log.info("loading data set %s from the hub", label)
    try:
        return datasets.load_dataset(path, config)
    except DatasetNotFoundError as e:
        raise DataError(f"data.hub_path: no data set {label} on the hub (or no access to it): {e}") from None
    except ValueError as e:  # e.g. an unknown config name: datasets lists the available ones
        if "config" in str(e).lower():
            raise DataError(f"data.hub_config: {e}") from None
        raise
    except ConnectionError as e:
        if hub.datasets_offline():
            raise DataError(f"data: {label} is not in the local cache and the hub is off: {e}") from None
        raise


def subsample(spec: RunSpec, task: Task, raw: Any) -> tuple[Any, Any, dict[str, Any]]:
    """Apply max_train_samples, the internal validation split and max_eval_samples.

    Returns (train, in-training eval set, {eval split: dataset}). The in-training eval set is the internal
    validation split when ``validation_fraction`` > 0 (seed 000's 90/10), else the first eval split.
    """
    d = spec.data
    evals = {}
    for split in task.eval_splits:
        ds = raw[split]
        evals[split] = ds.select(range(min(len(ds), d.max_eval_samples))) if d.max_eval_samples else ds
    if spec.job not in ("train", "distill"):
        return None, None, evals
    train = raw[task.train_split].shuffle(seed=d.seed)
    if d.data_fraction < 1.0:
        train = train.select(range(max(1, int(len(train) * d.data_fraction))))
    if d.max_train_samples:
        train = train.select(range(min(len(train), d.max_train_samples)))
    if d.validation_fraction > 0:
        parts = train.train_test_split(test_size=d.validation_fraction, seed=d.seed)
        train, val = parts["train"], parts["test"]
    else:
        val = evals[task.eval_splits[0]]
    if len(train) == 0:
        raise DataError("the training split is empty after subsetting")
    return train, val, evals


# ------------------------------------------------------------------------------------------------
# Lineage: which rows a run used, so that two runs claiming the same data can be checked to have used it


@dataclass(frozen=True)
class DataInput:
    """One data set a run consumed, as MLflow records it (``mlflow.entities.Dataset`` plus its context)."""

    name: str  # <task>-<split>
    context: str  # "train", "validation" (in-training eval set) or "eval" (a final evaluation split)
    source_type: str  # "local" or "hub"
    source: str  # the files, or <hub path>[/<config>]:<split>
    digest: str  # of the rows used, in the order used
    rows: int
    seed: int  # the subset/shuffle seed (data.seed)

    def as_record(self) -> dict[str, Any]:
        return dict(self.__dict__)


def rows_digest(ds: Any) -> str:
    """SHA-256 of the rows as used (after shuffling and subsetting), in Arrow IPC form: cheap even for MNLI
    (no per-row Python), and independent of how the source files were laid out."""
    import hashlib

    import pyarrow as pa

    h = hashlib.sha256()
    h.update(json.dumps(ds.column_names).encode())
    for batch in ds.with_format("arrow").iter(batch_size=50_000):
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, batch.schema) as writer:
            writer.write_table(batch)
        h.update(sink.getvalue().to_pybytes())
    return h.hexdigest()[:32]  # MLflow keeps dataset digests up to 36 characters


def _source(spec: RunSpec, task: Task, split: str) -> tuple[str, str]:
    if spec.data.data_files:
        return "local", ",".join(str(p.resolve()) for p in _files(spec, split))
    path = spec.data.hub_path or task.hub_path
    config = spec.data.hub_config or task.hub_config
    return "hub", f"{path}{'/' + config if config else ''}:{split}"


def lineage(spec: RunSpec, task: Task, train: Any, val: Any, evals: dict[str, Any]) -> list[DataInput]:
    """The data sets a run uses: the training rows, the in-training eval set, each final evaluation split."""
    seed = spec.data.seed
    out = []
    if train is not None:
        out.append(DataInput(f"{task.name}-{task.train_split}", "train", *_source(spec, task, task.train_split),
                             rows_digest(train), len(train), seed))
        if spec.data.validation_fraction > 0 and val is not None:  # carved out of the training split
            out.append(DataInput(f"{task.name}-{task.train_split}-heldout", "validation",
                                 *_source(spec, task, task.train_split), rows_digest(val), len(val), seed))
    for split, ds in evals.items():
        out.append(DataInput(f"{task.name}-{split}", "eval", *_source(spec, task, split), rows_digest(ds), len(ds),
                             seed))
    return out
