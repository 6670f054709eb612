"""Instruction-violation checks: wrong format (WFR), out of scope (OOS) and wordy (WR).

Each check returns ``True`` when a response VIOLATES its task's annotated constraint,
``False`` when it complies, and ``None`` when the constraint does not apply to the task
(or cannot be checked, e.g. an "In context" task scored without its input text).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

from kpig_trainer.answers import normalize_answer, parse_bracketed_list, parse_items
from kpig_trainer.data.records import Constraints

__all__ = [
    "as_constraints",
    "is_out_of_scope",
    "is_wordy",
    "is_wrong_format",
    "violations",
]

_FIELDS = ("metric", "scope", "format", "labels", "labels_from_input", "format_spec", "max_words")


def as_constraints(obj: Any) -> Constraints:
    """Adapt a plain mapping or any object with the annotation attributes (``metric``,
    ``scope``, ``format``, ``labels``, ...) to :class:`kpig_trainer.data.Constraints`.

    Missing fields take their defaults. Raises ``DataError`` (a ``ValueError``) on an unknown
    metric or format_spec."""
    if isinstance(obj, Constraints):
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
    constraints = Constraints(
        metric=values["metric"],
        scope=values["scope"] or "-",
        format=values["format"] or "-",
        labels=tuple(values["labels"] or ()),
        labels_from_input=bool(values["labels_from_input"]),
        format_spec=dict(spec) if spec is not None else None,
        max_words=values["max_words"],
    )
    constraints.validate()
    return constraints


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
    - ``number``: an integer or decimal with an optional sign (``-3``, ``+2.5``, ``.5``,
      ``3.``); no thousands separators or exponents.
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
    """The answers a response gives: its items for list / split formats (brackets and
    empty items are format matters, left to WFR), else the response itself."""
    kind = spec.get("type") if spec else None
    if kind not in ("split", "list", "2d_list"):
        return [response]
    items = parse_items(response, spec.get("delimiter") if kind == "split" else None)
    return [str(x) for item in items for x in (item if isinstance(item, list) else [item])]


@lru_cache(maxsize=64)
def _haystack(text: str) -> str:
    # Cached: labels_from_input checks every label against the same input.
    return re.sub(r"\s+", " ", text.casefold())


def _occurs_in(span: str, text: str) -> bool:
    """Whether normalised ``span`` occurs in ``text`` on token boundaries ("he" is not
    found inside "the"), ignoring case and whitespace differences."""
    span = normalize_answer(span)
    return bool(span) and re.search(rf"(?<!\w){re.escape(span)}(?!\w)", _haystack(text)) is not None


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
    - Items come from ``parse_items``, so "[a, b]" for a split format is judged on "a"
      and "b": brackets and empty items count under WFR, not here. An empty response is
      out of scope.
    - Not applicable (None): other scopes ("Noun", none), an "In choice" task without
      labels, and input-based checks without ``input_text``.
    """
    task = as_constraints(constraints)
    scope = (task.scope or "").casefold()
    allowed: set[str] | None = None  # normalised choices of an "In choice" task
    from_input = "in context" in scope and input_text is not None
    if "in choice" in scope:
        allowed = set(task.label_set)
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
    if not spans or not response.strip():
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
