"""Finished continual runs compared instance by instance.

A run directory keeps every answer (``predictions/<row>.json``); this module scores them again one
by one, so that two runs can be compared on the same test instances:

* :func:`instance_scores`: per task and instance id, the metric value (0-1) and the three
  violation flags, recomputed with the task's annotated metric and constraints;
* :func:`paired_bootstrap`: the difference of P-score (or V-score) between two runs with a
  percentile interval, resampling test instances within each task, paired across the runs;
* :func:`flips`: how many test instances go from right to wrong, and from wrong to right,
  between consecutive evaluation rows (per-example forgetting).

GPT-metric tasks are scored with ROUGE-L here (no judge): the same fallback the run reports.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kpig_trainer.evaluation.constraints import violations
from kpig_trainer.evaluation.metrics import score_example
from kpig_trainer.evaluation.scores import VIOLATION_TYPES

__all__ = [
    "InstanceScore",
    "RunRecord",
    "flips",
    "load_run",
    "instance_scores",
    "p_score_of",
    "paired_bootstrap",
    "v_score_of",
]


@dataclass(frozen=True)
class InstanceScore:
    """One answer: its metric value (0-1) and its violation flags (True: violated, None: n/a)."""

    value: float
    flags: Mapping[str, bool | None]


@dataclass
class RunRecord:
    """A run directory read back: its resolved configuration, state and stream."""

    root: Path
    config: dict[str, Any]
    state: dict[str, Any]
    stream: Any

    @property
    def rows(self) -> list[str]:
        """Evaluation rows with predictions on disk, in stage order (``init`` first)."""
        keys = ["init", *(f"stage_{k:02d}" for k in range(1, len(self.stream.stages) + 1))]
        return [k for k in keys if (self.root / "predictions" / f"{k}.json").exists()]


def load_run(root: str | Path) -> RunRecord:
    """Read a run directory (``config.json``, ``state.json``) and rebuild its stream."""
    from kpig_trainer.continual.arguments import ContinualArguments, load_stream

    root = Path(root)
    try:
        config = json.loads((root / "config.json").read_text(encoding="utf-8"))
        state = json.loads((root / "state.json").read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{root}: not a run directory ({Path(err.filename).name} missing)") from None
    args = ContinualArguments(**config["continual"])
    return RunRecord(root, config, state, load_stream(args, config["training"]["seed"]))


def instance_scores(run: RunRecord, row: str) -> dict[str, dict[str, InstanceScore]]:
    """``{task: {instance id: InstanceScore}}`` of the evaluation row ``row`` (``"init"``,
    ``"stage_01"``, ...)."""
    path = run.root / "predictions" / f"{row}.json"
    try:
        predictions = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no predictions for row {row!r}") from None
    result: dict[str, dict[str, InstanceScore]] = {}
    for task_name, answers in predictions.items():
        task = run.stream.tasks[task_name]
        inputs = {i.id: i.input for i in run.stream.test.get(task_name, [])}
        scores = {}
        for answer in answers:
            text = answer["prediction"]
            value = score_example(
                text, answer["references"], task.constraints, input_text=inputs.get(answer["id"])
            ).value
            scores[answer["id"]] = InstanceScore(value, violations(text, task.constraints, inputs.get(answer["id"])))
        result[task_name] = scores
    return result


def p_score_of(
    scores: Mapping[str, Mapping[str, InstanceScore]],
    tasks: Sequence[str],
    ids: Mapping[str, Sequence[str]] | None = None,
) -> float:
    """P-score (0-100) of ``tasks``: the mean over tasks of the mean instance value (over
    ``ids[task]`` when given: a bootstrap sample, duplicates counting twice)."""
    means = []
    for task in tasks:
        chosen = ids[task] if ids is not None else list(scores[task])
        means.append(sum(scores[task][i].value for i in chosen) / len(chosen))
    return 100 * sum(means) / len(means) if means else math.nan


def v_score_of(
    scores: Mapping[str, Mapping[str, InstanceScore]],
    tasks: Sequence[str],
    ids: Mapping[str, Sequence[str]] | None = None,
) -> float:
    """V-score (0-100), pooled as :func:`~kpig_trainer.evaluation.scores.v_score` pools it: the mean
    of every applicable (task, violation type) rate."""
    rates = []
    for task in tasks:
        chosen = ids[task] if ids is not None else list(scores[task])
        for kind in VIOLATION_TYPES:
            flags = [scores[task][i].flags[kind] for i in chosen if scores[task][i].flags[kind] is not None]
            if flags:
                rates.append(100 * sum(flags) / len(flags))
    return sum(rates) / len(rates) if rates else math.nan


_STATISTICS = {"p_score": p_score_of, "v_score": v_score_of}


def paired_bootstrap(
    pairs: Sequence[tuple[Mapping, Mapping]],
    tasks: Sequence[str],
    statistic: str = "p_score",
    replicates: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, Any]:
    """Difference ``A - B`` of a score between runs, with a paired percentile bootstrap interval.

    ``pairs`` holds one ``(scores_A, scores_B)`` per seed (instance scores of the two runs on
    the same test instances); the difference is the mean over pairs. Each replicate draws every
    task's test instances with replacement, the same draw for A and B (paired), independently
    per pair. Instances present in only one run are an error: the runs were not comparable.
    """
    if statistic not in _STATISTICS:
        raise ValueError(f"statistic must be one of {sorted(_STATISTICS)}, got {statistic!r}")
    score = _STATISTICS[statistic]
    ids_per_pair = []
    for a, b in pairs:
        ids = {}
        for task in tasks:
            if set(a[task]) != set(b[task]):
                raise ValueError(f"task {task!r}: the two runs answered different test instances")
            ids[task] = sorted(a[task])
        ids_per_pair.append(ids)

    def difference(draws: Sequence[Mapping[str, Sequence[str]] | None]) -> float:
        values = [score(a, tasks, d) - score(b, tasks, d) for (a, b), d in zip(pairs, draws)]
        values = [v for v in values if not math.isnan(v)]
        return sum(values) / len(values) if values else math.nan

    observed = difference([None] * len(pairs))
    rng = random.Random(seed)
    samples = []
    for _ in range(replicates):
        draws = [{t: rng.choices(ids[t], k=len(ids[t])) for t in tasks} for ids in ids_per_pair]
        samples.append(difference(draws))
    samples = sorted(s for s in samples if not math.isnan(s))
    if not samples:
        return {"difference": observed, "low": None, "high": None, "replicates": 0, "pairs": len(pairs)}
    tail = (1 - level) / 2
    low = samples[min(len(samples) - 1, int(math.floor(tail * len(samples))))]
    high = samples[min(len(samples) - 1, int(math.ceil((1 - tail) * len(samples))) - 1)]
    return {
        "difference": observed,
        "low": low,
        "high": high,
        "replicates": len(samples),
        "pairs": len(pairs),
        "instances": sum(len(v) for v in ids_per_pair[0].values()) if ids_per_pair else 0,
    }


def _trained_by(run: RunRecord, row: str) -> list[str]:
    """Seen tasks trained up to and including the stage of ``row`` (none for ``init``)."""
    return [] if row == "init" else list(run.stream.seen_before(int(row.split("_")[1])))


def flips(run: RunRecord, tasks: Sequence[str] | None = None, threshold: float = 0.5) -> list[dict[str, Any]]:
    """Right/wrong changes of each test instance between consecutive evaluation rows.

    An answer is right when its metric value is at least ``threshold`` (exact for 0/1 metrics
    such as ACC; a cut for ROUGE/BLEU/F1). By default each pair of rows compares the tasks
    already trained at the earlier row (forgetting and its reverse, not learning a new task);
    ``tasks`` fixes the list instead. Returns one ``{"from", "to", "right_to_wrong",
    "wrong_to_right", "compared"}`` per consecutive pair.
    """
    rows = run.rows
    previous = instance_scores(run, rows[0]) if rows else {}
    result = []
    for before, after in zip(rows, rows[1:]):
        current = instance_scores(run, after)
        lost = gained = compared = 0
        for task in _trained_by(run, before) if tasks is None else tasks:
            for iid, score in current.get(task, {}).items():
                old = previous.get(task, {}).get(iid)
                if old is None:
                    continue
                compared += 1
                was, now = old.value >= threshold, score.value >= threshold
                lost += was and not now
                gained += now and not was
        result.append(
            {"from": before, "to": after, "right_to_wrong": lost, "wrong_to_right": gained, "compared": compared}
        )
        previous = current
    return result
