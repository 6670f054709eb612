"""Violation checks: every format parser on valid and invalid strings, OOS, WR, adapter."""

from dataclasses import dataclass
from types import SimpleNamespace

import pytest

from kpig_trainer.data import Constraints
from kpig_trainer.evaluation import (
    as_constraints,
    is_out_of_scope,
    is_wordy,
    is_wrong_format,
    violations,
)


def task(metric="ACC", **kwargs):
    return {"metric": metric, "scope": "-", "format": "-", "labels": [], "format_spec": None, **kwargs}


GLUCOSE = {
    "type": "pattern",
    "regex": r"\S.*? >Causes> .*\bfeel\(s\).*",
    "description": "an event, then ' >Causes> ', then a result with feel(s)",
}

# (format_spec, response, is wrong)
FORMAT_CASES = [
    ({"type": "list"}, "[1, 2]", False),
    ({"type": "list"}, "  [4, -7, 0]\n", False),
    ({"type": "list"}, "[]", False),
    ({"type": "list"}, "['a', 'b c']", False),
    ({"type": "list"}, "[[1, 2]]", True),
    ({"type": "list"}, "[1, [2]]", True),
    ({"type": "list"}, "1, 2", True),
    ({"type": "list"}, "[1, 2", True),
    ({"type": "list"}, "The list is [1, 2]", True),
    ({"type": "list"}, "", True),
    ({"type": "2d_list"}, "[[1, 2], [3]]", False),
    ({"type": "2d_list"}, "[['v', 'i'], ['9', 'g']]", False),
    ({"type": "2d_list"}, "[]", False),
    ({"type": "2d_list"}, "[[]]", False),
    ({"type": "2d_list"}, "[1, 2]", True),
    ({"type": "2d_list"}, "[[1], 2]", True),
    ({"type": "2d_list"}, "[[[1]]]", True),
    ({"type": "2d_list"}, "[1], [2]", True),
    ({"type": "split", "delimiter": ","}, "rained, puddle, formed.", False),
    ({"type": "split", "delimiter": ","}, "decomposer", False),  # one item is fine
    ({"type": "split", "delimiter": ","}, "a,b", False),
    ({"type": "split", "delimiter": ","}, "a, , b", True),
    ({"type": "split", "delimiter": ","}, "a, b,", True),
    ({"type": "split", "delimiter": ","}, "[a, b]", True),
    ({"type": "split", "delimiter": ","}, "   ", True),
    ({"type": "split", "delimiter": "_"}, "I_TURN_LEFT", False),
    ({"type": "split", "delimiter": "_"}, "I__TURN", True),
    ({"type": "number"}, "5", False),
    ({"type": "number"}, " -3 ", False),
    ({"type": "number"}, "+2.50", False),
    ({"type": "number"}, ".5", False),
    ({"type": "number"}, "five", True),
    ({"type": "number"}, "5 nouns", True),
    ({"type": "number"}, "1,000", True),
    ({"type": "number"}, "3.", False),
    ({"type": "number"}, "-", True),
    ({"type": "json"}, '{"a": [1, 2]}', False),
    ({"type": "json"}, "[1, 2]", False),
    ({"type": "json"}, "{'a': 1}", True),
    ({"type": "json"}, '{"a": 1', True),
    ({"type": "uppercase_letter"}, "B", False),
    ({"type": "uppercase_letter"}, " C\n", False),
    ({"type": "uppercase_letter"}, "b", True),
    ({"type": "uppercase_letter"}, "AB", True),
    ({"type": "uppercase_letter"}, "(A)", True),
    ({"type": "uppercase_letter"}, "A.", True),
    ({"type": "max_words", "n": 3}, "Fantasy Football Fun", False),
    ({"type": "max_words", "n": 3}, "Seeing if it works", True),
    ({"type": "one_answer"}, "tranexamic acid", False),
    ({"type": "one_answer"}, "1, 3-diphenyl-2-propen-1-one", False),  # locant commas
    ({"type": "one_answer"}, "naphtho[1,2-b]furan-4,5-dione", False),
    ({"type": "one_answer"}, "PersonX and PersonY", False),
    ({"type": "one_answer"}, "groceries, cake", True),
    ({"type": "one_answer"}, "cake or pie", True),
    ({"type": "one_answer"}, "cake; pie", True),
    ({"type": "one_answer"}, "cake/pie", True),
    ({"type": "one_answer"}, "cake\npie", True),
    ({"type": "one_answer"}, "[cake]", True),
    ({"type": "one_answer"}, "", True),
    ({"type": "one_answer"}, "Oregon", False),  # "or" only as a word
    ({"type": "contains", "text": "__"}, "_____ is a cheap restaurant", False),
    ({"type": "contains", "text": "__"}, "_ is a cheap restaurant", True),
    (GLUCOSE, "Steve lifts it >Causes> Steve feel(s) happy ", False),
    (GLUCOSE, "Steve lifts it >causes> Steve feel(s) happy", True),
    (GLUCOSE, "Steve lifts it >Causes> Steve is happy", True),
    (GLUCOSE, " >Causes> I feel(s) sad", True),
]


@pytest.mark.parametrize("spec, response, wrong", FORMAT_CASES)
def test_format_parsers(spec, response, wrong):
    assert is_wrong_format(response, task(format_spec=spec)) is wrong


def test_every_format_type_has_cases():
    from kpig_trainer.data.records import FORMAT_TYPES

    covered = {spec["type"] for spec, _, _ in FORMAT_CASES}
    assert covered == set(FORMAT_TYPES)
    for kind in FORMAT_TYPES:  # each type has a valid and an invalid example
        assert {wrong for spec, _, wrong in FORMAT_CASES if spec["type"] == kind} == {True, False}


def test_no_format_spec_means_not_applicable():
    assert is_wrong_format("anything", task()) is None


CHOICE = task(scope="In choice", labels=["User", "Agent"])


@pytest.mark.parametrize(
    "response, oos",
    [
        ("Agent", False),
        ("agent", False),
        ("AGENT.", False),
        ('"Agent"', False),
        ("  user\n", False),
        ("Agent, because it replies", True),  # label + extra words is out of scope
        ("The speaker is the Agent", True),
        ("Both", True),
        ("", True),
    ],
)
def test_in_choice_scope(response, oos):
    assert is_out_of_scope(response, CHOICE) is oos


def test_in_choice_punctuation_label():
    pos = task(scope="In choice", labels=[".", "NOUN", "VERB"])
    assert is_out_of_scope(".", pos) is False
    assert is_out_of_scope("noun.", pos) is False
    assert is_out_of_scope("ADJ", pos) is True


def test_in_choice_labels_from_input_narrows_to_the_offered_labels():
    winomt = task(scope="In choice", labels=["nurse", "driver", "baker"], labels_from_input=True)
    sentence = "The driver helped the baker because she was kind."
    assert is_out_of_scope("Baker", winomt, sentence) is False
    assert is_out_of_scope("nurse", winomt, sentence) is True  # a label, but not offered here
    assert is_out_of_scope("nurse", winomt) is False  # without the input: the label set
    assert is_out_of_scope("nurse", winomt, "No label in this input.") is False
    options = task(scope="In choice", labels=[], labels_from_input=True)
    assert is_out_of_scope("higher", options, "Option1: higher Option2: lower") is False
    assert is_out_of_scope("faster", options, "Option1: higher Option2: lower") is True
    assert is_out_of_scope("higher", options) is None


def test_in_choice_items_of_a_split_answer():
    by_space = {"type": "split", "delimiter": " "}
    scan = task(scope="In choice", labels=["I_JUMP", "I_RUN"], format_spec=by_space)
    assert is_out_of_scope("I_JUMP I_RUN I_JUMP", scan) is False
    assert is_out_of_scope("I_JUMP I_FLY", scan) is True


@pytest.mark.parametrize(
    "response, oos",
    [
        ("Lidocaine", False),
        ("lidocaine.", False),
        ("protein binding", False),
        ("aspirin", True),
        ("lido", True),  # whole tokens only
        ("", True),
    ],
)
def test_in_context_scope(response, oos):
    ade = task("F1", scope="In context")
    text = "We suspect that the displacement of lidocaine from protein binding caused it."
    assert is_out_of_scope(response, ade, text) is oos


def test_in_context_checks_every_split_item():
    winobias = task("Match", scope="In context", format_spec={"type": "split", "delimiter": ","})
    text = "The mover hired the accountant because she is well recommended ."
    assert is_out_of_scope("the, accountant, she", winobias, text) is False
    assert is_out_of_scope("The, Accountant, SHE", winobias, text) is False
    assert is_out_of_scope("the, accountant, he", winobias, text) is True  # "he" is inside "the" only
    # empty items and brackets are format errors (WFR), not scope errors
    assert is_out_of_scope("the, , she", winobias, text) is False
    assert is_out_of_scope("[the, accountant]", winobias, text) is False
    assert is_out_of_scope(",", winobias, text) is True  # no answer at all
    assert is_out_of_scope("the, accountant, she", winobias) is None  # no input, no check


def test_other_scopes_are_not_applicable():
    assert is_out_of_scope("ladder", task("GPT", scope="Noun"), "climb : ladder") is None
    assert is_out_of_scope("x", task()) is None


@pytest.mark.parametrize(
    "response, wordy",
    [("one two three", False), ("one two  three\n", False), ("one two three four", True), ("", False)],
)
def test_wordy_threshold_boundary(response, wordy):
    assert is_wordy(response, task(max_words=3)) is wordy


def test_wordy_not_applicable_without_threshold():
    assert is_wordy("many many words here", task(max_words=None)) is None


def test_violations_collects_the_three_checks():
    title = task("ROUGE", max_words=3, format_spec={"type": "max_words", "n": 3})
    assert violations("Seeing if it works", title) == {"wfr": True, "oos": None, "wr": True}
    assert violations("Agent", CHOICE) == {"wfr": None, "oos": False, "wr": None}


def test_as_constraints_adapts_mappings_and_objects():
    @dataclass(frozen=True)
    class Annotation:  # stands in for any record type with the annotation attributes
        metric: str
        scope: str
        labels: tuple

    from_mapping = as_constraints(task(scope="-", labels=["a"], max_words=4))
    assert from_mapping.scope == "-" and from_mapping.labels == ("a",) and from_mapping.max_words == 4
    from_object = as_constraints(Annotation("ACC", "In choice", ("yes", "no")))
    assert from_object.metric == "ACC" and from_object.labels == ("yes", "no")
    assert from_object.format_spec is None and from_object.labels_from_input is False
    list_spec = SimpleNamespace(type="list")
    spec_object = as_constraints(SimpleNamespace(metric="Match", format_spec=list_spec))
    assert spec_object.format_spec == {"type": "list"}
    already = Constraints(metric="GPT")
    assert as_constraints(already) is already


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"scope": "-"}, "no 'metric'"),
        (task("Accuracy"), "unknown metric"),
        (task(format_spec={"type": "yaml"}), "format_spec type .yaml. is not one of"),
        (task(format_spec={"type": "max_words"}), "lacks"),
    ],
)
def test_as_constraints_rejects_bad_annotations(bad, message):
    with pytest.raises(ValueError, match=message):
        as_constraints(bad)


def test_the_papers_example_differs_in_wfr_not_in_rouge1():
    # Section 3.4: against the reference [1, 2], "{[1, 2, 3]}" and "[1, 2, 3]" have the same
    # ROUGE-1, but only the second is the one-dimensional list the instruction asks for.
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1"])
    braced, plain = "{[1, 2, 3]}", "[1, 2, 3]"
    assert scorer.score("[1, 2]", braced)["rouge1"].fmeasure == scorer.score("[1, 2]", plain)["rouge1"].fmeasure
    list_task = task("Match", format="List", format_spec={"type": "list"})
    assert is_wrong_format(braced, list_task) is True
    assert is_wrong_format(plain, list_task) is False
