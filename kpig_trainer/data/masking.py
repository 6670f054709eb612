"""Key-part masking: build the surface-level twin ``i^m`` of an instruction ``i``.

Paper (arXiv 2403.10056, section 3.3): ``mask(.)`` replaces the key parts of instruction ``i``
with a ``[MASK]`` symbol. Key parts come from an LLM (or a heuristic) and rarely match the
instruction byte for byte, so matching here is tolerant:

* case-insensitive;
* whitespace-insensitive: any run of whitespace in a key part matches any run of whitespace
  in the instruction, and leading/trailing whitespace of the key part is ignored;
* quote-tolerant: quotes surrounding a key part are stripped, and every quote character
  (straight, curly, guillemets, backtick) matches any other. When the key part was quoted,
  quotes around its occurrence in the instruction are masked with it;
* whole words first: a key part that starts (ends) with a word character must not be
  preceded (followed) by one, so ``"no"`` does not mask the inside of ``"not"``. A key part
  with no whole-word occurrence falls back to plain substring matches (``whole_words=False``
  forces substring matching throughout);
* every occurrence is masked.

Spans of all key parts are merged: overlapping, nested or touching spans become one region,
and so do regions separated only by spaces or tabs (``"the [MASK]"`` rather than
``"the [MASK] [MASK]"``: a run of masks would leak how many key parts sat there). Any other
separator -- punctuation, a word, a line break -- keeps regions apart. Each merged region is
replaced by one mask token (or, with ``per_token=True``, by as many as it has tokens).

Key parts that match nothing are reported in :class:`KeyPartMatch` and logged as a warning
(``strict=True`` raises). An instance without key parts gets a twin equal to the original,
so its IG is 0; that is logged once per process.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

__all__ = ["KeyPartMatch", "find_key_part_spans", "mask_key_parts"]

_QUOTES = "\"'`\u2018\u2019\u201a\u201b\u201c\u201d\u201e\u201f\u00ab\u00bb\u2039\u203a"
_QUOTE_CLASS = "[" + re.escape(_QUOTES) + "]"
_STRIP = _QUOTES + " \t\r\n\f\v"
_MERGEABLE_GAP = re.compile(r"[ \t]*")

_empty_key_parts_logged = False


@dataclass
class KeyPartMatch:
    """Where the key parts of one instruction occur.

    Attributes:
        spans: merged, sorted, disjoint ``(start, end)`` character spans to mask.
        unmatched: key parts (as given) that occur nowhere in the instruction.
    """

    spans: list[tuple[int, int]] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)


def _chunk_pattern(chunk: str) -> str:
    # Key parts are short; a loop over their characters is cheap.
    return "".join(_QUOTE_CLASS if c in _QUOTES else re.escape(c) for c in chunk)


@functools.lru_cache(maxsize=4096)
def _key_part_regex(key_part: str, whole_words: bool) -> re.Pattern[str] | None:
    """Compiled pattern for one key part, or None for a blank one.

    The pattern sits in a lookahead so that ``finditer`` reports overlapping occurrences
    (``"aa"`` in ``"aaa"``); group 1 holds the match.
    """
    core = key_part.strip(_STRIP)
    if not core:
        return None
    body = r"\s+".join(_chunk_pattern(chunk) for chunk in core.split())
    bounded = body
    if whole_words:
        if re.match(r"\w", core):
            bounded = r"(?<!\w)" + bounded
        if re.search(r"\w$", core):
            bounded = bounded + r"(?!\w)"
    alternatives = [bounded]
    stripped = key_part.strip()
    if stripped[:1] in _QUOTES or stripped[-1:] in _QUOTES:
        # The key part was quoted: take the instruction's quotes around it as well.
        alternatives.insert(0, rf"{_QUOTE_CLASS}\s*{body}\s*{_QUOTE_CLASS}")
    return re.compile("(?=(" + "|".join(alternatives) + "))", re.IGNORECASE)


def _occurrences(instruction: str, key_part: str, whole_words: bool) -> list[tuple[int, int]]:
    pattern = _key_part_regex(key_part, whole_words)
    if pattern is None:
        return []
    spans = [m.span(1) for m in pattern.finditer(instruction)]
    if not spans and whole_words:
        spans = [m.span(1) for m in _key_part_regex(key_part, False).finditer(instruction)]
        if spans:
            logger.debug("key part %r matched only inside words", key_part)
    return spans


def _merge(spans: list[tuple[int, int]], instruction: str) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for start, end in sorted(spans):
        if merged:
            last_start, last_end = merged[-1]
            if start <= last_end or _MERGEABLE_GAP.fullmatch(instruction, last_end, start):
                merged[-1] = (last_start, max(last_end, end))
                continue
        merged.append((start, end))
    return merged


def find_key_part_spans(instruction: str, key_parts: Sequence[str], *, whole_words: bool = True) -> KeyPartMatch:
    """Locate every occurrence of every key part in an instruction.

    Args:
        instruction: the instruction text ``i``.
        key_parts: key parts of ``i`` (blank strings are ignored).
        whole_words: prefer whole-word matches, falling back to substring matches for a key
            part that has none; ``False`` matches substrings only.

    Returns:
        A :class:`KeyPartMatch` with the merged spans (see the module docstring for the
        merging rule) and the key parts that occur nowhere.
    """
    if isinstance(key_parts, str):
        raise TypeError("key_parts must be a sequence of strings, not a single string")
    spans: list[tuple[int, int]] = []
    unmatched: list[str] = []
    for part in key_parts:
        if not part.strip(_STRIP):
            continue
        found = _occurrences(instruction, part, whole_words)
        if found:
            spans.extend(found)
        else:
            unmatched.append(part)
    return KeyPartMatch(spans=_merge(spans, instruction), unmatched=unmatched)


def _num_tokens(tokenizer, text: str) -> int:
    """Tokens of ``text`` alone (HF tokenizers, ``tokenizers.Tokenizer`` or any ``encode``)."""
    try:
        ids = tokenizer.encode(text, add_special_tokens=False)
    except TypeError:
        ids = tokenizer.encode(text)
    return max(1, len(getattr(ids, "ids", ids)))


def mask_key_parts(
    instruction: str,
    key_parts: Sequence[str],
    mask_token: str = "[MASK]",
    *,
    per_token: bool = False,
    tokenizer=None,
    strict: bool = False,
    whole_words: bool = True,
) -> str:
    """Replace every occurrence of every key part with ``mask_token`` (``mask(i)`` of eq. 1).

    Args:
        instruction: the instruction text ``i``.
        key_parts: its key parts. Empty (or all blank): ``instruction`` is returned unchanged
            (the twin equals the original and its IG is 0), logged once per process.
        mask_token: the text that replaces each merged region.
        per_token: replace a region by ``n`` concatenated mask tokens, ``n`` being the number
            of tokens of the region's text tokenized alone (at least 1), so that the twin keeps
            roughly the original length. Requires ``tokenizer``.
        tokenizer: anything with ``encode(text)`` (a ``transformers`` tokenizer is called with
            ``add_special_tokens=False``).
        strict: raise ``ValueError`` naming the key parts that match nothing, instead of
            logging a warning and leaving them unmasked.
        whole_words: see :func:`find_key_part_spans`.

    Returns:
        The masked instruction ``i^m``.
    """
    global _empty_key_parts_logged
    if per_token and tokenizer is None:
        raise ValueError("per_token=True needs a tokenizer to count the tokens of each span")
    if not any(part.strip(_STRIP) for part in key_parts):
        if not _empty_key_parts_logged:
            _empty_key_parts_logged = True
            logger.warning(
                "Some instances have no key parts: their masked twin equals the original "
                "instruction, so their information gain is 0 (logged once)."
            )
        return instruction

    match = find_key_part_spans(instruction, key_parts, whole_words=whole_words)
    if match.unmatched:
        if strict:
            raise ValueError(f"key parts not found in the instruction: {match.unmatched!r}")
        logger.warning("Key parts not found in the instruction, left unmasked: %r", match.unmatched)

    pieces: list[str] = []
    cursor = 0
    for start, end in match.spans:
        count = _num_tokens(tokenizer, instruction[start:end]) if per_token else 1
        pieces.append(instruction[cursor:start])
        pieces.append(mask_token * count)
        cursor = end
    pieces.append(instruction[cursor:])
    return "".join(pieces)
