"""Instruction-violation checks: wrong format (WFR), out of scope (OOS) and wordy (WR).

Each check returns ``True`` when a response VIOLATES its task's annotated constraint,
``False`` when it complies, and ``None`` when the constraint does not apply to the task
(or cannot be checked, e.g. an "In context" task scored without its input text).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .metrics import parse_bracketed_list, normalize_answer

__all__ = [
    "FORMAT_TYPES",
    "METRICS",
    "TaskConstraints",
    "as_constraints",
    "is_out_of_scope",
    "is_wordy",
    "is_wrong_format",
    "violations",
]

METRICS = ("ACC", "F1", "ROUGE", "BLEU", "Match", "GPT")
FORMAT_TYPES = (
    "list", "2d_list", "split", "number", "json", "uppercase_letter",
    "max_words", "one_answer", "contains", "pattern",
)  # fmt: skip

_REQUIRED_KEYS = {"max_words": ("n",), "contains": ("text",), "pattern": ("regex",)}


@dataclass(frozen=True)
class TaskConstraints:
    """A task's hand-annotated evaluation constraints (paper tables 7-10).

    Attributes:
        metric: "ACC", "F1", "ROUGE", "BLEU", "Match" or "GPT".
        scope: "In choice", "In context", "Noun" or None (the paper's "-").
        format: the paper's raw format string ("-", "List", "Split by ,", ...), for reports.
        labels: allowed answers of an "In choice" task, as the instruction spells them.
        labels_from_input: the allowed answers (also) appear in each instance's input.
        format_spec: machine-checkable format, e.g. ``{"type": "split", "delimiter": ","}``;
            None when the task constrains no format.
        max_words: a response with more whitespace-split words is wordy; None = no limit.
    """

    metric: str
    scope: str | None = None
    format: str | None = None
    labels: tuple[str, ...] = ()
    labels_from_input: bool = False
    format_spec: Mapping[str, Any] | None = None
    max_words: int | None = None
    _label_set: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ValueError(f"unknown metric {self.metric!r}; expected one of {METRICS}")
        spec = self.format_spec
        if spec is not None:
            if spec.get("type") not in FORMAT_TYPES:
                raise ValueError(
                    f"unknown format_spec type {spec.get('type')!r}; expected one of {FORMAT_TYPES}"
                )
            missing = [key for key in _REQUIRED_KEYS.get(spec["type"], ()) if key not in spec]
            if missing:
                raise ValueError(f"format_spec {dict(spec)!r} lacks {missing}")
        object.__setattr__(self, "_label_set", frozenset(map(normalize_answer, self.labels)))


_FIELDS = ("metric", "scope", "format", "labels", "labels_from_input", "format_spec", "max_words")


def as_constraints(obj: Any) -> TaskConstraints:
    """Adapt a plain mapping, a ``TaskConstraints`` or any object with the annotation
    attributes (``metric``, ``scope``, ``format``, ``labels``, ...) to ``TaskConstraints``.
    Missing fields take their defaults; the scope "-" becomes None."""
    if isinstance(obj, TaskConstraints):
        return obj
    if isinstance(obj, Mapping):
        values = {name: obj.get(name) for name in _FIELDS}
    else:
        values = {name: getattr(obj, name, None) for name in _FIELDS}
    if values["metric"] is None:
        raise ValueError(f"constraints {obj!r} have no 'metric'")
    spec = values["format_spec"]
    if spec is not None and not isinstance(spec, Mapping):
        spec = vars(spec)  # an attribute object such as a dataclass instance
    return TaskConstraints(
        metric=values["metric"],
        scope=None if values["scope"] in (None, "", "-") else values["scope"],
        format=values["format"],
        labels=tuple(values["labels"] or ()),
        labels_from_input=bool(values["labels_from_input"]),
        format_spec=dict(spec) if spec is not None else None,
        max_words=values["max_words"],
    )


# ---------------------------------------------------------------------------------------
# WFR: one parser per format_spec type; each returns True when the text HAS the format.

_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)")
# Signs of several alternatives in a one-answer response: a comma and whitespace before a
# non-digit ("cat, dog"; chemical names such as "1, 3-diphenyl-2-propen-1-one" keep their
# locant commas), ";", a line break, "/", the word "or". Not "and": "PersonX and PersonY"
# is one filler, "bicyclic pyrazinone and pyrimidinone amides" one chemical name.
_ALTERNATIVES = re.compile(r",\s+(?=\D)|;|\n|/|\bor\b", re.IGNORECASE)


def _parse_list(text: str) -> list | None:
    try:
        return parse_bracketed_list(text)
    except ValueError:
        return None


def _is_list(text: str, spec: Mapping) -> bool:
    items = _parse_list(text)
    return items is not None and not any(isinstance(item, list) for item in items)


def _is_2d_list(text: str, spec: Mapping) -> bool:
    rows = _parse_list(text)
    return rows is not None and all(
        isinstance(row, list) and not any(isinstance(x, list) for x in row) for row in rows
    )


def _is_split(text: str, spec: Mapping) -> bool:
    if not text or "[" in text or "]" in text:
        return False
    return all(item.strip() for item in text.split(spec.get("delimiter", ",")))


def _is_json(text: str, spec: Mapping) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def _is_one_answer(text: str, spec: Mapping) -> bool:
    if not text or (text.startswith("[") and text.endswith("]")):
        return False
    return _ALTERNATIVES.search(text) is None


_FORMAT_CHECKS = {
    "list": _is_list,
    "2d_list": _is_2d_list,
    "split": _is_split,
    "number": lambda text, spec: _NUMBER.fullmatch(text) is not None,
    "json": _is_json,
    "uppercase_letter": lambda text, spec: re.fullmatch(r"[A-Z]", text) is not None,
    "max_words": lambda text, spec: len(text.split()) <= spec["n"],
    "one_answer": _is_one_answer,
    "contains": lambda text, spec: spec["text"] in text,
    # The whole response must match, as in the annotation checker (build_annotations.py).
    "pattern": lambda text, spec: re.fullmatch(spec["regex"], text, re.DOTALL) is not None,
}


def is_wrong_format(response: str, constraints: Any) -> bool | None:
    """WFR: True when ``response`` breaks the task's ``format_spec``; None without one.

    The response is stripped of surrounding whitespace, then, by ``format_spec["type"]``:

    - ``list``: a one-dimensional bracketed list (``[1, 2]``, ``['a', 'b']``, ``[]``);
      ``[[1, 2]]`` and a bare ``1, 2`` are wrong.
    - ``2d_list``: a bracketed list whose items are all one-dimensional lists
      (``[[1], [2, 3]]``; ``[]`` counts as an empty 2D list).
    - ``split``: non-empty items separated by ``delimiter``, no brackets (one item is fine).
    - ``number``: an integer or decimal with an optional sign (``-3``, ``2.5``, ``.5``).
    - ``json``: ``json.loads`` accepts it.
    - ``uppercase_letter``: exactly one letter A-Z and nothing else.
    - ``max_words``: at most ``n`` whitespace-separated words.
    - ``one_answer``: non-empty, not a bracketed list, and no sign of alternatives: a comma
      and whitespace followed by a non-digit (``"cat, dog"``, but not the locants of
      ``"1, 3-diphenyl..."``), ``;``, a line break, ``/`` or the word "or". The word "and"
      is allowed ("PersonX and PersonY" fills one blank).
    - ``contains``: ``text`` occurs in the response (case-sensitive).
    - ``pattern``: the whole response matches ``regex`` (``re.fullmatch``, DOTALL).
    """
    spec = as_constraints(constraints).format_spec
    if spec is None:
        return None
    return not _FORMAT_CHECKS[spec["type"]](response.strip(), spec)


# ---------------------------------------------------------------------------------------
# OOS and WR.


def _spans(response: str, spec: Mapping | None) -> list[str]:
    """The answers a response gives: its items for list / split formats, else itself."""
    kind = spec.get("type") if spec else None
    if kind == "split":
        return [item.strip() for item in response.split(spec.get("delimiter", ","))]
    if kind in ("list", "2d_list"):
        items = _parse_list(response.strip())
        if items is not None:
            flat = [x for item in items for x in (item if isinstance(item, list) else [item])]
            return [str(x) for x in flat]
    return [response]


def _occurs_in(span: str, text: str) -> bool:
    # Whole-token occurrence, so "he" is not found inside "the".
    span = normalize_answer(span)
    haystack = re.sub(r"\s+", " ", text.casefold())
    return bool(span) and re.search(rf"(?<!\w){re.escape(span)}(?!\w)", haystack) is not None


def is_out_of_scope(response: str, constraints: Any, input_text: str | None = None) -> bool | None:
    """OOS: True when the response answers outside the allowed scope.

    - "In choice": every answer (the response itself, or each item when the format is a
      list or split) must equal an allowed label after ``normalize_answer`` on both sides,
      so "agent", "Agent." and '"Agent"' are in scope for the label "Agent". A label plus
      extra words ("Agent, because it replies") is OUT of scope: the paper counts answers
      outside the allowed label set as OOS, and accepting any response that *contains* a
      label would also accept "not User but Agent".
      With ``labels_from_input`` each instance offers its own choices: the labels that
      occur in ``input_text`` (all labels when none occurs), or, for a task without
      labels, any span of the input.
    - "In context": every extracted span (items when the format is split / list) must
      occur in ``input_text``, case-insensitively and on token boundaries.
    - Empty responses and empty items are out of scope. Other scopes ("Noun", none), an
      "In choice" task without labels, and input-based checks without ``input_text``: None.
    """
    task = as_constraints(constraints)
    scope = (task.scope or "").casefold()
    allowed: set[str] | None = None  # normalised choices of an "In choice" task
    from_input = "in context" in scope and input_text is not None
    if "in choice" in scope:
        allowed = set(task._label_set)
        if task.labels_from_input and input_text is not None:
            offered = {label for label in allowed if _occurs_in(label, input_text)}
            if offered:
                allowed = offered
            elif not allowed:
                from_input = True  # the choices are spans of the input itself
        allowed = allowed or None
    if allowed is None and not from_input:
        return None
    spans = _spans(response, task.format_spec)
    if not response.strip() or not all(span.strip() for span in spans):
        return True
    return any(
        (allowed is not None and normalize_answer(span) not in allowed)
        or (from_input and not _occurs_in(span, input_text))
        for span in spans
    )


def is_wordy(response: str, constraints: Any) -> bool | None:
    """WR: True when the response has more whitespace-split words than ``max_words``;
    None when the task sets no threshold."""
    limit = as_constraints(constraints).max_words
    if limit is None:
        return None
    return len(response.split()) > limit


def violations(response: str, constraints: Any, input_text: str | None = None) -> dict:
    """All three checks: ``{"wfr": ..., "oos": ..., "wr": ...}``, each True (violated),
    False (complies) or None (not applicable)."""
    task = as_constraints(constraints)
    return {
        "wfr": is_wrong_format(response, task),
        "oos": is_out_of_scope(response, task, input_text),
        "wr": is_wordy(response, task),
    }
