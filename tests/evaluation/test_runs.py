"""Comparing runs instance by instance: per-instance scores, paired bootstrap, right/wrong flips."""

import json
import math

import pytest

from kpig_trainer.data import build_stream, tasks_from_records
from kpig_trainer.evaluation.runs import (
    InstanceScore,
    RunRecord,
    flips,
    instance_scores,
    p_score_of,
    paired_bootstrap,
    v_score_of,
)


def scores(table):
    """{task: [(value, wr flag), ...]} -> instance scores with ids t0, t1, ..."""
    return {
        task: {f"{task}-{k}": InstanceScore(v, {"wfr": None, "oos": None, "wr": f}) for k, (v, f) in enumerate(rows)}
        for task, rows in table.items()
    }


def test_p_and_v_scores_of_instances_match_hand_computed_values():
    s = scores({"a": [(1, True), (0, False), (1, None)], "b": [(0.5, False)]})
    # P: mean over tasks of mean values: (2/3 + 1/2) / 2
    assert p_score_of(s, ["a", "b"]) == pytest.approx(100 * (2 / 3 + 0.5) / 2)
    # V (pooled): task a's WR rate is 1 of 2 applicable = 50, task b's 0 -> mean 25
    assert v_score_of(s, ["a", "b"]) == pytest.approx(25.0)
    # A bootstrap draw counts duplicates: a-0 twice, a-1 once -> 2/3 of the draws are right
    assert p_score_of(s, ["a"], {"a": ["a-0", "a-0", "a-1"]}) == pytest.approx(100 * 2 / 3)


def test_paired_bootstrap_of_a_constant_shift_has_no_spread():
    base = {"a": [(0.1 * k, None) for k in range(10)], "b": [(0.05 * k, None) for k in range(10)]}
    shifted = {t: [(v + 0.2, f) for v, f in rows] for t, rows in base.items()}
    result = paired_bootstrap([(scores(shifted), scores(base))], ["a", "b"], replicates=300, seed=1)
    # Every instance moves by 20 points: a paired draw always sees exactly 20
    assert result["difference"] == pytest.approx(20.0)
    assert result["low"] == pytest.approx(20.0) and result["high"] == pytest.approx(20.0)
    same = paired_bootstrap([(scores(base), scores(base))], ["a", "b"], replicates=50)
    assert (same["difference"], same["low"], same["high"]) == (0.0, 0.0, 0.0)


def test_paired_bootstrap_interval_covers_a_noisy_difference_and_is_seeded():
    import random

    rng = random.Random(3)
    a = {"t": [(float(rng.random() < 0.7), None) for _ in range(60)]}
    b = {"t": [(float(rng.random() < 0.4), None) for _ in range(60)]}
    first = paired_bootstrap([(scores(a), scores(b))], ["t"], replicates=500, seed=7)
    again = paired_bootstrap([(scores(a), scores(b))], ["t"], replicates=500, seed=7)
    assert first == again
    observed = 100 * (sum(v for v, _ in a["t"]) - sum(v for v, _ in b["t"])) / 60
    assert first["difference"] == pytest.approx(observed)
    assert first["low"] < observed < first["high"]
    # A standard error from the paired differences: the 95% interval is about +-2 of them wide
    diffs = [100 * (x - y) for (x, _), (y, _) in zip(a["t"], b["t"])]
    mean = sum(diffs) / len(diffs)
    se = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1) / len(diffs))
    assert first["high"] - first["low"] == pytest.approx(2 * 1.96 * se, rel=0.25)


def test_paired_bootstrap_refuses_runs_on_different_instances():
    a = scores({"t": [(1, None), (0, None)]})
    b = {"t": {"other": InstanceScore(1, {"wfr": None, "oos": None, "wr": None})}}
    with pytest.raises(ValueError, match="different test instances"):
        paired_bootstrap([(a, b)], ["t"])


@pytest.fixture
def two_stage_run(tmp_path):
    rows = [
        {"task": t, "instruction": f"Answer {t} with yes or no.", "input": f"{t} {k}", "output": "yes", "category": t}
        for t in ("first", "second")
        for k in range(6)
    ]
    tasks = tasks_from_records(rows, source="made", annotations={t: {"metric": "ACC"} for t in ("first", "second")})
    stream = build_stream(tasks, ["first", "second"], test_size=3, seed=0)
    # Right (yes) or wrong answers of every test instance after each row.
    plan = {
        "init": {"first": [0, 0, 0], "second": [0, 0, 1]},
        "stage_01": {"first": [1, 1, 0], "second": [1, 0, 1]},
        "stage_02": {"first": [0, 1, 1], "second": [1, 1, 1]},
    }
    (tmp_path / "predictions").mkdir()
    for row, answers in plan.items():
        data = {
            t: [
                {"id": i.id, "prediction": "yes" if right else "no", "references": i.outputs}
                for i, right in zip(stream.test[t], answers[t])
            ]
            for t in answers
        }
        (tmp_path / "predictions" / f"{row}.json").write_text(json.dumps(data))
    return RunRecord(tmp_path, {}, {}, stream)


def test_instance_scores_score_each_answer_with_the_task_metric(two_stage_run):
    s = instance_scores(two_stage_run, "stage_01")
    assert [s["first"][i.id].value for i in two_stage_run.stream.test["first"]] == [1.0, 1.0, 0.0]
    assert p_score_of(s, ["first", "second"]) == pytest.approx(100 * (2 / 3 + 2 / 3) / 2)
    assert two_stage_run.rows == ["init", "stage_01", "stage_02"]


def test_flips_count_changes_of_tasks_already_trained(two_stage_run):
    result = flips(two_stage_run)
    # init -> stage_01: nothing trained before, so nothing to compare
    assert result[0] == {"from": "init", "to": "stage_01", "right_to_wrong": 0, "wrong_to_right": 0, "compared": 0}
    # stage_01 -> stage_02 on 'first' only: [1,1,0] -> [0,1,1]: one lost, one gained
    assert result[1] == {"from": "stage_01", "to": "stage_02", "right_to_wrong": 1, "wrong_to_right": 1, "compared": 3}
    every = flips(two_stage_run, tasks=["first", "second"])
    # 'second' over both pairs: [0,0,1] -> [1,0,1] (+1), [1,0,1] -> [1,1,1] (+1); 'first': +2, then 1/1
    assert [(p["right_to_wrong"], p["wrong_to_right"]) for p in every] == [(0, 3), (1, 2)]
