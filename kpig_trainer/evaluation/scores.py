"""Task-level scores and the paper's P-score and V-score (section 3.4)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

from kpig_trainer.evaluation.constraints import as_constraints, violations
from kpig_trainer.evaluation.metrics import score_example

if TYPE_CHECKING:
    from kpig_trainer.evaluation.judge import LLMJudge

__all__ = ["VIOLATION_TYPES", "TaskScore", "p_score", "score_task", "v_score", "v_score_paper", "violation_rates"]

VIOLATION_TYPES = ("wfr", "oos", "wr")


@dataclass
class TaskScore:
    """The scores of one task.

    Attributes:
        task: task name.
        metric: the annotated metric ("ACC", "F1", "ROUGE", "BLEU", "Match", "GPT").
        metric_used: the metric function actually applied ("exact_match", "set_f1",
            "rouge_l", "gpt", ...).
        performance: mean per-example score, 0-100.
        wfr, oos, wr: violation rates, 0-100, over the examples where the check applies;
            None when it applies to none of them.
        n: number of examples.
        fallback: True when ``metric_used`` stands in for the annotated metric (GPT scored
            with ROUGE-L because no judge was available).
        notes: human-readable remarks for reports.
    """

    task: str
    metric: str
    metric_used: str
    performance: float
    wfr: float | None
    oos: float | None
    wr: float | None
    n: int
    fallback: bool = False
    notes: list[str] = field(default_factory=list)


def _rate(flags: list[bool | None]) -> float | None:
    applicable = [flag for flag in flags if flag is not None]
    return 100 * sum(applicable) / len(applicable) if applicable else None


def score_task(
    task_name: str,
    predictions: Sequence[str],
    references_list: Sequence[Sequence[str]],
    constraints: Any,
    inputs: Sequence[str] | None = None,
    judge: LLMJudge | None = None,
    instruction: str | None = None,
) -> TaskScore:
    """Score one task's predictions against their references and annotated constraints.

    ``inputs`` (the instances' input texts) are needed for "In context" OOS checks and by
    the judge; ``instruction`` (the task definition) is shown to the judge. A GPT task
    without an available judge is scored with ROUGE-L and flagged ``fallback``.
    """
    task = as_constraints(constraints)
    n = len(predictions)
    if n == 0:
        raise ValueError(f"task {task_name!r}: no predictions to score")
    if len(references_list) != n or (inputs is not None and len(inputs) != n):
        raise ValueError(
            f"task {task_name!r}: {n} predictions, {len(references_list)} reference lists"
            + ("" if inputs is None else f", {len(inputs)} inputs")
        )
    values, used, flags = [], set(), {kind: [] for kind in VIOLATION_TYPES}
    fallback = False
    for i, (prediction, references) in enumerate(zip(predictions, references_list)):
        input_text = inputs[i] if inputs is not None else None
        result = score_example(
            prediction, references, task, judge=judge, instruction=instruction, input_text=input_text
        )
        values.append(result.value)
        used.add(result.metric)
        fallback |= result.fallback
        for kind, flag in violations(prediction, task, input_text).items():
            flags[kind].append(flag)

    notes = []
    if fallback:
        notes.append("GPT metric scored with ROUGE-L: no LLM judge available")
    if inputs is None and task.scope and "in context" in task.scope.casefold():
        notes.append("OOS not checked: 'In context' scope needs the inputs")
    return TaskScore(
        task=task_name,
        metric=task.metric,
        metric_used="+".join(sorted(used)),
        performance=100 * sum(values) / n,
        wfr=_rate(flags["wfr"]),
        oos=_rate(flags["oos"]),
        wr=_rate(flags["wr"]),
        n=n,
        fallback=fallback,
        notes=notes,
    )


def p_score(task_scores: Sequence[TaskScore]) -> float:
    """P-score: the mean of the tasks' ``performance`` (0-100), every task weighing the
    same whatever its metric or size. NaN for no tasks (a float either way, and NaN shows
    up in tables instead of silently reading as 0)."""
    if not task_scores:
        return math.nan
    return sum(score.performance for score in task_scores) / len(task_scores)


def v_score(task_scores: Sequence[TaskScore]) -> float:
    """V-score, pooled (the headline): the mean of all applicable (task, violation type)
    rates, 0-100.

    Every rate that applies (``wfr``, ``oos``, ``wr`` not None) counts once, so a task
    annotated with two checks contributes two rates and a task with none contributes
    nothing (counting it as 0 would reward tasks without constraints). This reads the
    V-score the way :func:`p_score` reads the P-score: a mean over task-level values. A type
    weighs by the number of tasks it applies to (in the shipped SuperNI-KPIG annotations WR
    applies to all 101 tasks, OOS to 59, WFR to 12). The paper's literal reading, "the
    average of WFR, OOS and WR", is :func:`v_score_paper`. NaN when no rate applies.
    """
    rates = [
        getattr(score, kind) for score in task_scores for kind in VIOLATION_TYPES if getattr(score, kind) is not None
    ]
    return sum(rates) / len(rates) if rates else math.nan


def v_score_paper(task_scores: Sequence[TaskScore]) -> float:
    """V-score, the paper's reading (section 3.4): the mean of the per-type means of
    :func:`violation_rates` (WFR over the tasks it applies to, OOS over its tasks, WR over
    its tasks), over the types that apply to at least one task. Every type weighs a third
    however few tasks it covers. For one task it equals :func:`v_score`. NaN when no rate
    applies."""
    means = [mean for mean in violation_rates(task_scores).values() if not math.isnan(mean)]
    return sum(means) / len(means) if means else math.nan


def violation_rates(task_scores: Sequence[TaskScore]) -> dict[str, float]:
    """Per-type means for reports: ``{"wfr": ..., "oos": ..., "wr": ...}`` over the tasks
    where each applies (NaN where none does)."""
    result = {}
    for kind in VIOLATION_TYPES:
        rates = [getattr(s, kind) for s in task_scores if getattr(s, kind) is not None]
        result[kind] = sum(rates) / len(rates) if rates else math.nan
    return result
