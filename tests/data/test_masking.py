"""Tests for kpig_trainer.data.masking (key-part masking, the ``mask(.)`` of equation 1)."""

from __future__ import annotations

import logging

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kpig_trainer.data.masking as masking
from kpig_trainer.data.masking import KeyPartMatch, find_key_part_spans, mask_key_parts

M = "[MASK]"

CASES = [
    # (id, instruction, key parts, expected masked instruction)
    ("overlap", "Sort the list of integers.", ["the list", "list of integers"], "Sort [MASK]."),
    ("nested", "Translate the English sentence.", ["English sentence", "English"], "Translate the [MASK]."),
    ("case", "Answer YES or No.", ["yes", "NO"], "Answer [MASK] or [MASK]."),
    ("whitespace", "find the  longest\tword", ["longest word", "  find "], "[MASK] the  [MASK]"),
    ("whitespace_multiline", "the longest\n  word wins", ["LONGEST WORD"], "the [MASK] wins"),
    ("repeats", "count the vowels; vowels are a e i o u", ["vowels"], "count the [MASK]; [MASK] are a e i o u"),
    ("quoted_key_part", "Answer with \"yes\" or 'no'.", ["\u201cyes\u201d", "'no'"], "Answer with [MASK] or [MASK]."),
    ("unquoted_key_part_keeps_quotes", 'Answer with "yes".', ["yes"], 'Answer with "[MASK]".'),
    ("inner_quote_style", "Don\u2019t use commas.", ["don't"], "[MASK] use commas."),
    ("regex_metachars", "compute a+b (mod 7) now", ["a+b", "(mod 7)"], "compute [MASK] now"),
    ("adjacent_space_merged", "the quick brown fox", ["quick", "brown"], "the [MASK] fox"),
    ("adjacent_tab_merged", "the quick\tbrown fox", ["quick", "brown"], "the [MASK] fox"),
    ("adjacent_comma_kept", "red, green or blue", ["red", "green"], "[MASK], [MASK] or blue"),
    ("adjacent_newline_kept", "quick\nbrown", ["quick", "brown"], "[MASK]\n[MASK]"),
    ("touching_merged", "foobar baz", ["foo", "bar"], "[MASK] baz"),
    ("whole_word_preferred", "no, not now", ["no"], "[MASK], not now"),
    ("substring_fallback", "Classify sentiments.", ["sentiment"], "Classify [MASK]s."),
    ("self_overlap", "aaa b", ["aa"], "[MASK] b"),
    ("blank_parts_ignored", "keep me", ["", "  "], "keep me"),
    ("empty_list", "keep me", [], "keep me"),
    ("unmatched_left_alone", "keep me", ["absent"], "keep me"),
    ("partly_unmatched", "keep me here", ["absent", "me"], "keep [MASK] here"),
]


@pytest.mark.parametrize("instruction,key_parts,expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_mask_table(instruction, key_parts, expected):
    assert mask_key_parts(instruction, key_parts) == expected


def test_spans_and_unmatched_reported():
    match = find_key_part_spans("Sort the list of integers, the list!", ["LIST", "zebra", "of integers"])
    assert isinstance(match, KeyPartMatch)
    assert match.spans == [(9, 25), (31, 35)]  # "list of integers" merged across a space; 2nd "list"
    assert match.unmatched == ["zebra"]


def test_substring_mode_masks_inside_words():
    assert mask_key_parts("no, not now", ["no"], whole_words=False) == "[MASK], [MASK]t [MASK]w"


def test_custom_mask_token():
    assert mask_key_parts("Summarize the article.", ["article"], mask_token="<mask>") == "Summarize the <mask>."


def test_unmatched_warns_and_strict_raises(caplog):
    with caplog.at_level(logging.WARNING, logger=masking.__name__):
        assert mask_key_parts("keep me", ["absent", "me"]) == "keep [MASK]"
    assert any("absent" in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match="absent"):
        mask_key_parts("keep me", ["absent", "me"], strict=True)


def test_single_string_rejected():
    with pytest.raises(TypeError):
        find_key_part_spans("abc", "abc")


class _WordTokenizer:
    """Stand-in for a HF tokenizer: one token per whitespace-separated word."""

    def encode(self, text, add_special_tokens=True):
        assert add_special_tokens is False
        return text.split()


class _CharEncoding:
    def __init__(self, text):
        self.ids = list(range(len(text)))


class _CharTokenizer:
    """Stand-in for ``tokenizers.Tokenizer``: ``encode(text)`` returns an object with ``ids``."""

    def encode(self, text):
        return _CharEncoding(text)


def test_per_token():
    text = "Name the capital city of France, please."
    out = mask_key_parts(text, ["capital city", "France"], per_token=True, tokenizer=_WordTokenizer())
    assert out == "Name the [MASK][MASK] of [MASK], please."
    out = mask_key_parts("ab cde f", ["cde"], mask_token="#", per_token=True, tokenizer=_CharTokenizer())
    assert out == "ab ### f"


def test_per_token_needs_tokenizer():
    with pytest.raises(ValueError, match="tokenizer"):
        mask_key_parts("abc", ["abc"], per_token=True)


def test_empty_key_parts_logged_once(caplog, monkeypatch):
    monkeypatch.setattr(masking, "_empty_key_parts_logged", False)
    with caplog.at_level(logging.INFO, logger=masking.__name__):
        for text in ["first", "second", "third"]:
            assert mask_key_parts(text, []) == text
        assert mask_key_parts("fourth", [" "]) == "fourth"
    messages = [r.getMessage() for r in caplog.records if "no key parts" in r.getMessage()]
    assert len(messages) == 1
    assert "information gain is 0" in messages[0]


def test_long_text_is_fast():
    import time

    text = " ".join(f"word{i % 997} filler" for i in range(50_000))  # ~650k characters
    start = time.perf_counter()
    out = mask_key_parts(text, ["word1 filler", "word996", "absent phrase"])
    assert time.perf_counter() - start < 2.0
    assert "word996 " not in out and "word1 filler" not in out


# ---------------------------------------------------------------------------------------------
# Property tests. The alphabet avoids the letters of "[MASK]" so that the mask token cannot
# itself contain a key part.
# ---------------------------------------------------------------------------------------------

_WORD = st.text(alphabet="bcdefgBCDEFG", min_size=1, max_size=5)
_SEPARATOR = st.sampled_from([" ", "  ", "\t", ", ", "\n", ". "])


@st.composite
def _instruction_and_key_parts(draw, whole_words: bool):
    words = draw(st.lists(_WORD, min_size=1, max_size=25))
    seps = draw(st.lists(_SEPARATOR, min_size=len(words) - 1, max_size=len(words) - 1))
    starts, text = [], ""
    for i, word in enumerate(words):
        starts.append(len(text))
        text += word + (seps[i] if i < len(seps) else "")
    parts = []
    for _ in range(draw(st.integers(1, 4))):
        if whole_words:  # a run of whole words
            i = draw(st.integers(0, len(words) - 1))
            j = draw(st.integers(i, min(i + 2, len(words) - 1)))
            part = text[starts[i] : starts[j] + len(words[j])]
        else:  # any substring
            i = draw(st.integers(0, len(text) - 1))
            j = draw(st.integers(i + 1, min(i + 8, len(text))))
            part = text[i:j]
        if draw(st.booleans()):
            part = part.swapcase()
        if part.strip():
            parts.append(part)
    return text, parts


def _occurrences(text: str, needle: str) -> list[tuple[int, int]]:
    """Naive reference: all (overlapping) case-insensitive exact occurrences."""
    low, needle = text.lower(), needle.lower()
    return [(i, i + len(needle)) for i in range(len(low) - len(needle) + 1) if low.startswith(needle, i)]


def _check_structure(text: str, parts: list[str], whole_words: bool) -> str:
    match = find_key_part_spans(text, parts, whole_words=whole_words)
    masked = mask_key_parts(text, parts, whole_words=whole_words)
    assert match.unmatched == []  # every part was taken from the text
    # Spans are sorted, disjoint and separated by more than spaces/tabs.
    for (s1, e1), (s2, e2) in zip(match.spans, match.spans[1:]):
        assert e1 < s2 and text[e1:s2].strip(" \t")
    # Characters outside the spans survive in order, one mask per span.
    outside = "".join(
        text[a:b] for a, b in zip([0] + [e for _, e in match.spans], [s for s, _ in match.spans] + [len(text)])
    )
    assert masked.replace(M, "") == outside
    assert masked.count(M) == len(match.spans)
    return masked


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_instruction_and_key_parts(whole_words=False))
def test_property_substring_mode(case):
    text, parts = case
    masked = _check_structure(text, parts, whole_words=False)
    for part in parts:
        core = part.strip()
        # No key part survives, and every original occurrence lies inside one span.
        assert core.lower() not in masked.lower()
        spans = find_key_part_spans(text, parts, whole_words=False).spans
        for a, b in _occurrences(text, core):
            assert any(s <= a and b <= e for s, e in spans)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_instruction_and_key_parts(whole_words=True))
def test_property_whole_word_mode(case):
    text, parts = case
    masked = _check_structure(text, parts, whole_words=True)
    for part in parts:
        core = part.strip()
        # No whole-word occurrence survives (a word containing the part may).
        for a, b in _occurrences(masked, core):
            before = masked[a - 1] if a > 0 else " "
            after = masked[b] if b < len(masked) else " "
            assert before.isalnum() or after.isalnum()
