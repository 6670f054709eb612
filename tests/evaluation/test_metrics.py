"""Per-example metrics: hand-computed values, sacrebleu as the BLEU oracle, dispatch."""

import math
from types import SimpleNamespace

import pytest
import sacrebleu

from kpig_trainer.evaluation import (
    LLMJudge,
    bleu,
    corpus_bleu,
    exact_match,
    normalize_answer,
    parse_bracketed_list,
    parse_items,
    rouge_l,
    score_example,
    set_f1,
    set_match,
    token_f1,
)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("  Agent. ", "agent"),
        ('"Agent"', "agent"),
        ('"Agent".', "agent"),
        ("'yes'!", "yes"),
        ("\u201cQuoted\u201d", "quoted"),
        ("Hello \n  World!?", "hello world"),
        ("A", "a"),  # articles stay: "A" can be a label
        ("the cat", "the cat"),
        ("a, b", "a, b"),  # inner punctuation stays
        ("Joe's Training", "joe's training"),
        (".", "."),  # the Penn Treebank tag "." survives
        ('"..."', "."),
        ("", ""),
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_exact_match_with_several_references():
    assert exact_match("agent.", ["User", "Agent"]) == 1.0
    assert exact_match("Agent because it replies", ["Agent"]) == 0.0
    assert exact_match("B", ["A", "C"]) == 0.0
    assert exact_match("x", []) == 0.0


def test_token_f1_hand_computed():
    # pred tokens: the cat sat on the mat (6); ref: the cat is on a mat (6)
    # overlap: the(min(2,1)=1) cat on mat = 4 -> P = R = 4/6 -> F1 = 2/3
    assert token_f1("The cat sat on the mat.", ["the cat is on a mat"]) == pytest.approx(2 / 3)
    # pred: new york (2); ref: new york city (3): overlap 2 -> P=1, R=2/3 -> F1 = 0.8
    assert token_f1("New York", ["new york city"]) == pytest.approx(0.8)
    # best reference counts
    assert token_f1("New York", ["boston", "new york city", "york"]) == pytest.approx(0.8)
    assert token_f1("paris", ["london"]) == 0.0
    assert token_f1("", [""]) == 1.0 and token_f1("", ["x"]) == 0.0


def test_set_f1_is_f1_over_normalised_sets():
    # {a, b, c} vs {b, c, d}: 2 shared -> P = R = 2/3
    assert set_f1("a, b, c", ["b, c, d"]) == pytest.approx(2 / 3)
    assert set_f1("a, a, b", ["b, a"]) == 1.0  # duplicates collapse
    assert set_f1("Formed., GONE", ["formed, gone"]) == 1.0
    # {x} vs {x, y, z}: P = 1, R = 1/3 -> F1 = 0.5
    assert set_f1("X", ["x, y, z"]) == pytest.approx(0.5)
    assert set_f1("I_RUN_I_JUMP", ["I_JUMP_I_RUN"], delimiter="_") == 1.0
    assert set_f1("[1, 2]", ["1, 2"]) == 1.0  # a bracketed list is parsed


def test_rouge_l_hand_computed_lcs():
    # pred: the cat sat on the mat; ref: the cat is on a mat
    # LCS = "the cat on mat" = 4 -> P = 4/6, R = 4/6 -> F = 2/3
    assert rouge_l("the cat sat on the mat", ["the cat is on a mat"]) == pytest.approx(2 / 3)
    # pred: alpha beta gamma delta (4); ref: beta delta epsilon (3); LCS = beta delta = 2
    # P = 1/2, R = 2/3 -> F = 2 * (1/3) / (7/6) = 4/7
    assert rouge_l("alpha beta gamma delta", ["beta delta epsilon"]) == pytest.approx(4 / 7)
    # reference "delta beta" runs against the prediction's order: LCS = 1
    # P = 1/4, R = 1/2 -> F = 2 * (1/8) / (3/4) = 1/3
    assert rouge_l("alpha beta gamma delta", ["delta beta"]) == pytest.approx(1 / 3)


def test_rouge_l_stems_and_takes_the_best_reference():
    assert rouge_l("running dogs", ["run dog"]) == 1.0  # Porter stemmer is on
    assert rouge_l("alpha beta gamma delta", ["zzz", "beta delta epsilon"]) == pytest.approx(4 / 7)
    assert rouge_l("anything", []) == 0.0


def test_rouge_l_without_ascii_tokens_falls_back_to_exact_match():
    assert rouge_l(".", ["."]) == 1.0
    assert rouge_l("\u00e9t\u00e9", ["\u00e9t\u00e9"]) == 1.0
    assert rouge_l("!", ["?"]) == 0.0


@pytest.mark.parametrize(
    "prediction, references",
    [
        ("the cat sat on the mat", ["the cat is on the mat"]),
        ("a quick brown fox jumps", ["the quick brown fox jumped over", "a fast brown fox jumps"]),
        ("completely different", ["nothing alike here at all"]),
    ],
)
def test_bleu_is_sacrebleu_sentence_bleu_over_100(prediction, references):
    expected = sacrebleu.sentence_bleu(prediction, references).score / 100
    assert bleu(prediction, references) == pytest.approx(expected)
    assert 0.0 <= bleu(prediction, references) <= 1.0


def test_bleu_perfect_match_is_one():
    assert bleu("the cat sat on the mat", ["the cat sat on the mat"]) == 1.0


def test_corpus_bleu_matches_sacrebleu_and_handles_variable_references():
    preds = ["the cat sat on the mat", "a dog barked loudly at night"]
    refs = [["the cat is on the mat"], ["the dog barked at night"]]
    expected = sacrebleu.corpus_bleu(preds, [[r[0] for r in refs]]).score / 100
    assert corpus_bleu(preds, refs) == pytest.approx(expected)
    # Repeating a reference changes no clipped count: a ragged list equals the padded one.
    ragged = [["the cat is on the mat"], ["the dog barked at night", "a dog barked"]]
    padded = [["the cat is on the mat", "the cat is on the mat"], ragged[1]]
    assert corpus_bleu(preds, ragged) == pytest.approx(corpus_bleu(preds, padded))
    assert math.isnan(corpus_bleu([], []))
    with pytest.raises(ValueError):
        corpus_bleu(["x"], [])


@pytest.mark.parametrize(
    "prediction, reference, expected",
    [
        ("[1, 2, 3]", "[3, 1, 2]", 1.0),  # order ignored
        ("[1, 2, 2]", "[1, 2]", 0.0),  # a multiset: duplicates count
        ("[2, 1, 2]", "[2, 2, 1]", 1.0),
        ("[]", "[]", 1.0),
        ("[1.0, -2]", "[1, -2.0]", 1.0),  # numbers compare by value
        ("['v', 'i']", "[v, i]", 1.0),  # quotes do not matter
        ("[[1, 2], [3]]", "[[3], [1, 2]]", 1.0),  # 2D: outer order ignored
        ("[[2, 1], [3]]", "[[3], [1, 2]]", 0.0),  # ... inner order kept
        ("[[1, 2]]", "[1, 2]", 0.0),  # nesting matters
        ("He, the, CEO", "the, CEO, he", 1.0),  # comma-split, case-insensitive
        ("[1, 2]", "1, 2", 1.0),  # bracketed and comma-split forms agree
        ("[1, 2", "[1, 2]", 0.0),
    ],
)
def test_set_match(prediction, reference, expected):
    assert set_match(prediction, [reference]) == expected


def test_set_match_delimiter_and_several_references():
    assert set_match("I_JUMP_I_RUN", ["I_RUN_I_JUMP"], delimiter="_") == 1.0
    assert set_match("[4, 7]", ["[1]", "[7, 4]"]) == 1.0
    assert set_match("[4, 7]", []) == 0.0


@pytest.mark.parametrize(
    "text, expected",
    [
        ("[1, 2, 3]", ["1", "2", "3"]),
        ("[]", []),
        ("  [ 'a' , \"b, c\" ]  ", ["a", "b, c"]),
        ("[['v', 'i'], ['9']]", [["v", "i"], ["9"]]),
        ("[Joe's, x]", ["Joe's", "x"]),
        ("[1, 2,]", ["1", "2"]),
    ],
)
def test_parse_bracketed_list_valid(text, expected):
    assert parse_bracketed_list(text) == expected


@pytest.mark.parametrize("text", ["1, 2", "[1, 2", "[1, 2]]", "[1,, 2]", "[1] [2]", "['a]", "[1 [2]]", ""])
def test_parse_bracketed_list_invalid(text):
    with pytest.raises(ValueError):
        parse_bracketed_list(text)


def test_parse_items():
    assert parse_items("a, b,, c ") == ["a", "b", "c"]
    assert parse_items("x_y", delimiter="_") == ["x", "y"]
    assert parse_items("[1, [2]]") == ["1", ["2"]]
    assert parse_items("[1, 2") == ["[1", "2"]  # not a list: split instead
    assert parse_items("  ") == []


def constraints(metric, **kwargs):
    return {"metric": metric, "scope": "-", "format": "-", "labels": [], "format_spec": None, **kwargs}


def test_score_example_dispatch():
    assert score_example("Agent.", ["agent"], constraints("ACC")) == (1.0, "exact_match", False)
    split = constraints("F1", format_spec={"type": "split", "delimiter": ","})
    assert score_example("a, b", ["b, c"], split) == (0.5, "set_f1", False)
    in_context = constraints("F1", scope="In context")
    assert score_example("a, b", ["b, c"], in_context).metric == "set_f1"
    plain = score_example("new york", ["new york city"], constraints("F1"))
    assert plain.metric == "token_f1" and plain.value == pytest.approx(0.8)
    assert score_example("the cat", ["the cat"], constraints("ROUGE")).metric == "rouge_l"
    assert score_example("the cat", ["the cat"], constraints("BLEU")) == (1.0, "bleu", False)
    assert score_example("[2, 1]", ["[1, 2]"], constraints("Match")) == (1.0, "set_match", False)
    underscore = constraints("Match", format_spec={"type": "split", "delimiter": "_"})
    assert score_example("b_a", ["a_b"], underscore).value == 1.0


def test_score_example_accepts_attribute_objects():
    task = SimpleNamespace(metric="ACC", scope="In choice", format="-", labels=["User", "Agent"])
    assert score_example("user", ["User"], task).value == 1.0


def test_gpt_without_judge_falls_back_to_rouge_l_and_says_so():
    task = constraints("GPT")
    result = score_example("alpha beta gamma delta", ["beta delta epsilon"], task)
    assert result.metric == "rouge_l" and result.fallback is True
    assert result.value == pytest.approx(4 / 7)
    unavailable = LLMJudge(base_url=None)
    assert score_example("x", ["x"], task, judge=unavailable).fallback is True


def test_unknown_metric_is_an_error():
    with pytest.raises(ValueError, match="unknown metric"):
        score_example("x", ["x"], constraints("METEOR"))
