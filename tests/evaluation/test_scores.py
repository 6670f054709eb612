"""Task scores, P-score and V-score on hand-built data, and the real benchmark annotations."""

import json
import math
from pathlib import Path

import pytest

import kpig_trainer
from kpig_trainer.evaluation import (
    TaskScore,
    p_score,
    score_task,
    v_score,
    v_score_paper,
    violation_rates,
    violations,
)

BENCHMARK = Path(kpig_trainer.__file__).parent / "benchmark" / "superni_kpig"
ANNOTATIONS = BENCHMARK / "annotations.json"

YES_NO = {"metric": "ACC", "scope": "In choice", "labels": ["yes", "no"], "max_words": 3}


def test_score_task_hand_computed():
    predictions = ["yes", "No.", "maybe", "yes it is"]
    references = [["yes"], ["yes"], ["no"], ["yes"]]
    score = score_task("t", predictions, references, YES_NO)
    # exact match: 1, 0, 0, 0 -> 25; out of scope: "maybe", "yes it is" -> 50;
    # wordy (> 3 words): none -> 0; no format_spec -> WFR not applicable
    assert score.performance == pytest.approx(25.0)
    assert score.oos == pytest.approx(50.0)
    assert score.wr == 0.0
    assert score.wfr is None
    assert (score.task, score.metric, score.metric_used, score.n) == ("t", "ACC", "exact_match", 4)
    assert score.fallback is False and score.notes == []


def test_score_task_rates_count_only_applicable_examples():
    extraction = {"metric": "F1", "scope": "In context", "format_spec": {"type": "split", "delimiter": ","}}
    predictions = ["a, b", "c", "[d]"]
    references = [["a, b"], ["x"], ["d"]]
    inputs = ["a b", "c", "d"]
    score = score_task("ner", predictions, references, extraction, inputs=inputs)
    # set F1: 1, 0, 1 -> 66.67; WFR: "[d]" has brackets -> 1/3; OOS: all spans in inputs
    assert score.performance == pytest.approx(200 / 3)
    assert score.wfr == pytest.approx(100 / 3)
    assert score.oos == 0.0 and score.wr is None
    without_inputs = score_task("ner", predictions, references, extraction)
    assert without_inputs.oos is None
    assert any("In context" in note for note in without_inputs.notes)


def test_gpt_fallback_is_flagged_on_the_task():
    score = score_task("gen", ["the cat sat"], [["the cat sat"]], {"metric": "GPT"})
    assert score.metric == "GPT" and score.metric_used == "rouge_l"
    assert score.fallback is True and score.performance == 100.0
    assert any("ROUGE-L" in note for note in score.notes)


def test_score_task_rejects_bad_lengths():
    with pytest.raises(ValueError, match="no predictions"):
        score_task("t", [], [], YES_NO)
    with pytest.raises(ValueError, match="2 predictions, 1 reference lists"):
        score_task("t", ["yes", "no"], [["yes"]], YES_NO)
    with pytest.raises(ValueError, match="1 inputs"):
        score_task("t", ["yes", "no"], [["yes"], ["no"]], YES_NO, inputs=["x"])


def make(task, performance, wfr=None, oos=None, wr=None):
    return TaskScore(task, "ACC", "exact_match", performance, wfr, oos, wr, n=10)


SCORES = [
    make("a", 80.0, oos=10.0, wr=0.0),
    make("b", 50.0, wfr=20.0, wr=60.0),
    make("c", 20.0),  # no constraint applies
]


def test_p_score_is_the_mean_over_tasks():
    assert p_score(SCORES) == pytest.approx((80 + 50 + 20) / 3)


def test_v_score_pools_applicable_task_rates():
    # applicable rates: a.oos 10, a.wr 0, b.wfr 20, b.wr 60 -> 90 / 4
    assert v_score(SCORES) == pytest.approx(22.5)
    # per-type means differ from the pooled mean (their mean would be 20, not 22.5)
    assert violation_rates(SCORES) == pytest.approx({"wfr": 20.0, "oos": 10.0, "wr": 30.0})


def test_the_papers_v_score_averages_the_per_type_means():
    # one wordy-only task at WR 100, two format-only tasks at WFR 0
    scores = [make("w", 0.0, wr=100.0), make("f1", 0.0, wfr=0.0), make("f2", 0.0, wfr=0.0)]
    assert v_score(scores) == pytest.approx(100 / 3)  # pooled: (100 + 0 + 0) / 3 rates
    assert v_score_paper(scores) == pytest.approx(50.0)  # (WFR mean 0 + WR mean 100) / 2 types; no OOS
    # SCORES: WFR mean 20, OOS mean 10, WR mean (0 + 60) / 2 = 30 -> 20; pooled 22.5
    assert v_score_paper(SCORES) == pytest.approx(20.0)
    # one task: both readings are the mean of its own rates
    assert v_score_paper([SCORES[1]]) == v_score([SCORES[1]]) == pytest.approx(40.0)


def test_empty_inputs_give_nan():
    assert math.isnan(p_score([])) and math.isnan(v_score([]))
    assert math.isnan(v_score([make("c", 20.0)]))
    assert math.isnan(v_score_paper([])) and math.isnan(v_score_paper([make("c", 20.0)]))
    assert all(math.isnan(v) for v in violation_rates([]).values())


# -- the shipped benchmark: every reference must satisfy its own task's annotation ---------

# Reference outputs that break their task's annotation, known and counted (all instances).
KNOWN_REFERENCE_VIOLATIONS = {
    # Paper: "Length <= 3"; 29 of the 300 reference titles have 4-6 words.
    "task219_rocstories_title_answer_generation": {"wfr": 29},
}


def test_references_satisfy_their_own_annotations():
    annotations = json.loads(ANNOTATIONS.read_text())
    assert len(annotations) >= 100
    problems = []
    for name, constraints in sorted(annotations.items()):
        instances = json.loads((BENCHMARK / "tasks" / f"{name}.json").read_text())["Instances"]
        predictions = [out for inst in instances for out in inst["output"]]
        references = [inst["output"] for inst in instances for _ in inst["output"]]
        inputs = [inst["input"] for inst in instances for _ in inst["output"]]
        score = score_task(name, predictions, references, constraints, inputs=inputs)
        if score.performance != pytest.approx(100.0):
            problems.append(f"{name}: performance {score.performance:.2f} ({score.metric_used})")
        if constraints["metric"] == "GPT":
            assert score.fallback and score.metric_used == "rouge_l", name
        found = {"wfr": [], "oos": []}
        for prediction, input_text in zip(predictions, inputs):
            flags = violations(prediction, constraints, input_text)
            for kind in found:
                if flags[kind]:
                    found[kind].append(prediction)
        counts = {kind: len(bad) for kind, bad in found.items() if bad}
        if counts != KNOWN_REFERENCE_VIOLATIONS.get(name, {}):
            examples = {kind: bad[:3] for kind, bad in found.items() if bad}
            problems.append(f"{name}: violations {counts}, e.g. {examples}")
    assert not problems, "\n".join(problems)
