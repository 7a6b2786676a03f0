"""Charts of the comparison report: small multiples of bars, overlaid learning curves, images side by side.

Every chart is a grid of fixed-size panels (``PANEL`` inches at ``DPI``), so a PNG's pixel size follows
from its panel count alone (:func:`figure_size`): readable in the MLflow UI at any number of runs, and
checkable in tests. Figures are built with ``matplotlib.figure.Figure`` (no pyplot, no global state, no
display), so a report can be made in a headless pod or a worker thread.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DPI = 100
PANEL = (4.0, 3.0)  # inches per chart panel
IMAGE_PANEL = (4.0, 3.6)  # inches per side-by-side image (confusion matrices are roughly square)
MAX_COLS = 3


@dataclass
class Bars:
    """One panel: a value per run (a missing value leaves a gap, not a zero bar)."""

    title: str
    labels: list[str]
    values: list[float | None]
    colors: list[str]
    hatched: list[bool] = field(default_factory=list)  # e.g. baselines
    intervals: list[tuple[float, float] | None] = field(default_factory=list)  # 95% intervals: error bars


@dataclass
class Lines:
    """One panel: a curve per run, x = optimiser step."""

    title: str
    series: dict[str, list[tuple[int, float]]]
    colors: dict[str, str]


def figure_size(panels: int, panel: tuple[float, float] = PANEL, max_cols: int = MAX_COLS) -> tuple[int, int]:
    """Pixel (width, height) of a chart of ``panels`` panels."""
    cols, rows = _grid(panels, max_cols)
    return round(cols * panel[0] * DPI), round(rows * panel[1] * DPI)


def _grid(panels: int, max_cols: int) -> tuple[int, int]:
    cols = max(1, min(panels, max_cols))
    return cols, max(1, math.ceil(panels / cols))


def palette(names: Sequence[str]) -> dict[str, str]:
    """A stable colour per run, the same in every chart of a report."""
    colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
              "#bcbd22", "#17becf"]
    return {n: colors[i % len(colors)] for i, n in enumerate(names)}


def _figure(panels: int, panel: tuple[float, float], max_cols: int, title: str | None) -> tuple[Any, Any]:
    from matplotlib.figure import Figure

    cols, rows = _grid(panels, max_cols)
    fig = Figure(figsize=(cols * panel[0], rows * panel[1]), dpi=DPI)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[panels:]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig, axes


def _save(fig: Any, path: Path, titled: bool) -> Path:
    fig.tight_layout(rect=(0, 0, 1, 0.94) if titled else None)  # keep the title clear of the panels
    fig.savefig(path, dpi=DPI)  # never bbox_inches="tight": the pixel size must stay figure_size()
    return path


def bar_chart(panels: Sequence[Bars], path: Path, title: str | None = None) -> Path:
    """One bar panel per metric: scales differ (accuracy vs loss vs perplexity), so no shared axis."""
    fig, axes = _figure(len(panels), PANEL, MAX_COLS, title)
    for ax, p in zip(axes, panels, strict=False):
        xs = range(len(p.labels))
        heights = [v if v is not None else 0.0 for v in p.values]
        bars = ax.bar(xs, heights, color=p.colors)
        for x, v, ci in zip(xs, p.values, p.intervals or [None] * len(p.values), strict=True):
            if ci is not None and v is not None:
                ax.errorbar(x, v, yerr=[[v - ci[0]], [ci[1] - v]], fmt="none", ecolor="black", capsize=3,
                            linewidth=1)
        for bar, hatch, v in zip(bars, p.hatched or [False] * len(bars), p.values, strict=True):
            if hatch:
                bar.set_hatch("//")
                bar.set_alpha(0.6)
            if v is None:
                bar.set_visible(False)
            else:
                ax.annotate(f"{v:.3g}", (bar.get_x() + bar.get_width() / 2, v), ha="center", va="bottom",
                            fontsize=7)
        ax.set_xticks(list(xs), p.labels, rotation=30, ha="right", fontsize=7)
        ax.set_title(p.title, fontsize=9)
        ax.tick_params(axis="y", labelsize=7)
        ax.margins(y=0.15)
    return _save(fig, path, bool(title))


def line_chart(panels: Sequence[Lines], path: Path, title: str | None = None) -> Path:
    """Curves of several runs overlaid per metric; single points (one eval per run) get markers."""
    fig, axes = _figure(len(panels), PANEL, MAX_COLS, title)
    for ax, p in zip(axes, panels, strict=False):
        for name, points in p.series.items():
            if points:
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, label=name, color=p.colors.get(name), marker="o" if len(xs) < 12 else None,
                        markersize=3, linewidth=1.2)
        ax.set_title(p.title, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if p.series:
            ax.legend(fontsize=7)
    return _save(fig, path, bool(title))


def image_row(images: Sequence[tuple[str, Path]], path: Path, title: str | None = None,
              max_cols: int = 4) -> Path:
    """Existing PNGs (e.g. each run's logged confusion matrix) side by side under their run names."""
    from matplotlib.image import imread

    fig, axes = _figure(len(images), IMAGE_PANEL, max_cols, title)
    for ax, (caption, image) in zip(axes, images, strict=False):
        ax.imshow(imread(image))
        ax.set_title(caption, fontsize=9)
        ax.axis("off")
    return _save(fig, path, bool(title))


def confusion_matrix_chart(cm: Sequence[Sequence[int]], labels: Sequence[str], title: str, path: Path) -> Path:
    """A labelled confusion matrix (rows true, columns predicted), sized by the number of labels."""
    from matplotlib.figure import Figure

    n = len(labels)
    fig = Figure(figsize=(1.6 + 1.1 * n, 1.2 + 1.0 * n), dpi=DPI)
    ax = fig.subplots()
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(n), list(labels), rotation=30, ha="right")
    ax.set_yticks(range(n), list(labels))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    top = max((max(row) for row in cm), default=0)
    for i, row in enumerate(cm):
        for j, value in enumerate(row):
            ax.text(j, i, str(value), ha="center", va="center", color="white" if value > top / 2 else "black")
    fig.tight_layout()
    fig.savefig(path)
    return path
