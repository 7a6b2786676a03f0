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
from lora_exp.core.errors import DataError, SpecError
from lora_exp.runtime.models import check_model_source
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


def _read_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (row_number, row_dict) from a JSONL/JSON/CSV/parquet file, with errors naming file and row."""
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise DataError(f"{path}: unsupported file type {suffix!r}; use one of {sorted(FORMATS)}")
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            for i, row in enumerate(pq.read_table(path).to_pylist(), start=1):
                yield i, row
        elif suffix == ".csv":
            with path.open(newline="", encoding="utf-8") as fh:
                reader = csv.DictReader(fh)
                for row in reader:
                    if None in row or any(v is None for v in row.values()):
                        raise DataError(
                            f"{path}: line {reader.line_num}: expected {len(reader.fieldnames or [])} columns "
                            f"({', '.join(reader.fieldnames or [])})"
                        )
                    yield reader.line_num, row
        elif suffix == ".json" and path.read_text(encoding="utf-8").lstrip().startswith("["):
            rows = json.loads(path.read_text(encoding="utf-8"))
            for i, row in enumerate(rows, start=1):
                yield i, row
        else:  # JSON Lines
            with path.open(encoding="utf-8") as fh:
                for i, line in enumerate(fh, start=1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DataError(f"{path}: line {i}: not valid JSON ({e.msg})") from None
                    if not isinstance(row, dict):
                        raise DataError(f"{path}: line {i}: expected a JSON object, got {type(row).__name__}")
                    yield i, row
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: unreadable ({e})") from None


def check_local_split(spec: RunSpec, task: Task, split: str) -> SplitReport:
    """Read every row of a split's files: the task's columns are present and each row is usable."""
    needed = list(task.required_columns)
    counts: dict[str, int] = dict.fromkeys(getattr(task, "labels", ()), 0)
    rows = 0
    for path in _files(spec, split):
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
        files = ", ".join(map(str, _files(spec, split)))
        raise DataError(f"data.data_files.{split}: split {split!r} is empty ({files})")
    return SplitReport(split, rows, counts)


def validate_data(spec: RunSpec) -> str:
    """Check the model source and, for local files, every row (the spec itself was checked when it was
    resolved). Loads no model and no ML library. Returns a summary."""
    task = get_task(spec)
    check_model_source(spec.model)
    if not spec.data.data_files:
        src = spec.data.hub_path or task.hub_path
        cfg = spec.data.hub_config or task.hub_config
        return f"data: hub data set {src}{'/' + cfg if cfg else ''} (checked when the job loads it)"
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
        files = {s: [str(p) for p in _files(spec, s)] for s in needed}
        fmt = FORMATS[Path(files[needed[0]][0]).suffix.lower()]
        try:
            raw = datasets.load_dataset(fmt, data_files=files)
        except Exception as e:  # pyarrow type clashes etc.: name the files
            raise DataError(f"data.data_files: could not load {files}: {e}") from None
    else:
        path = spec.data.hub_path or task.hub_path
        config = spec.data.hub_config or task.hub_config
        log.info("loading data set %s%s from the hub", path, f"/{config}" if config else "")
        raw = datasets.load_dataset(path, config)
        absent = [s for s in needed if s not in raw]
        if absent:
            raise DataError(f"data set {path}: no split(s) {absent}; it has {list(raw)}")
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
