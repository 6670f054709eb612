"""Parsing LLM key-part answers, keeping only real spans, prompt templates and answer cleanup."""

import pytest

from kpig_trainer.data import DataError
from kpig_trainer.diversity import (
    KeyPartParseError,
    clean_instruction,
    load_templates,
    parse_key_part_list,
    validate_key_parts,
)

INSTRUCTION = 'In this task, you are given a review. Decide whether it is positive. Answer with "Yes" or "No".'


@pytest.mark.parametrize(
    "answer",
    [
        '["Decide whether it is positive", "Answer with \\"Yes\\" or \\"No\\""]',
        "Sure! Here are the key parts:\n```json\n"
        '["Decide whether it is positive", "Answer with \\"Yes\\" or \\"No\\""]\n```',
        "The key parts are ['Decide whether it is positive', 'Answer with \"Yes\" or \"No\"'] as requested.",
        '{"key_parts": ["Decide whether it is positive", "Answer with \\"Yes\\" or \\"No\\""]}',
        '- Decide whether it is positive\n- Answer with "Yes" or "No"',
        '1. Decide whether it is positive\n2) Answer with "Yes" or "No"',
    ],
)
def test_parse_key_part_list_variants(answer):
    assert parse_key_part_list(answer) == ["Decide whether it is positive", 'Answer with "Yes" or "No"']


def test_parse_quoted_strings_in_prose():
    assert parse_key_part_list('I would say "Decide whether it is positive" and "Yes"') == [
        "Decide whether it is positive",
        "Yes",
    ]


@pytest.mark.parametrize("answer", ["", "I cannot help with that.", "[1, 2, 3]"])
def test_parse_failure(answer):
    with pytest.raises(KeyPartParseError):
        parse_key_part_list(answer)


def test_validate_keeps_the_instructions_own_text():
    checked = validate_key_parts(
        INSTRUCTION,
        [
            "decide   whether it is POSITIVE",  # case and spaces differ
            "Answer with \u201cYes\u201d or \u201cNo\u201d",  # curly quotes
            "Classify the sentiment",  # invented
            "Decide whether it is positive",  # repeats a kept span
            INSTRUCTION,  # the whole instruction
            "   ",
        ],
    )
    assert checked.kept == ["Decide whether it is positive", 'Answer with "Yes" or "No"']
    assert checked.dropped == [
        ("Classify the sentiment", "not_in_instruction"),
        ("Decide whether it is positive", "duplicate"),
        (INSTRUCTION, "whole_instruction"),
    ]
    for part in checked.kept:
        assert part in INSTRUCTION


def test_templates_render_and_markers():
    templates = load_templates()
    prompt = templates.render("breadth", instruction="Do {this}.", key_parts=["Do {this}"], input="x", output="y")
    assert "Do {this}." in prompt and '["Do {this}"]' in prompt
    assert "{instruction}" not in prompt and "{key_parts}" not in prompt
    assert "[KEY PARTS]" in templates.markers and "[NEW INSTRUCTION]" in templates.markers
    assert templates.find_marker("Classify it.\n[NEW INSTRUCTION]") == "[NEW INSTRUCTION]"
    assert templates.find_marker("Classify it. Key parts: classify") is not None
    assert templates.find_marker('Answer with "Yes" or "No".') is None


def test_template_override_and_validation(tmp_path):
    (tmp_path / "breadth.txt").write_text("<<ORIGINAL>>\n{instruction}\n<<PARTS>> {key_parts}\n", encoding="utf-8")
    templates = load_templates(tmp_path)
    assert templates.render("breadth", instruction="Do it.", key_parts=["it"]).startswith("<<ORIGINAL>>\nDo it.")
    assert templates.sources["breadth"] == str(tmp_path / "breadth.txt")
    assert "[KEY PARTS]" in templates.texts["concretizing"]  # the others stay ours
    (tmp_path / "reasoning.txt").write_text("no placeholders here", encoding="utf-8")
    with pytest.raises(DataError, match=r"reasoning.txt.*lacks \{instruction\}, \{key_parts\}"):
        load_templates(tmp_path)
    with pytest.raises(DataError, match="template folder not found"):
        load_templates(tmp_path / "missing")


@pytest.mark.parametrize(
    "raw, clean",
    [
        ("  Classify the review.  ", "Classify the review."),
        ('"Classify the review."', "Classify the review."),
        ("```\nClassify the review.\n```", "Classify the review."),
        ("Sure, here is the new instruction:\nClassify the review.", "Classify the review."),
        ('"Yes" or "No": answer with one.', '"Yes" or "No": answer with one.'),
    ],
)
def test_clean_instruction(raw, clean):
    assert clean_instruction(raw) == clean
