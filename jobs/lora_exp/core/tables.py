"""Plain tables for the report tools (``compare``, ``sanity``, ``status``): CSV, Markdown and terminal text.

One place formats numbers, so a value reads the same in the terminal, the Markdown report and the MLflow
UI; CSV keeps full precision (``repr``) so a table can be checked against the metric it came from.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

Row = dict[str, Any]


def fmt(value: Any, digits: int = 4) -> str:
    """Human format: ``-`` for missing, integers without decimals, floats to ``digits`` significant figures."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer() and abs(value) >= 1:
        return f"{int(value):,}" if abs(value) >= 10_000 else str(int(value))
    if isinstance(value, int):
        return f"{value:,}" if abs(value) >= 10_000 else str(value)
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def columns_of(rows: Sequence[Row]) -> list[str]:
    """Every key that occurs in ``rows``, in first-seen order (rows may lack some columns)."""
    seen: dict[str, None] = {}
    for row in rows:
        seen.update(dict.fromkeys(row))
    return list(seen)


def write_csv(path: Path, rows: Sequence[Row], columns: Sequence[str] | None = None) -> Path:
    """Full-precision CSV; a missing cell is empty."""
    cols = list(columns or columns_of(rows))
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(cols)
        for row in rows:
            w.writerow(["" if row.get(c) is None else _exact(row[c]) for c in cols])
    return path


def _exact(value: Any) -> str:
    return repr(value) if isinstance(value, float) else str(value)


def markdown_table(rows: Sequence[Row], columns: Sequence[str] | None = None,
                   headers: dict[str, str] | None = None) -> str:
    """A GitHub-flavoured Markdown table; numbers right-aligned."""
    cols = list(columns or columns_of(rows))
    if not rows or not cols:
        return "_(none)_\n"
    names = [(headers or {}).get(c, c) for c in cols]
    numeric = [all(isinstance(r.get(c), (int, float)) or r.get(c) is None for r in rows) for c in cols]
    lines = ["| " + " | ".join(names) + " |",
             "|" + "|".join("---:" if n else "---" for n in numeric) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(fmt(row.get(c)).replace("|", "\\|") for c in cols) + " |")
    return "\n".join(lines) + "\n"


def text_table(rows: Sequence[Row], columns: Sequence[str] | None = None) -> str:
    """A fixed-width table for the terminal and ``kubectl logs`` (no box drawing, no colour)."""
    cols = list(columns or columns_of(rows))
    cells = [[fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max([len(c), *(len(line[i]) for line in cells)]) for i, c in enumerate(cols)]
    out = ["  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)).rstrip()]
    out += ["  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip() for line in cells]
    return "\n".join(out) + "\n"
