"""Key-part extraction: parse the LLM's list, keep only spans that occur in the instruction.

The model is asked for a JSON list, but real answers come wrapped in code fences, after a
sentence of prose, with single quotes or as a bulleted list; :func:`parse_key_part_list` takes
all of those. :func:`validate_key_parts` then locates each candidate with the tolerant matcher
of :mod:`kpig_trainer.data.masking` (case, whitespace and quote differences forgiven) and keeps
the instruction's *own* text for it, so the stored key parts are exact substrings.
"""

from __future__ import annotations

import ast
import json
import logging
import re
from dataclasses import dataclass, field
from typing import Any, Sequence

from kpig_trainer.data.masking import find_key_part_spans

logger = logging.getLogger(__name__)

__all__ = ["KeyPartParseError", "ValidatedKeyParts", "parse_key_part_list", "validate_key_parts"]

_FENCE = re.compile(r"```[a-zA-Z0-9_-]*\s*\n?(.*?)```", re.S)
_BULLET = re.compile(r"^\s*(?:[-*\u2022]|\d+[.)])\s+(.+?)\s*$", re.M)
_QUOTE_CHARS = "\"'`\u2018\u2019\u201c\u201d\u00ab\u00bb"
_QUOTED = re.compile(r'"((?:[^"\\]|\\.)+)"|\u201c([^\u201d]+)\u201d')


class KeyPartParseError(ValueError):
    """The answer holds no list of strings that could be read."""


def _as_strings(value: Any) -> list[str] | None:
    if isinstance(value, dict):  # {"key_parts": [...]} is a common variation
        lists = [v for v in value.values() if isinstance(v, list)]
        value = lists[0] if len(lists) == 1 else None
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return [v for v in value if v.strip()]
    return None


def _bracketed(text: str) -> list[str]:
    """Candidate ``[...]`` / ``{...}`` substrings, widest first."""
    candidates = []
    for opening, closing in (("[", "]"), ("{", "}")):
        start, end = text.find(opening), text.rfind(closing)
        if 0 <= start < end:
            candidates.append(text[start : end + 1])
    return sorted(candidates, key=len, reverse=True)


def _unquote(text: str) -> str:
    """Drop quotes that wrap the whole text (not a quote that ends a label inside it)."""
    if (
        len(text) >= 2
        and text[0] in _QUOTE_CHARS
        and text[-1] in _QUOTE_CHARS
        and not any(c in _QUOTE_CHARS for c in text[1:-1])
    ):
        return text[1:-1].strip()
    return text


def parse_key_part_list(text: str) -> list[str]:
    """Read the list of key parts out of an LLM answer.

    Tried in order: the content of a code fence or the whole text, then the widest ``[...]``
    in it, each as JSON and as a Python literal (single quotes); then bulleted or numbered
    lines; then double-quoted strings.

    Raises:
        KeyPartParseError: nothing list-like was found.
    """
    fenced = _FENCE.findall(text)
    bodies = [*fenced, text] if fenced else [text]
    for body in bodies:
        for candidate in (body.strip(), *_bracketed(body)):
            for loader in (json.loads, ast.literal_eval):
                try:
                    parsed = _as_strings(loader(candidate))
                except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
                    continue
                if parsed is not None:
                    return parsed
    bullets = [_unquote(b.strip()) for b in _BULLET.findall(text)]
    if bullets:
        return [b for b in bullets if b]
    quoted = [a or b for a, b in _QUOTED.findall(text)]
    if quoted:
        return quoted
    raise KeyPartParseError(f"no list of key parts in the answer: {text[:200]!r}")


@dataclass
class ValidatedKeyParts:
    """Key parts kept (as the instruction spells them) and the candidates dropped, with why."""

    kept: list[str] = field(default_factory=list)
    dropped: list[tuple[str, str]] = field(default_factory=list)


def _locate(instruction: str, candidate: str) -> str | None:
    """The instruction's own text for ``candidate``: itself when it occurs verbatim, else the
    tolerant matcher's first span (which leaves out quotes it only matched loosely)."""
    exact = candidate.strip()
    if exact and exact in instruction:
        return exact
    match = find_key_part_spans(instruction, [candidate])
    if not match.spans:
        return None
    start, end = match.spans[0]
    # The matcher leaves out a quote that ends (or starts) a key part; take it back when the
    # candidate had one there too, so 'Answer with "Yes" or "No"' keeps its last quote.
    if exact[-1:] in _QUOTE_CHARS and end < len(instruction) and instruction[end] in _QUOTE_CHARS:
        end += 1
    if exact[:1] in _QUOTE_CHARS and start > 0 and instruction[start - 1] in _QUOTE_CHARS:
        start -= 1
    return instruction[start:end]


def validate_key_parts(instruction: str, candidates: Sequence[str]) -> ValidatedKeyParts:
    """Keep the candidates that occur in ``instruction``, as the instruction's own substring.

    A candidate is dropped when the matcher cannot find it (``"not_in_instruction"``), when it
    spans the whole instruction (``"whole_instruction"``: masking it would leave nothing), or
    when it repeats a span already kept (``"duplicate"``).
    """
    result = ValidatedKeyParts()
    seen: set[str] = set()
    whole = instruction.strip()
    for candidate in candidates:
        if not isinstance(candidate, str) or not candidate.strip():
            continue
        span = _locate(instruction, candidate)
        if span is None:
            result.dropped.append((candidate, "not_in_instruction"))
            continue
        if span.strip() == whole:
            result.dropped.append((candidate, "whole_instruction"))
        elif span.casefold() in seen:
            result.dropped.append((candidate, "duplicate"))
        else:
            seen.add(span.casefold())
            result.kept.append(span)
    if result.dropped:
        logger.info("dropped key parts %s", [f"{c!r} ({why})" for c, why in result.dropped])
    return result
