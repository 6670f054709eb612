"""Answers as text: the normaliser every comparison uses and the parser of list answers.

A leaf module (no package imports), shared by the data layer (label sets, test sampling) and
the metrics, so neither imports the other for it.
"""

from __future__ import annotations

import re

__all__ = ["normalize_answer", "parse_bracketed_list", "parse_items"]

# Opening quote -> closing quote, for stripping quotes that surround a whole answer.
_QUOTE_PAIRS = {'"': '"', "'": "'", "`": "`", "\u201c": "\u201d", "\u2018": "\u2019", "\u00ab": "\u00bb"}
_TRAILING_PUNCT = ".,;:!?\u2026\u3002"
_WHITESPACE = re.compile(r"\s+")


def normalize_answer(text: str) -> str:
    """Normalise an answer for comparison.

    Exactly these steps, in order:

    1. casefold (a stronger ``lower()``: "Agent" -> "agent");
    2. collapse every run of whitespace into one space and strip both ends;
    3. repeatedly strip one layer of quotes surrounding the whole text (``"x"``, ``'x'``,
       backticks, curly quotes, guillemets) or one trailing punctuation mark (``. , ; : ! ?``,
       ellipsis), re-stripping whitespace each time, until nothing changes; a step that
       would leave the text empty is not taken, so a label that *is* punctuation (the Penn
       Treebank tag ``"."``) survives.

    Unlike SQuAD's normaliser, articles and inner punctuation are kept: labels such as
    ``"A"`` or ``"the, CEO, he"`` must not lose words.
    """
    text = _WHITESPACE.sub(" ", text.casefold()).strip()
    while True:
        stripped = text
        if len(text) >= 2 and _QUOTE_PAIRS.get(text[0]) == text[-1]:
            stripped = text[1:-1].strip()
        elif text and text[-1] in _TRAILING_PUNCT:
            stripped = text[:-1].strip()
        if not stripped or stripped == text:
            return text
        text = stripped


_BARE_ITEM = re.compile(r"[^,\[\]]*")  # an unquoted item runs to the next comma or bracket


def parse_bracketed_list(text: str) -> list:
    """Parse ``[1, 'a', [2, 3]]`` into nested lists of strings (quotes removed); raise
    ValueError when the text is not one bracketed list.

    Tolerant of unquoted items (``[a, b]``) unlike ``ast.literal_eval``; quoted items keep
    commas and brackets inside them.
    """
    pos = 0

    def skip_ws() -> None:
        nonlocal pos
        while pos < len(text) and text[pos].isspace():
            pos += 1

    def parse_list() -> list:
        nonlocal pos
        assert text[pos] == "["
        pos += 1
        items: list = []
        skip_ws()
        if pos < len(text) and text[pos] == "]":
            pos += 1
            return items
        while True:
            skip_ws()
            if pos >= len(text):
                raise ValueError("unclosed '['")
            char = text[pos]
            if char == "[":
                items.append(parse_list())
            elif char in "\"'":
                end = pos + 1
                while end < len(text) and text[end] != char:
                    end += 2 if text[end] == "\\" else 1
                if end >= len(text):
                    raise ValueError("unclosed quote")
                items.append(text[pos + 1 : end])
                pos = end + 1
            else:
                match = _BARE_ITEM.match(text, pos)
                item = match.group().strip()
                if not item:
                    raise ValueError(f"empty item at position {pos}")
                items.append(item)
                pos = match.end()
            skip_ws()
            if pos >= len(text):
                raise ValueError("unclosed '['")
            if text[pos] == "]":
                pos += 1
                return items
            if text[pos] != ",":
                raise ValueError(f"expected ',' or ']' at position {pos}, got {text[pos]!r}")
            pos += 1
            skip_ws()
            if pos < len(text) and text[pos] == "]":  # a trailing comma, as Python allows
                pos += 1
                return items

    text = text.strip()
    if not text.startswith("["):
        raise ValueError("a list starts with '['")
    result = parse_list()
    if text[pos:].strip():
        raise ValueError(f"text after the closing ']': {text[pos:]!r}")
    return result


def parse_items(text: str, delimiter: str | None = None) -> list:
    """Split an answer into items: a bracketed list is parsed (nested lists stay lists),
    anything else is split by ``delimiter`` (default ``","``). Items are raw strings with
    surrounding whitespace removed and empty items dropped; an empty text gives ``[]``."""
    stripped = text.strip()
    if stripped.startswith("[") and stripped.endswith("]"):
        try:
            return parse_bracketed_list(stripped)
        except ValueError:
            pass  # not a well-formed list: fall back to splitting
    items = (item.strip() for item in stripped.split(delimiter or ","))
    return [item for item in items if item]
