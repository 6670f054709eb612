"""Run reports: ``report.json`` (every number), ``report.md`` (tables) and PNG plots.

``report.json`` schema, version ``kpig-report/1`` (stable: fields may be added, never renamed
or removed without a new version)::

    {
      "schema": "kpig-report/1",
      "kind": "eval" | "continual",      # one evaluation, or a continual run with a matrix
      "name": str,                        # the run's name (a Table 1 row label)
      "created": str,                     # ISO 8601, UTC
      "config": {...},                    # what was run: model, adapter, benchmark, options
      "versions": {"python", "platform", "torch", "transformers", "peft", "kpig_trainer"},
      "summary": {                        # Table 1 columns (a continual run: its final stage)
        "seen" | "held_out" | "all": {
          "p_score", "v_score",           # 0-100, null when nothing applies; v_score: pooled
          "v_score_paper",                # the paper's reading: mean of the wfr, oos, wr means
          "wfr", "oos", "wr",             # mean rate of each violation type, 0-100 or null
          "n_tasks", "n_instances", "ig"  # ig: mean information gain, null if not measured
        }
      },
      "tasks": [{"task", "group" ("seen" | "held_out"), "metric", "metric_used",
                 "performance", "v_score", "wfr", "oos", "wr", "n", "fallback", "ig",
                 "notes": [str]}],
      "timings": {"generation", "scoring", "ig", "total", ...},   # seconds
      "settings": {...},                  # evaluation options (batch size, demonstrations, ...)
      "notes": [str],                     # e.g. "GPT tasks scored with ROUGE-L: no judge configured"
      "predictions": {task: [{"id", "prediction", "references"}]},
      "probes": {task: {...}},            # half-listening probes (probes.run_probe), or {}
      "matrix": {...} | null,             # ContinualMatrix.to_dict(): rows, cells, metrics
      "plots": [str]                      # PNG file names next to report.json
    }

NaN never appears: numbers that do not apply are ``null``.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import platform
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from kpig_trainer.fileio import atomic_write_text

__all__ = [
    "SCHEMA",
    "build_report",
    "compare_markdown",
    "read_report",
    "render_markdown",
    "table1_row",
    "write_report",
]

SCHEMA = "kpig-report/1"
_GROUPS = ("seen", "held_out")


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_finite(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def versions() -> dict[str, str | None]:
    """Versions of Python, the platform and the libraries a result depends on."""
    found: dict[str, str | None] = {"python": platform.python_version(), "platform": platform.platform()}
    for package in ("torch", "transformers", "peft", "kpig-trainer"):
        try:
            found[package.replace("-", "_")] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package.replace("-", "_")] = None
    if found["kpig_trainer"] is None:  # running from a source tree that is not installed
        from kpig_trainer import __version__

        found["kpig_trainer"] = __version__
    return found


def _task_rows(result, ig: Mapping[str, Any]) -> list[dict[str, Any]]:
    from kpig_trainer.evaluation.evaluate import task_v_score

    rows = []
    for name, score in result.scores.items():
        rows.append(
            {
                "task": name,
                "group": "held_out" if name in result.held_out else "seen",
                "metric": score.metric,
                "metric_used": score.metric_used,
                "performance": score.performance,
                "v_score": task_v_score(score),
                "wfr": score.wfr,
                "oos": score.oos,
                "wr": score.wr,
                "n": score.n,
                "fallback": score.fallback,
                "ig": ig.get(name),
                "notes": list(score.notes),
            }
        )
    return rows


def _notes(result, extra: Sequence[str]) -> list[str]:
    notes = []
    if result is not None:
        fallback = [n for n, s in result.scores.items() if s.fallback]
        if fallback:
            why = "the LLM judge failed" if result.settings.get("judge_error") else "no judge configured"
            notes.append(f"GPT tasks scored with ROUGE-L: {why} ({', '.join(fallback)})")
        other = [
            f"{n}: {note}"
            for n, s in result.scores.items()
            for note in s.notes
            if not note.startswith("GPT metric scored with ROUGE-L")
        ]
        notes.extend(other)
        shots = result.settings.get("held_out_demonstrations")
        if result.held_out and shots:
            notes.append(f"held-out tasks evaluated with {shots} demonstrations in the context")
    return notes + list(extra)


def build_report(
    result_or_matrix,
    config: Mapping[str, Any] | None = None,
    *,
    final=None,
    name: str | None = None,
    probes: Mapping[str, Any] | None = None,
    notes: Sequence[str] = (),
    timings: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """The report.json dict (schema in the module docstring) of an ``EvalResult`` or a
    ``ContinualMatrix``; for a matrix, ``final`` is the last stage's ``EvalResult`` (its
    predictions and per-task details), else the tasks come from the matrix's final row."""
    from kpig_trainer.evaluation.matrix import ContinualMatrix

    matrix = result_or_matrix if isinstance(result_or_matrix, ContinualMatrix) else None
    result = final if matrix is not None else result_or_matrix
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "kind": "continual" if matrix is not None else "eval",
        "name": name or (config or {}).get("name") or ("continual run" if matrix is not None else "eval"),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "config": dict(config or {}),
        "versions": versions(),
    }
    if result is not None:
        report["summary"] = result.summary()
        report["tasks"] = _task_rows(result, result.ig or {})
        report["timings"] = dict(result.timings)
        report["settings"] = dict(result.settings)
        report["predictions"] = result.predictions
    else:
        last = matrix.rows[-1] if matrix.rows else matrix.initial
        cells = last.cells if last is not None else {}
        report["summary"] = {g: dict(last.summary.get(g, {})) if last else {} for g in _GROUPS}
        report["tasks"] = [
            {
                "task": t,
                "group": "held_out" if t in matrix.held_out else "seen",
                "metric": None,
                "metric_used": None,
                "fallback": False,
                "notes": [],
                **cells[t],
            }
            for t in matrix.tasks
            if t in cells
        ]
        report["timings"], report["settings"], report["predictions"] = {}, {}, {}
    report["timings"].update(timings or {})
    report["notes"] = _notes(result, notes)
    report["probes"] = dict(probes or {})
    report["matrix"] = matrix.to_dict() if matrix is not None else None
    report["plots"] = []
    return _finite(report)


def write_report(
    out_dir: str | Path,
    result_or_matrix,
    config: Mapping[str, Any] | None = None,
    *,
    final=None,
    name: str | None = None,
    probes: Mapping[str, Any] | None = None,
    notes: Sequence[str] = (),
    timings: Mapping[str, float] | None = None,
    plots: bool = True,
) -> dict[str, Any]:
    """Write ``report.json``, ``report.md`` and (``plots=True``) the PNG plots to ``out_dir``.

    Arguments as in :func:`build_report`. Every file is written atomically (temporary file,
    then rename). Returns the report dict.
    """
    out_dir = Path(out_dir)
    report = build_report(
        result_or_matrix, config, final=final, name=name, probes=probes, notes=notes, timings=timings
    )
    if plots:
        from kpig_trainer.evaluation.plots import write_plots

        report["plots"] = write_plots(out_dir, report)
    atomic_write_text(out_dir / "report.json", json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    atomic_write_text(out_dir / "report.md", render_markdown(report))
    return report


def read_report(path: str | Path) -> dict[str, Any]:
    """Load a report.json (or the report.json inside a run directory); checks the schema."""
    path = Path(path)
    if path.is_dir():
        path = path / "report.json"
    report = json.loads(path.read_text(encoding="utf-8"))
    if not str(report.get("schema", "")).startswith("kpig-report/"):
        raise ValueError(f"{path}: not a kpig report (schema {report.get('schema')!r})")
    report.setdefault("name", path.parent.name)
    return report


# ---------------------------------------------------------------------------------------
# Markdown


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, bool):
        return "yes" if value else ""
    if isinstance(value, (int, float)):
        return f"{value:.{digits}f}" if isinstance(value, float) else str(value)
    return str(value)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def table1_row(report: Mapping[str, Any]) -> dict[str, Any]:
    """The numbers of a run's Table 1 row: seen / held-out P- and V-score (pooled, and the
    paper's reading: ``*_v_paper``, None in reports written before it existed), plus the matrix
    metrics (average performance, BWT, forgetting, FWT) of a continual run."""
    summary = report.get("summary", {})
    metrics = (report.get("matrix") or {}).get("metrics", {})
    return {
        "name": report.get("name"),
        "seen_p": summary.get("seen", {}).get("p_score"),
        "seen_v": summary.get("seen", {}).get("v_score"),
        "held_out_p": summary.get("held_out", {}).get("p_score"),
        "held_out_v": summary.get("held_out", {}).get("v_score"),
        "seen_v_paper": summary.get("seen", {}).get("v_score_paper"),
        "held_out_v_paper": summary.get("held_out", {}).get("v_score_paper"),
        "average": metrics.get("average_performance"),
        "bwt": metrics.get("bwt"),
        "forgetting": metrics.get("forgetting"),
        "fwt": metrics.get("fwt"),
        "fwt_held_out": metrics.get("fwt_held_out"),
    }


_TABLE1_KEYS = ("seen_p", "seen_v", "held_out_p", "held_out_v")
_TABLE1_HEADER = ["Run", "Seen P-score", "Seen V-score", "Held-out P-score", "Held-out V-score"]
_PAPER_V_KEYS = ("seen_v_paper", "held_out_v_paper")
_PAPER_V_HEADER = ["Seen V (paper)", "Held-out V (paper)"]
_MATRIX_HEADER = ["Average", "BWT", "Forgetting", "FWT (seen)", "FWT (held-out)"]
_MATRIX_KEYS = ("average", "bwt", "forgetting", "fwt", "fwt_held_out")
_V_SCORE_NOTE = (
    "The headline V-score is the mean of every applicable (task, check) rate, kept so that earlier reports "
    "and the printed stage table stay comparable; V (paper) is the paper's reading, the mean of the WFR, OOS "
    "and WR means, for comparison with its Table 1."
)


def render_markdown(report: Mapping[str, Any]) -> str:
    """report.md: Table 1 row, matrix metrics and matrix, per-task table, probes, notes,
    timings and plots."""
    row = table1_row(report)
    config = report.get("config", {})
    parts = [f"# KPIG report: {report.get('name')}", ""]
    described = ", ".join(f"{k}: `{config[k]}`" for k in ("model", "adapter", "benchmark") if config.get(k))
    parts += [
        f"{report.get('kind', 'eval').capitalize()} report, created {report.get('created')}."
        + (f" {described}." if described else ""),
        "",
    ]
    parts += [
        "## Summary (Table 1 layout)",
        "",
        _table(
            _TABLE1_HEADER + _PAPER_V_HEADER, [[row["name"], *(_fmt(row[k]) for k in (*_TABLE1_KEYS, *_PAPER_V_KEYS))]]
        ),
        "",
        "P-score: mean task performance (higher is better). V-score: mean violation rate "
        "(WFR, OOS, WR; lower is better). All 0-100.",
        "",
        _V_SCORE_NOTE,
        "",
    ]
    summary = report.get("summary", {})
    group_keys = ("p_score", "v_score", "v_score_paper", "wfr", "oos", "wr")
    group_rows = [
        [
            g.replace("_", "-"),
            *(_fmt(summary[g].get(k)) for k in group_keys),
            _fmt(summary[g].get("ig"), 3),
            _fmt(summary[g].get("n_tasks")),
        ]
        for g in (*_GROUPS, "all")
        if summary.get(g)
    ]
    parts += [_table(["Group", "P-score", "V-score", "V (paper)", "WFR", "OOS", "WR", "IG", "Tasks"], group_rows), ""]
    matrix = report.get("matrix")
    if matrix:
        parts += _matrix_section(matrix)
    tasks = report.get("tasks", [])
    if tasks:
        parts += [
            "## Per-task scores",
            "",
            _table(
                ["Task", "Group", "Metric", "N", "Performance", "WFR", "OOS", "WR", "V-score", "IG"],
                [
                    [
                        t["task"],
                        t.get("group", "").replace("_", "-"),
                        (t.get("metric") or "-") + (" (ROUGE-L fallback)" if t.get("fallback") else ""),
                        _fmt(t.get("n")),
                        _fmt(t.get("performance")),
                        _fmt(t.get("wfr")),
                        _fmt(t.get("oos")),
                        _fmt(t.get("wr")),
                        _fmt(t.get("v_score")),
                        _fmt(t.get("ig"), 3),
                    ]
                    for t in tasks
                ],
            ),
            "",
        ]
    for task, probe in (report.get("probes") or {}).items():
        parts += _probe_section(task, probe)
    if report.get("notes"):
        parts += ["## Notes", "", *(f"- {note}" for note in report["notes"]), ""]
    timings = report.get("timings") or {}
    if timings:
        parts += ["## Timings", "", _table(["Step", "Seconds"], [[k, _fmt(v)] for k, v in timings.items()]), ""]
    versions_ = report.get("versions") or {}
    parts += ["## Versions", "", ", ".join(f"{k} {v}" for k, v in versions_.items() if v), ""]
    if report.get("plots"):
        parts += ["## Plots", "", *(f"![{p}]({p})" for p in report["plots"]), ""]
    return "\n".join(parts)


def _matrix_section(matrix: Mapping[str, Any]) -> list[str]:
    from kpig_trainer.evaluation.matrix import ContinualMatrix

    m = ContinualMatrix.from_dict(matrix)
    metrics = m.metrics()
    values = [metrics.get(k) for k in ("average_performance", "bwt", "forgetting", "fwt", "fwt_held_out")]
    labels, tasks, table = m.table("performance")
    lines = [
        "## Continual-learning matrix",
        "",
        _table(_MATRIX_HEADER, [[_fmt(v) for v in values]]),
        "",
        "Average: final mean over seen tasks trained so far; BWT and forgetting over tasks trained before "
        "the final stage; FWT against the initial model (needs an `init` row). Definitions in "
        "`kpig_trainer/evaluation/matrix.py`.",
        "",
        "Performance after each stage (rows) on each task (columns):",
        "",
        _table(["After", *tasks], [[label, *(_fmt(v) for v in row)] for label, row in zip(labels, table)]),
        "",
    ]
    curves = m.curves()
    lines += [
        "P/V-score per stage:",
        "",
        _table(
            [
                "After",
                "Trained P",
                "Trained V",
                "Held-out P",
                "Held-out V",
                "Trained V (paper)",
                "Held-out V (paper)",
                "Seen IG",
                "Held-out IG",
            ],
            [
                [
                    label,
                    _fmt(curves["trained_p_score"][k]),
                    _fmt(curves["trained_v_score"][k]),
                    _fmt(curves["held_out_p_score"][k]),
                    _fmt(curves["held_out_v_score"][k]),
                    _fmt(curves["trained_v_score_paper"][k]),
                    _fmt(curves["held_out_v_score_paper"][k]),
                    _fmt(curves["seen_ig"][k], 3),
                    _fmt(curves["held_out_ig"][k], 3),
                ]
                for k, label in enumerate(curves["labels"])
            ],
        ),
        "",
    ]
    return lines


def _probe_section(task: str, probe: Mapping[str, Any]) -> list[str]:
    lines = [f"## Probes: {task}", ""]
    variants = probe.get("instruction_variants") or []
    if variants:
        lines += [
            "Instruction variants (cf. the paper's Table 3):",
            "",
            _table(
                ["Metric", *(v["variant"] for v in variants)],
                [
                    ["P-score", *(_fmt(v.get("p_score")) for v in variants)],
                    ["V-score", *(_fmt(v.get("v_score")) for v in variants)],
                    ["IG", *(_fmt(v.get("ig"), 3) for v in variants)],
                ],
            ),
            "",
        ]
    for spec in probe.get("misleading_constraints") or []:
        labels = [*spec.get("old_labels", []), *spec.get("new_labels", [])]
        lines += [
            f"Misleading constraint `{spec.get('name')}` (cf. the paper's Table 4), {spec.get('n')} answers; "
            "percent of answers equal (case-sensitive) to each label:",
            "",
            _table(
                ["Response", "Percent"],
                [
                    *(
                        [
                            label + (" (required)" if label in spec.get("new_labels", []) else ""),
                            _fmt(spec["rates"].get(label)),
                        ]
                        for label in labels
                    ),
                    ["other", _fmt(spec["rates"].get("other"))],
                    ["IG", _fmt(spec.get("ig"), 3)],
                ],
            ),
            "",
        ]
    return lines


def compare_markdown(reports: Sequence[Mapping[str, Any]], names: Sequence[str] | None = None) -> str:
    """Runs side by side in the paper's Table 1 layout (one row per run), with the matrix
    metrics of continual runs; the best value of each column is bold (P-score, average and
    transfer: highest; V-score and forgetting: lowest). The paper's V-score reading gets its
    columns when a report has it (reports written before it existed show "-")."""
    rows = [table1_row(r) for r in reports]
    if names:
        for row, label in zip(rows, names):
            row["name"] = label
    keys = list(_TABLE1_KEYS)
    header = list(_TABLE1_HEADER)
    if any("v_score_paper" in (r.get("summary") or {}).get(g, {}) for r in reports for g in _GROUPS):
        keys += list(_PAPER_V_KEYS)
        header += _PAPER_V_HEADER
    if any(r.get("matrix") for r in reports):
        keys += list(_MATRIX_KEYS)
        header += _MATRIX_HEADER
    lower_is_better = {"seen_v", "held_out_v", *_PAPER_V_KEYS, "forgetting"}
    best = {}
    for key in keys:
        values = [r[key] for r in rows if r[key] is not None]
        if len(values) > 1:
            best[key] = min(values) if key in lower_is_better else max(values)
    body = [
        [r["name"], *(f"**{_fmt(r[k])}**" if r[k] is not None and r[k] == best.get(k) else _fmt(r[k]) for k in keys)]
        for r in rows
    ]
    return _table(header, body) + "\n"
