"""Half-listening probes (section 4.4 of the KPIG paper).

(a) **Instruction variants** (the paper's Table 3): score a task under instructions it was
    never trained on, and report the information gain of their key parts beside P/V-score.
(b) **Misleading constraints** (the paper's Table 4): change one constraint of a seen task's
    instruction (e.g. ``Answer with "User" or "Agent"`` -> ``"user" or "agent"``) and count
    the answers that follow the new constraint, the old one, or neither.

A probe is plain JSON, one file per task (``benchmark/superni_kpig/probes/<task>.json`` for
the shipped ones, or any path)::

    {
      "task": "task1599_smcalflow_classification",
      "source": "where the instructions come from",
      "instruction_variants": [{"name": "Ins_1", "instruction": "...", "key_parts": ["..."]}],
      "misleading_constraints": [{
        "name": "lowercase_labels",
        "replace": {"\\"User\\" or \\"Agent\\"": "\\"user\\" or \\"agent\\""},
        "old_labels": ["User", "Agent"],
        "new_labels": ["user", "agent"]
      }]
    }

Each key part must occur in its instruction, and each ``replace`` key in the task's
instruction (checked when the probe runs). Both lists are optional.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kpig_trainer.data.records import DataError, Instance, Task
from kpig_trainer.evaluation.evaluate import _mean, information_gains, task_v_score
from kpig_trainer.evaluation.generation import generate_answers
from kpig_trainer.evaluation.scores import score_task

__all__ = [
    "PROBE_DIR",
    "instruction_variant_probe",
    "load_probe",
    "misleading_constraint_probe",
    "probe_label",
    "run_probe",
]

PROBE_DIR = Path(__file__).resolve().parent.parent / "benchmark" / "superni_kpig" / "probes"
"""Where the shipped probes live, one ``<task>.json`` each."""


def load_probe(task_or_path: str | Path) -> dict[str, Any]:
    """Load a probe by task name (from :data:`PROBE_DIR`) or from a JSON file path.

    Checks that every variant's key parts occur in its instruction and that misleading
    constraints name ``replace``, ``old_labels`` and ``new_labels``.

    Raises:
        FileNotFoundError: no probe for that task; DataError: a malformed probe.
    """
    path = Path(task_or_path)
    if not path.suffix == ".json" or not path.exists():
        path = PROBE_DIR / f"{task_or_path}.json"
    if not path.exists():
        raise FileNotFoundError(f"no probe {task_or_path!r} (looked for {path})")
    probe = json.loads(path.read_text(encoding="utf-8"))
    probe.setdefault("task", path.stem)
    for k, variant in enumerate(probe.setdefault("instruction_variants", [])):
        variant.setdefault("name", f"Ins_{k + 1}")
        missing = [p for p in variant.get("key_parts", []) if p not in variant["instruction"]]
        if missing:
            raise DataError(f"{path}: variant {variant['name']!r}: key parts not in its instruction: {missing}")
    for k, spec in enumerate(probe.setdefault("misleading_constraints", [])):
        spec.setdefault("name", f"misleading_{k + 1}")
        lacking = [key for key in ("replace", "old_labels", "new_labels") if not spec.get(key)]
        if lacking:
            raise DataError(f"{path}: misleading constraint {spec['name']!r} lacks {lacking}")
    return probe


def _score_row(task: Task, instances: Sequence[Instance], answers: Sequence[str], judge) -> dict[str, Any]:
    score = score_task(
        task.name,
        answers,
        [i.outputs for i in instances],
        task.constraints,
        inputs=[i.input for i in instances],
        judge=judge,
        instruction=instances[0].instruction,
    )
    return {
        "p_score": score.performance,
        "v_score": task_v_score(score),
        "wfr": score.wfr,
        "oos": score.oos,
        "wr": score.wr,
        "n": score.n,
    }


def _ig(model, tokenizer, instances, compute_ig: bool, alpha: float, batch_size: int, system_prompt) -> float | None:
    if not compute_ig:
        return None
    gains = information_gains(
        model,
        tokenizer,
        instances,
        alpha=alpha,
        batch_size=batch_size,
        system_prompt=system_prompt,
    )
    return _mean([g for g in gains if g is not None])


def instruction_variant_probe(
    model,
    tokenizer,
    task: Task,
    instances: Sequence[Instance],
    variants: Sequence[Mapping[str, Any]],
    *,
    include_original: bool = True,
    compute_ig: bool = True,
    alpha: float = 0.3,
    judge=None,
    batch_size: int = 8,
    max_new_tokens: int | None = None,
    demonstrations: int = 0,
    system_prompt: str | None = None,
    show_progress: bool = False,
) -> list[dict[str, Any]]:
    """Score ``task`` under each instruction variant (the paper's Table 3).

    Every instance is answered once per variant, with the variant's instruction in place of
    its own (and the variant's key parts for IG). ``include_original`` adds a first row,
    ``"original"``, with the instances' own instructions, as a baseline.

    Returns:
        One row per variant: ``{"variant", "instruction", "p_score", "v_score", "wfr",
        "oos", "wr", "n", "ig"}`` (scores 0-100; ``ig`` None without ``compute_ig``).
    """
    if not instances:
        raise ValueError(f"task {task.name!r}: no instances to probe")
    rows = [{"name": "original", "instruction": None, "key_parts": None}] if include_original else []
    rows += list(variants)
    results = []
    for variant in rows:
        instruction, key_parts = variant.get("instruction"), variant.get("key_parts")
        swapped = [
            dataclasses.replace(
                i,
                instruction=instruction or i.instruction,
                key_parts=list(key_parts) if key_parts is not None else list(i.key_parts),
            )
            for i in instances
        ]
        answers = generate_answers(
            model,
            tokenizer,
            swapped,
            {task.name: task},
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
            demonstrations=demonstrations,
            system_prompt=system_prompt,
            show_progress=show_progress,
        )
        row = {"variant": variant.get("name", f"Ins_{len(results) + 1}"), "instruction": swapped[0].instruction}
        row.update(_score_row(task, swapped, answers, judge))
        row["ig"] = _ig(model, tokenizer, swapped, compute_ig, alpha, batch_size, system_prompt)
        results.append(row)
    return results


_QUOTES = {'"': '"', "'": "'", "\u201c": "\u201d", "\u2018": "\u2019", "`": "`"}


def probe_label(response: str) -> str:
    """The response as compared by the misleading-constraint probe: surrounding whitespace,
    trailing periods and one pair of enclosing quotes removed; case is KEPT (unlike
    :func:`normalize_answer`, which casefolds)."""
    text = response.strip()
    text = re.sub(r"\.+$", "", text).strip()
    if len(text) >= 2 and _QUOTES.get(text[0]) == text[-1]:
        text = text[1:-1].strip()
        text = re.sub(r"\.+$", "", text).strip()
    return text


def _apply(text: str, replace: Mapping[str, str]) -> str:
    for old, new in replace.items():
        text = text.replace(old, new)
    return text


def misleading_constraint_probe(
    model,
    tokenizer,
    task: Task,
    instances: Sequence[Instance],
    replace: Mapping[str, str],
    old_labels: Sequence[str],
    new_labels: Sequence[str],
    *,
    compute_ig: bool = True,
    alpha: float = 0.3,
    batch_size: int = 8,
    max_new_tokens: int | None = None,
    demonstrations: int = 0,
    system_prompt: str | None = None,
    show_progress: bool = False,
    keep_predictions: bool = True,
) -> dict[str, Any]:
    """Count answers that follow a modified constraint (the paper's Table 4).

    Each instance's instruction (and key parts) is rewritten with ``replace`` (every key must
    occur in the instruction: a probe that changes nothing raises ``ValueError``), answered
    greedily, and each answer compared case-SENSITIVELY (after :func:`probe_label`) with the
    labels: equal to a new label, to an old label, or "other". A label that is both old and
    new counts as new.

    Returns:
        ``{"n", "instruction", "counts": {label: count, ..., "other": count},
        "rates": {same keys: percent}, "follows_new", "follows_old", "other" (percents),
        "correct": percent of answers equal to the new-label spelling of their reference,
        "ig": mean IG under the modified instruction (None without ``compute_ig``),
        "predictions": [...] (with ``keep_predictions``)}``.
    """
    if not instances:
        raise ValueError(f"task {task.name!r}: no instances to probe")
    if not replace:
        raise ValueError("replace is empty: the probe would not change the instruction")
    modified = []
    for instance in instances:
        absent = [old for old in replace if old not in instance.instruction]
        if absent:
            raise ValueError(f"task {task.name!r}: instance {instance.id!r}: {absent} not in its instruction")
        modified.append(
            dataclasses.replace(
                instance,
                instruction=_apply(instance.instruction, replace),
                key_parts=[_apply(part, replace) for part in instance.key_parts],
            )
        )
    answers = generate_answers(
        model,
        tokenizer,
        modified,
        {task.name: task},
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        demonstrations=demonstrations,
        system_prompt=system_prompt,
        show_progress=show_progress,
    )
    new_labels, old_labels = list(new_labels), [label for label in old_labels if label not in new_labels]
    counts = {label: 0 for label in [*new_labels, *old_labels]}
    counts["other"] = 0
    by_fold = {label.casefold(): label for label in new_labels}
    correct = 0
    for instance, answer in zip(modified, answers):
        label = probe_label(answer)
        counts[label if label in counts and label != "other" else "other"] += 1
        expected = {by_fold.get(ref.strip().casefold()) for ref in instance.outputs}
        correct += label in expected
    n = len(answers)
    percent = lambda count: 100 * count / n  # noqa: E731
    result = {
        "n": n,
        "instruction": modified[0].instruction,
        "replace": dict(replace),
        "old_labels": old_labels,
        "new_labels": new_labels,
        "counts": counts,
        "rates": {label: percent(count) for label, count in counts.items()},
        "follows_new": percent(sum(counts[label] for label in new_labels)),
        "follows_old": percent(sum(counts[label] for label in old_labels)),
        "other": percent(counts["other"]),
        "correct": percent(correct),
        "ig": _ig(model, tokenizer, modified, compute_ig, alpha, batch_size, system_prompt),
    }
    if keep_predictions:
        result["predictions"] = [{"id": i.id, "prediction": a} for i, a in zip(modified, answers)]
    return result


def run_probe(
    model,
    tokenizer,
    task: Task,
    instances: Sequence[Instance],
    probe: Mapping[str, Any] | str | Path | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """Run every part of a probe (default: the shipped one for ``task``).

    Keyword arguments go to both probe functions. Returns ``{"task", "source",
    "instruction_variants": [rows], "misleading_constraints": [{"name", ...result}]}``.
    """
    if probe is None or isinstance(probe, (str, Path)):
        probe = load_probe(probe if probe is not None else task.name)
    variants = probe.get("instruction_variants", [])
    result = {
        "task": task.name,
        "source": probe.get("source"),
        "instruction_variants": (
            instruction_variant_probe(model, tokenizer, task, instances, variants, **kwargs) if variants else []
        ),
        "misleading_constraints": [],
    }
    options = {k: v for k, v in kwargs.items() if k not in ("include_original", "judge")}
    for spec in probe.get("misleading_constraints", []):
        outcome = misleading_constraint_probe(
            model,
            tokenizer,
            task,
            instances,
            spec["replace"],
            spec["old_labels"],
            spec["new_labels"],
            **options,
        )
        result["misleading_constraints"].append({"name": spec["name"], **outcome})
    return result
