"""PNG plots of a report: stage x task heatmaps, P/V-score and IG over stages, per-task bars.

Figures are drawn on matplotlib's Agg canvas directly (``matplotlib.figure.Figure`` +
``FigureCanvasAgg``): no pyplot, no display, and the process-wide backend is left alone.
Every file is written to a temporary name, then renamed into place.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

from kpig_trainer.fileio import atomic_write

__all__ = ["plot_heatmap", "plot_ig_over_stages", "plot_scores_over_stages", "plot_task_scores", "write_plots"]


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(figure)
    return figure


def _save(figure, path: str | Path) -> Path:
    return atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", bbox_inches="tight"))


def _short(task: str, width: int = 38) -> str:
    return task if len(task) <= width else task[: width - 1] + "\u2026"


def _number(value: Any) -> float:
    return math.nan if value is None else float(value)


def plot_heatmap(
    path: str | Path,
    row_labels: Sequence[str],
    tasks: Sequence[str],
    values: Sequence[Sequence[float | None]],
    *,
    title: str,
    colorbar_label: str,
    cmap: str = "viridis",
    n_seen: int | None = None,
    vmin: float = 0.0,
    vmax: float = 100.0,
    ylabel: str = "evaluated after",
) -> Path:
    """Stage x task heatmap, each cell annotated; missing cells blank. ``n_seen`` draws a
    line between the seen and the held-out columns; ``ylabel`` names the rows."""
    import numpy as np

    data = np.array([[_number(v) for v in row] for row in values], dtype=float).reshape(len(row_labels), len(tasks))
    figure = _figure(max(6.0, 0.42 * len(tasks) + 2.5), max(2.6, 0.45 * len(row_labels) + 2.4))
    axes = figure.add_subplot()
    image = axes.imshow(np.ma.masked_invalid(data), cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
    axes.set_xticks(range(len(tasks)), [_short(t, 46) for t in tasks], rotation=60, ha="right", fontsize=7)
    axes.set_yticks(range(len(row_labels)), row_labels, fontsize=8)
    axes.set_xlabel("task")
    axes.set_ylabel(ylabel)
    if n_seen is not None and 0 < n_seen < len(tasks):
        axes.axvline(n_seen - 0.5, color="white", linewidth=2)
        title += "\n(left of the white line: seen tasks; right: held-out tasks)"
    axes.set_title(title, fontsize=10)
    if data.size <= 1200:
        for (r, c), value in np.ndenumerate(data):
            if not math.isnan(value):
                red, green, blue, _ = image.cmap(image.norm(value))  # the cell's colour decides the ink
                light = 0.299 * red + 0.587 * green + 0.114 * blue > 0.5
                axes.text(
                    c, r, f"{value:.0f}", ha="center", va="center", fontsize=7, color="black" if light else "white"
                )
    figure.colorbar(image, ax=axes, label=colorbar_label, fraction=0.04)
    return _save(figure, path)


def _lines(axes, labels: Sequence[str], series: Mapping[str, Sequence[float | None]], ylabel: str) -> None:
    positions = list(range(len(labels)))
    for name, values in series.items():
        ys = [_number(v) for v in values]
        if all(math.isnan(y) for y in ys):
            continue
        axes.plot(positions, ys, marker="o", label=name)
    axes.set_xticks(positions, labels, rotation=30, ha="right", fontsize=8)
    axes.set_xlabel("evaluated after")
    axes.set_ylabel(ylabel)
    axes.grid(alpha=0.3)
    if axes.get_legend_handles_labels()[0]:
        axes.legend(fontsize=8)


def plot_scores_over_stages(path: str | Path, curves: Mapping[str, Sequence]) -> Path:
    """P-score (left) and V-score (right) after each stage, for the seen tasks trained so
    far, all seen tasks and the held-out tasks (``ContinualMatrix.curves()``)."""
    labels = curves["labels"]
    figure = _figure(max(8.0, 0.5 * len(labels) + 6), 3.8)
    for k, (key, ylabel) in enumerate(
        (("p_score", "P-score (higher is better)"), ("v_score", "V-score (lower is better)"))
    ):
        axes = figure.add_subplot(1, 2, k + 1)
        _lines(
            axes,
            labels,
            {
                "seen, trained so far": curves[f"trained_{key}"],
                "seen, all": curves[f"seen_{key}"],
                "held-out": curves[f"held_out_{key}"],
            },
            ylabel,
        )
        axes.set_title(ylabel.split(" (")[0] + " over stages")
    return _save(figure, path)


def plot_ig_over_stages(path: str | Path, curves: Mapping[str, Sequence]) -> Path:
    """Mean information gain of seen and held-out tasks after each stage (cf. the paper's
    Figure 4)."""
    labels = curves["labels"]
    figure = _figure(max(6.0, 0.5 * len(labels) + 4), 3.8)
    axes = figure.add_subplot()
    _lines(axes, labels, {"seen": curves["seen_ig"], "held-out": curves["held_out_ig"]}, "mean information gain")
    axes.axhline(0.0, color="grey", linewidth=0.8)
    axes.set_title("Information gain of the key parts over stages")
    return _save(figure, path)


def plot_task_scores(path: str | Path, tasks: Sequence[Mapping[str, Any]], title: str = "Per-task scores") -> Path:
    """Horizontal bars per task: performance, V-score and (when measured) IG; held-out
    tasks hatched. ``tasks`` are report task rows (``task``, ``group``, ``performance``,
    ``v_score``, ``ig``)."""
    names = [_short(row["task"], 46) for row in tasks]
    panels = [("performance", "performance (0-100)"), ("v_score", "V-score (0-100, lower is better)")]
    if any(row.get("ig") is not None for row in tasks):
        panels.append(("ig", "mean information gain"))
    figure = _figure(4.2 * len(panels) + 3, max(3.0, 0.28 * len(tasks) + 1.4))
    for k, (key, label) in enumerate(panels):
        axes = figure.add_subplot(1, len(panels), k + 1)
        values = [_number(row.get(key)) for row in tasks]
        colors = ["tab:blue" if row.get("group") != "held_out" else "tab:orange" for row in tasks]
        axes.barh(range(len(tasks)), [0 if math.isnan(v) else v for v in values], color=colors)
        axes.set_yticks(range(len(tasks)), names if k == 0 else [""] * len(tasks), fontsize=7)
        axes.invert_yaxis()
        axes.set_xlabel(label)
        axes.grid(axis="x", alpha=0.3)
        if key != "ig":
            axes.set_xlim(0, 100)
    figure.suptitle(f"{title} (blue: seen, orange: held-out)")
    return _save(figure, path)


def write_plots(out_dir: str | Path, report: Mapping[str, Any]) -> list[str]:
    """Draw every plot that fits ``report`` (a report.json dict) into ``out_dir``; return
    the file names written.

    A continual report (with a ``matrix``) gets performance and V-score heatmaps over its
    rows, P/V-score over stages and, when IG was measured, IG over stages. An evaluation
    report gets one-row heatmaps and per-task bars (``task_scores.png``).
    """
    out_dir = Path(out_dir)
    written = []
    matrix = report.get("matrix")
    if matrix:
        from kpig_trainer.evaluation.matrix import ContinualMatrix

        m = ContinualMatrix.from_dict(matrix)
        n_seen = len(m.seen)
        for key, name, title, label, cmap in (
            (
                "performance",
                "heatmap_performance.png",
                "Performance after each stage",
                "performance (0-100)",
                "viridis",
            ),
            ("v_score", "heatmap_vscore.png", "V-score after each stage", "V-score (0-100)", "magma_r"),
        ):
            rows, tasks, values = m.table(key)
            plot_heatmap(
                out_dir / name, rows, tasks, values, title=title, colorbar_label=label, cmap=cmap, n_seen=n_seen
            )
            written.append(name)
        curves = m.curves()
        plot_scores_over_stages(out_dir / "scores_over_stages.png", curves)
        written.append("scores_over_stages.png")
        if any(v is not None for v in curves["seen_ig"] + curves["held_out_ig"]):
            plot_ig_over_stages(out_dir / "ig_over_stages.png", curves)
            written.append("ig_over_stages.png")
    rows = report.get("tasks", [])
    if rows and not matrix:
        ordered = [r for r in rows if r.get("group") != "held_out"] + [r for r in rows if r.get("group") == "held_out"]
        tasks = [r["task"] for r in ordered]
        n_seen = sum(r.get("group") != "held_out" for r in ordered)
        label = report.get("name") or "eval"
        for key, name, title, clabel, cmap in (
            ("performance", "heatmap_performance.png", "Performance per task", "performance (0-100)", "viridis"),
            ("v_score", "heatmap_vscore.png", "V-score per task", "V-score (0-100)", "magma_r"),
        ):
            plot_heatmap(
                out_dir / name,
                [label],
                tasks,
                [[r.get(key) for r in ordered]],
                title=title,
                colorbar_label=clabel,
                cmap=cmap,
                n_seen=n_seen,
                ylabel="model",
            )
            written.append(name)
        plot_task_scores(out_dir / "task_scores.png", ordered, title=f"Per-task scores: {label}")
        written.append("task_scores.png")
    return written
