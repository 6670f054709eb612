"""Plain-text summaries of a continual run's state (the per-stage table the main job prints)."""

from __future__ import annotations

from typing import Any

from kpig_trainer.continual.state import RunState, in_stage_order
from kpig_trainer.data.summary import format_table


def _fmt(value: Any, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def stage_row(key: str, evaluation: dict[str, Any]) -> dict[str, Any]:
    """One table row from an evaluation entry (P/V-scores when present, else mean test loss)."""
    row: dict[str, Any] = {"after": "start" if key == "init" else f"stage {key}"}
    if "scores" in evaluation:
        from kpig_trainer.evaluation.evaluate import EvalResult

        summary = EvalResult.from_dict({**evaluation, "predictions": {}}).summary()
        for group, label in (("seen", "seen"), ("held_out", "held-out")):
            row[f"{label} P"] = _fmt(summary[group].get("p_score"))
            row[f"{label} V"] = _fmt(summary[group].get("v_score"))
        row["mean IG"] = _fmt(summary["all"].get("ig"), digits=4)
    elif "test_loss" in evaluation:
        losses = list(evaluation["test_loss"].values())
        row["mean test loss"] = _fmt(sum(losses) / len(losses) if losses else None, digits=3)
    return row


def stage_table(state: RunState) -> str:
    """Per-stage table: what was trained, what was replayed, and the evaluation after it."""
    rows = []
    for key, evaluation in in_stage_order(state.evaluation).items():
        row = stage_row(key, evaluation)
        if key != "init":
            stage = int(key) - 1
            row["trained"] = state.stages[stage]
            replay = state.replay.get(str(stage), {})
            row["replayed"] = ", ".join(replay.get("tasks", [])) or "-"
        rows.append(row)
    if not rows:
        return "(no evaluation recorded)"
    columns = list(dict.fromkeys(k for r in rows for k in r))
    return format_table([{c: r.get(c, "") for c in columns} for r in rows], columns)
