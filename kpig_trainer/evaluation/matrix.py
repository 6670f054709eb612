"""The continual-learning matrix: scores of every task after every stage, and its metrics.

Notation. Stages are numbered ``0 .. T`` (0-based; ``T`` is the last stage recorded, the
"final" row). ``R[t, i]`` is the performance (0-100) on task ``i`` evaluated right after
stage ``t`` was trained; ``R[init, i]`` the performance of the model before any training,
when that row was recorded. ``s(i)`` is the stage that trains seen task ``i``: in an ST
stream task ``i`` is trained at stage ``i``; in an SC stream a stage trains several tasks and
each task uses its own stage index, so "the tasks before the final stage" are those with
``s(i) < T``.

Metrics (all over the performance values unless ``key`` says otherwise; None when no task
qualifies, e.g. BWT after the first stage):

- **Average performance** ``A_t`` = mean over seen tasks with ``s(i) <= t`` of ``R[t, i]``;
  after the final stage of a complete run, the mean over all seen tasks.
- **Backward transfer** (Lopez-Paz & Ranzato, 2017, "Gradient Episodic Memory for Continual
  Learning"): ``BWT_t`` = mean over tasks with ``s(i) < t`` of ``R[t, i] - R[s(i), i]``.
  Negative values mean forgetting.
- **Forgetting** (Chaudhry et al., 2018, "Riemannian Walk for Incremental Learning"):
  ``F_t`` = mean over tasks with ``s(i) < t`` of ``max_{s(i) <= l < t} R[l, i] - R[t, i]``.
  The maximum runs over the stages since the task was trained: scores before that measure
  zero-shot transfer, not knowledge the model could forget (Chaudhry et al. take every
  earlier stage; in their incremental-classification settings a task scores at most chance
  before it is learnt, so the maximum falls after ``s(i)`` anyway).
- **Forward transfer** to seen tasks (Lopez-Paz & Ranzato, 2017): ``FWT_t`` = mean over
  tasks with ``0 < s(i) <= t`` of ``R[s(i) - 1, i] - R[init, i]``: what training on the
  earlier stages did to a task before the task itself was trained, against the initial
  model (their ``b_i``). Needs the initial row.
- **Forward transfer to held-out tasks**: ``FWT^ho_t`` = mean over held-out tasks ``h`` of
  ``R[t, h] - R[init, h]``: how the run changed the never-trained tasks (the paper's INIT is
  usually an upper bound there, so this is typically <= 0). Needs the initial row.

Each row also records the P-score, the V-score (pooled, and the paper's mean of per-type
means) and the mean IG of the seen tasks (all, and trained so far) and of the held-out tasks:
the columns of the paper's Table 1 and the curves of its Figure 4.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kpig_trainer.evaluation.scores import TaskScore

__all__ = ["CELL_KEYS", "ContinualMatrix", "StageRecord"]

CELL_KEYS = ("performance", "v_score", "wfr", "oos", "wr", "ig", "n")
"""What each (stage, task) cell holds."""


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _cell(score: TaskScore | Mapping[str, Any], ig: float | None) -> dict[str, Any]:
    get = score.get if isinstance(score, Mapping) else lambda k, d=None: getattr(score, k, d)
    rates = [get(kind) for kind in ("wfr", "oos", "wr") if get(kind) is not None]
    v = get("v_score") if isinstance(score, Mapping) and "v_score" in score else _mean(rates)
    return {
        "performance": float(get("performance")),
        "v_score": v,
        "wfr": get("wfr"),
        "oos": get("oos"),
        "wr": get("wr"),
        "ig": ig if ig is not None else get("ig"),
        "n": get("n"),
    }


def _group(cells: Mapping[str, Mapping[str, Any]], names: Sequence[str]) -> dict[str, Any]:
    """P-score, V-score and mean IG of some tasks of a row: ``v_score`` pools every applicable
    (task, violation type) rate (``scores.v_score``), ``v_score_paper`` is the mean of the
    per-type means (``scores.v_score_paper``)."""
    present = [cells[n] for n in names if n in cells]
    kinds = ("wfr", "oos", "wr")
    rates = [c[k] for c in present for k in kinds if c.get(k) is not None]
    per_type = [_mean([c[k] for c in present if c.get(k) is not None]) for k in kinds]
    return {
        "p_score": _mean([c["performance"] for c in present]),
        "v_score": _mean(rates),
        "v_score_paper": _mean([m for m in per_type if m is not None]),
        "ig": _mean([c["ig"] for c in present if c.get("ig") is not None]),
        "n_tasks": len(present),
    }


@dataclass
class StageRecord:
    """One row of the matrix.

    Attributes:
        stage: 0-based index of the stage just trained; None for the initial model.
        label: row label for tables and plots ("init", "stage 1", ...).
        cells: ``{task: {"performance", "v_score", "wfr", "oos", "wr", "ig", "n"}}``.
        summary: ``{"seen": ..., "trained": ..., "held_out": ...}``, each with ``p_score``,
            ``v_score``, ``v_score_paper``, ``ig`` and ``n_tasks``; "seen" is every seen task,
            "trained" the seen tasks trained up to this stage.
    """

    stage: int | None
    label: str
    cells: dict[str, dict[str, Any]]
    summary: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class ContinualMatrix:
    """Stage x task scores of a continual run, with the metrics of the module docstring.

    Args:
        seen: seen task names, in stream order (the matrix columns, then ``held_out``).
        held_out: held-out task names.
        task_stage: ``{seen task: 0-based index of the stage that trains it}``.
        stage_names: optional display names of the stages.
    """

    seen: list[str]
    held_out: list[str]
    task_stage: dict[str, int]
    stage_names: list[str] = field(default_factory=list)
    initial: StageRecord | None = None
    rows: list[StageRecord] = field(default_factory=list)

    def __post_init__(self) -> None:
        missing = [t for t in self.seen if t not in self.task_stage]
        if missing:
            raise ValueError(f"seen task(s) without a stage: {missing}")
        both = sorted(set(self.seen) & set(self.held_out))
        if both:
            raise ValueError(f"task(s) both seen and held out: {both}")

    @classmethod
    def from_stream(cls, stream) -> "ContinualMatrix":
        """An empty matrix for a :class:`kpig_trainer.data.Stream`."""
        return cls(
            seen=list(stream.seen),
            held_out=list(stream.held_out),
            task_stage={t: stream.stage_of(t) for t in stream.seen},
            stage_names=[stage.name for stage in stream.stages],
        )

    # ------------------------------------------------------------------ recording

    @property
    def tasks(self) -> list[str]:
        """The columns: seen tasks, then held-out tasks."""
        return [*self.seen, *self.held_out]

    def record(
        self, stage: int | None, result: Any, ig: Mapping[str, float | None] | None = None, label: str | None = None
    ) -> StageRecord:
        """Add (or replace) the row of ``stage`` (None: the initial model).

        ``result`` is an :class:`~kpig_trainer.evaluation.evaluate.EvalResult` (its ``scores``
        and ``ig`` are used) or a ``{task: TaskScore | cell mapping}``; ``ig`` overrides
        the per-task IG. Tasks not in the matrix are ignored.
        """
        scores = getattr(result, "scores", result)
        ig = dict(getattr(result, "ig", {}) or {}) | dict(ig or {})
        cells = {t: _cell(scores[t], ig.get(t)) for t in self.tasks if t in scores}
        if label is None:
            label = "init" if stage is None else f"stage {stage + 1}"
        trained = [t for t in self.seen if stage is not None and self.task_stage[t] <= stage]
        row = StageRecord(
            stage,
            label,
            cells,
            {
                "seen": _group(cells, self.seen),
                "trained": _group(cells, trained),
                "held_out": _group(cells, self.held_out),
            },
        )
        if stage is None:
            self.initial = row
        else:
            self.rows = sorted([r for r in self.rows if r.stage != stage] + [row], key=lambda r: r.stage)
        return row

    def row(self, stage: int | None) -> StageRecord | None:
        """The row of ``stage`` (None: the initial row), or None when not recorded."""
        if stage is None:
            return self.initial
        return next((r for r in self.rows if r.stage == stage), None)

    @property
    def final_stage(self) -> int | None:
        """Index of the last recorded stage (None before any)."""
        return self.rows[-1].stage if self.rows else None

    def value(self, stage: int | None, task: str, key: str = "performance") -> float | None:
        """``R[stage, task]`` (or another cell key); None when not recorded."""
        row = self.row(stage)
        cell = row.cells.get(task) if row is not None else None
        return None if cell is None else cell.get(key)

    def table(self, key: str = "performance", include_initial: bool = True) -> tuple[list[str], list[str], list[list]]:
        """``(row labels, task names, values)`` with None where a cell is missing."""
        rows = ([self.initial] if include_initial and self.initial is not None else []) + self.rows
        return [r.label for r in rows], self.tasks, [[r.cells.get(t, {}).get(key) for t in self.tasks] for r in rows]

    # ------------------------------------------------------------------ metrics

    def _stage(self, stage: int | None) -> int | None:
        return self.final_stage if stage is None else stage

    def average_performance(self, stage: int | None = None, key: str = "performance") -> float | None:
        """``A_t``: mean of ``R[t, i]`` over seen tasks trained up to ``t`` (default: final)."""
        t = self._stage(stage)
        if t is None:
            return None
        values = [self.value(t, i, key) for i in self.seen if self.task_stage[i] <= t]
        return _mean([v for v in values if v is not None])

    def bwt(self, stage: int | None = None, key: str = "performance") -> float | None:
        """Backward transfer ``BWT_t``: mean of ``R[t, i] - R[s(i), i]`` over ``s(i) < t``."""
        t = self._stage(stage)
        if t is None:
            return None
        diffs = []
        for i in self.seen:
            if self.task_stage[i] < t:
                now, then = self.value(t, i, key), self.value(self.task_stage[i], i, key)
                if now is not None and then is not None:
                    diffs.append(now - then)
        return _mean(diffs)

    def forgetting(self, stage: int | None = None) -> float | None:
        """Forgetting ``F_t``: mean of ``max_{s(i) <= l < t} R[l, i] - R[t, i]`` over ``s(i) < t``."""
        t = self._stage(stage)
        if t is None:
            return None
        drops = []
        for i in self.seen:
            if self.task_stage[i] < t and self.value(t, i) is not None:
                past = [self.value(row, i) for row in range(self.task_stage[i], t)]
                past = [v for v in past if v is not None]
                if past:
                    drops.append(max(past) - self.value(t, i))
        return _mean(drops)

    def fwt(self, stage: int | None = None, key: str = "performance") -> float | None:
        """Forward transfer to seen tasks: mean of ``R[s(i) - 1, i] - R[init, i]`` over
        ``0 < s(i) <= t``; None without the initial row."""
        t = self._stage(stage)
        if t is None or self.initial is None:
            return None
        diffs = []
        for i in self.seen:
            s = self.task_stage[i]
            if 0 < s <= t:
                before, base = self.value(s - 1, i, key), self.value(None, i, key)
                if before is not None and base is not None:
                    diffs.append(before - base)
        return _mean(diffs)

    def fwt_held_out(self, stage: int | None = None, key: str = "performance") -> float | None:
        """Forward transfer to held-out tasks: mean of ``R[t, h] - R[init, h]``; None
        without the initial row."""
        t = self._stage(stage)
        if t is None or self.initial is None:
            return None
        diffs = [
            self.value(t, h, key) - self.value(None, h, key)
            for h in self.held_out
            if self.value(t, h, key) is not None and self.value(None, h, key) is not None
        ]
        return _mean(diffs)

    def metrics(self, stage: int | None = None) -> dict[str, Any]:
        """Every metric at ``stage`` (default: final) plus that row's group P/V-scores."""
        t = self._stage(stage)
        row = self.row(t) if t is not None else None
        return {
            "stage": t,
            "average_performance": self.average_performance(t),
            "bwt": self.bwt(t),
            "forgetting": self.forgetting(t),
            "fwt": self.fwt(t),
            "fwt_held_out": self.fwt_held_out(t),
            "final": row.summary if row is not None else {},
        }

    def curves(self) -> dict[str, list]:
        """Per-row series for plots: ``labels`` and, for each of ``trained``, ``seen`` and
        ``held_out``, its ``p_score``, ``v_score``, ``v_score_paper`` and ``ig`` lists (initial
        row first; ``v_score_paper`` is None in rows saved before it existed)."""
        rows = ([self.initial] if self.initial is not None else []) + self.rows
        series: dict[str, list] = {"labels": [r.label for r in rows]}
        for group in ("trained", "seen", "held_out"):
            for key in ("p_score", "v_score", "v_score_paper", "ig"):
                series[f"{group}_{key}"] = [r.summary.get(group, {}).get(key) for r in rows]
        return series

    # ------------------------------------------------------------------ serialisation

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict, metrics included (:meth:`from_dict` ignores them)."""

        def row(r: StageRecord) -> dict[str, Any]:
            return {"stage": r.stage, "label": r.label, "cells": r.cells, "summary": r.summary}

        return {
            "seen": self.seen,
            "held_out": self.held_out,
            "task_stage": self.task_stage,
            "stage_names": self.stage_names,
            "initial": row(self.initial) if self.initial is not None else None,
            "rows": [row(r) for r in self.rows],
            "metrics": self.metrics(),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ContinualMatrix":
        """Rebuild a matrix from :meth:`to_dict` output."""

        def row(d: Mapping[str, Any]) -> StageRecord:
            return StageRecord(
                d["stage"],
                d["label"],
                {k: dict(v) for k, v in d["cells"].items()},
                {k: dict(v) for k, v in d.get("summary", {}).items()},
            )

        matrix = cls(
            list(data["seen"]),
            list(data["held_out"]),
            {k: int(v) for k, v in data["task_stage"].items()},
            list(data.get("stage_names", [])),
        )
        matrix.initial = row(data["initial"]) if data.get("initial") else None
        matrix.rows = sorted((row(r) for r in data.get("rows", [])), key=lambda r: r.stage)
        return matrix

    def save(self, path: str | Path) -> Path:
        """Write the JSON atomically (temp file, then rename)."""
        from kpig_trainer.fileio import atomic_write_text

        return atomic_write_text(path, json.dumps(_finite(self.to_dict()), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "ContinualMatrix":
        """Read a matrix written by :meth:`save` (or the ``matrix`` of a report.json)."""
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        return cls.from_dict(data.get("matrix", data))


def _finite(value: Any) -> Any:
    """NaN / inf floats become None, so the JSON is standard."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
