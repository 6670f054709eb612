"""Evaluate a model on tasks: generate, score every task, group P/V-scores, optional IG.

:func:`evaluate_tasks` is the entry point for any set of tasks; :func:`evaluate_stream_stage`
evaluates one row of the continual-learning matrix (every seen and every held-out task of a
stream) after a stage.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kpig_trainer.data.records import Instance, Task
from kpig_trainer.evaluation.generation import generate_answers
from kpig_trainer.evaluation.judge import JudgeError
from kpig_trainer.evaluation.scores import (
    VIOLATION_TYPES,
    TaskScore,
    p_score,
    score_task,
    v_score,
    v_score_paper,
    violation_rates,
)

logger = logging.getLogger(__name__)

__all__ = [
    "EvalResult",
    "evaluate_stream_stage",
    "evaluate_tasks",
    "group_summary",
    "information_gains",
    "task_v_score",
]

GROUPS = ("seen", "held_out")


def task_v_score(score: TaskScore) -> float | None:
    """The V-score of one task: the mean of its applicable violation rates; None when no
    check applies to it."""
    value = v_score([score])
    return None if math.isnan(value) else value


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _nan_to_none(value: float) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def group_summary(scores: Sequence[TaskScore], ig: Mapping[str, float | None] | None = None) -> dict[str, Any]:
    """P-score, V-score (``v_score`` pooled, ``v_score_paper`` the paper's mean of the per-type
    means: see :mod:`.scores`), per-type violation rates, task count and mean IG of a task group.

    Values are 0-100 (IG is a raw information gain); None where nothing applies (no task,
    no applicable violation check, no IG measured)."""
    rates = violation_rates(scores)
    igs = [ig[s.task] for s in scores if ig and ig.get(s.task) is not None]
    return {
        "p_score": _nan_to_none(p_score(scores)),
        "v_score": _nan_to_none(v_score(scores)),
        "v_score_paper": _nan_to_none(v_score_paper(scores)),
        **{kind: _nan_to_none(rates[kind]) for kind in VIOLATION_TYPES},
        "n_tasks": len(scores),
        "n_instances": sum(s.n for s in scores),
        "ig": _mean(igs),
    }


@dataclass
class EvalResult:
    """What :func:`evaluate_tasks` returns.

    Attributes:
        scores: ``{task: TaskScore}``, in evaluation order.
        predictions: ``{task: [{"id", "prediction", "references"}]}``.
        seen / held_out: task names of each group (every scored task is in exactly one).
        ig: ``{task: mean information gain}`` when IG was computed (None for a task whose
            instances have no key parts), else ``{}``.
        timings: seconds: ``generation``, ``scoring``, ``ig``, ``total``.
        settings: the evaluation options (batch size, demonstrations, alpha, ...).
    """

    scores: dict[str, TaskScore]
    predictions: dict[str, list[dict[str, Any]]]
    seen: list[str]
    held_out: list[str]
    ig: dict[str, float | None] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    def group(self, name: str) -> list[TaskScore]:
        """Task scores of ``"seen"``, ``"held_out"`` or ``"all"``."""
        names = {"seen": self.seen, "held_out": self.held_out, "all": list(self.scores)}[name]
        return [self.scores[t] for t in names if t in self.scores]

    def summary(self) -> dict[str, dict[str, Any]]:
        """``{"seen": ..., "held_out": ..., "all": ...}``, each a :func:`group_summary`."""
        return {name: group_summary(self.group(name), self.ig) for name in (*GROUPS, "all")}

    def notes(self) -> list[str]:
        """Report notes: the tasks' own notes, prefixed with their names."""
        return [f"{task}: {note}" for task, score in self.scores.items() for note in score.notes]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (``from_dict`` inverts it)."""
        return {
            "scores": {name: dataclasses.asdict(score) for name, score in self.scores.items()},
            "predictions": self.predictions,
            "seen": list(self.seen),
            "held_out": list(self.held_out),
            "ig": dict(self.ig),
            "timings": dict(self.timings),
            "settings": dict(self.settings),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "EvalResult":
        """Rebuild from :meth:`to_dict` output."""
        return cls(
            scores={name: TaskScore(**score) for name, score in data["scores"].items()},
            predictions={k: list(v) for k, v in data.get("predictions", {}).items()},
            seen=list(data["seen"]),
            held_out=list(data["held_out"]),
            ig=dict(data.get("ig", {})),
            timings=dict(data.get("timings", {})),
            settings=dict(data.get("settings", {})),
        )


def information_gains(
    model,
    tokenizer,
    instances: Sequence[Instance],
    *,
    alpha: float = 0.3,
    batch_size: int = 8,
    mask_token: str = "[MASK]",
    system_prompt: str | None = None,
    max_length: int | None = None,
    collator=None,
    show_progress: bool = False,
) -> list[float | None]:
    """Information gain of each instance on its first reference output (no gradients).

    The pipeline replay scoring uses (:func:`kpig_trainer.kpig.scoring.score_instances`): the
    instance and its key-part-masked twin collated as in training, each response ended by EOS.
    No demonstrations are in the context, also for held-out tasks, so IG measures the
    instruction's key parts alone. An instance without a maskable key part gets None (its twins
    are identical: IG would be 0 by construction).

    Args:
        collator: the scoring collator to use (a continual run passes its own, so its reported IG
            and its replay ranking are one quantity); default:
            ``build_collator(tokenizer, scoring=True, mask_token=..., system_prompt=..., max_length=...)``.
        show_progress: a ``tqdm`` bar.
    """
    from kpig_trainer.kpig.collator import build_collator
    from kpig_trainer.kpig.scoring import score_instances

    if collator is None:
        collator = build_collator(
            tokenizer, scoring=True, max_length=max_length, mask_token=mask_token, system_prompt=system_prompt
        )
    return score_instances(
        model,
        instances,
        collator,
        kind="ig",
        alpha=alpha,
        batch_size=batch_size,
        show_progress=show_progress,
        desc="information gain",
    )


def evaluate_tasks(
    model,
    tokenizer,
    tasks: Mapping[str, Task],
    instances_by_task: Mapping[str, Sequence[Instance]],
    *,
    held_out: Collection[str] = (),
    judge=None,
    batch_size: int = 8,
    max_new_tokens: int | Mapping[str, int] | None = None,
    demonstrations: int | Mapping[str, int] = 0,
    held_out_demonstrations: int = 2,
    system_prompt: str | None = None,
    compute_ig: bool = False,
    alpha: float = 0.3,
    ig_batch_size: int | None = None,
    mask_token: str = "[MASK]",
    ig_collator=None,
    show_progress: bool = True,
) -> EvalResult:
    """Generate answers for every task's instances and score them.

    Args:
        model, tokenizer: a causal LM (or PEFT model) and its tokenizer.
        tasks: task records by name (constraints, definition, demonstrations).
        instances_by_task: ``{task: instances}`` to evaluate, e.g. ``stream.test``.
        held_out: names of held-out tasks: they form the held-out group and get
            ``held_out_demonstrations`` demonstrations in the context; every other task is
            in the seen group.
        judge: an :class:`LLMJudge` for GPT-metric tasks; without one (or unavailable) they
            fall back to ROUGE-L and their scores carry a note.
        batch_size, max_new_tokens, demonstrations, held_out_demonstrations, system_prompt,
        show_progress: passed to :func:`generate_answers`.
        compute_ig: also measure each task's mean information gain (:func:`information_gains`).
        alpha: the decay of Info (equation 2 of the paper).
        ig_batch_size: instances per IG forward pass (default ``batch_size``).
        mask_token: text replacing the key parts in the masked twin.
        ig_collator: the collator of the IG pass (see :func:`information_gains`).

    Returns:
        An :class:`EvalResult`. A task with no instances is skipped with a warning.
    """
    start = time.perf_counter()
    held_out = set(held_out)
    names = []
    for name, instances in instances_by_task.items():
        if name not in tasks:
            raise KeyError(f"task {name!r} has instances but no Task record")
        if not instances:
            logger.warning("task %r has no instances to evaluate; skipped", name)
            continue
        names.append(name)
    flat = [i for name in names for i in instances_by_task[name]]
    answers = generate_answers(
        model,
        tokenizer,
        flat,
        tasks,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        demonstrations=demonstrations,
        held_out=held_out,
        held_out_demonstrations=held_out_demonstrations,
        system_prompt=system_prompt,
        show_progress=show_progress,
    )
    generated = time.perf_counter()

    scores, predictions, offset = {}, {}, 0
    judge_error = None
    for name in names:
        instances = list(instances_by_task[name])
        task_answers = answers[offset : offset + len(instances)]
        offset += len(instances)
        instructions = {i.instruction for i in instances}
        arguments = dict(
            task_name=name,
            predictions=task_answers,
            references_list=[i.outputs for i in instances],
            constraints=tasks[name].constraints,
            inputs=[i.input for i in instances],
            instruction=instructions.pop() if len(instructions) == 1 else tasks[name].definition,
        )
        try:
            scores[name] = score_task(**arguments, judge=None if judge_error else judge)
        except JudgeError as err:
            # The client already retried with backoff: fall back to ROUGE-L for this task and
            # every later one (a dead endpoint would otherwise time out once per task).
            judge_error = str(err)
            logger.warning("LLM judge failed on task %r, GPT tasks fall back to ROUGE-L: %s", name, err)
            scores[name] = score_task(**arguments, judge=None)
        if judge_error and scores[name].fallback:
            scores[name].notes.append(f"LLM judge failed ({judge_error}): scored with ROUGE-L")
        predictions[name] = [
            {"id": i.id, "prediction": a, "references": list(i.outputs)} for i, a in zip(instances, task_answers)
        ]
    scored = time.perf_counter()

    ig: dict[str, float | None] = {}
    if compute_ig:
        gains = information_gains(
            model,
            tokenizer,
            flat,
            alpha=alpha,
            batch_size=ig_batch_size or batch_size,
            mask_token=mask_token,
            system_prompt=system_prompt,
            collator=ig_collator,
            show_progress=show_progress,
        )
        offset = 0
        for name in names:
            count = len(instances_by_task[name])
            values = [g for g in gains[offset : offset + count] if g is not None]
            offset += count
            ig[name] = _mean(values)
    done = time.perf_counter()
    return EvalResult(
        scores=scores,
        predictions=predictions,
        seen=[n for n in names if n not in held_out],
        held_out=[n for n in names if n in held_out],
        ig=ig,
        timings={
            "generation": generated - start,
            "scoring": scored - generated,
            "ig": done - scored,
            "total": done - start,
        },
        settings={
            "batch_size": batch_size,
            "max_new_tokens": max_new_tokens,
            "demonstrations": demonstrations,
            "held_out_demonstrations": held_out_demonstrations,
            "system_prompt": system_prompt,
            "compute_ig": compute_ig,
            "alpha": alpha,
            "mask_token": mask_token,
            "judge": None if judge is None or not getattr(judge, "available", False) else judge.model,
            "judge_error": judge_error,
            "instances": len(flat),
        },
    )


def evaluate_stream_stage(model, tokenizer, stream, stage_index: int | None, **kwargs: Any) -> EvalResult:
    """One row of the continual-learning matrix: every seen and held-out task of ``stream``.

    Evaluates the test instances of all seen tasks (those trained up to ``stage_index`` and
    those still to come: the matrix needs both for forward transfer) and of all held-out tasks
    (with demonstrations). ``stage_index`` is the 0-based stage just trained, or None for the
    model before training. Keyword arguments go to :func:`evaluate_tasks`; the result's
    ``settings`` also record ``stage`` and ``trained`` (tasks trained so far).
    """
    if stage_index is not None and not 0 <= stage_index < len(stream.stages):
        raise IndexError(f"stage_index {stage_index} outside 0..{len(stream.stages) - 1}")
    order = list(stream.seen) + list(stream.held_out)
    result = evaluate_tasks(
        model,
        tokenizer,
        stream.tasks,
        {name: stream.test[name] for name in order},
        held_out=stream.held_out,
        **kwargs,
    )
    trained = [] if stage_index is None else stream.seen_before(stage_index + 1)
    result.settings.update(stage=stage_index, trained=trained)
    return result
