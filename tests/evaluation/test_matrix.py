"""ContinualMatrix: metrics against hand-computed values, SC streams, JSON round trips."""

import json
import math

import pytest

from kpig_trainer.evaluation.matrix import ContinualMatrix
from kpig_trainer.evaluation.scores import TaskScore

# R[row][task] of a 3-stage ST stream (tasks A, B, C trained at stages 0, 1, 2) and one
# held-out task H. Row None is the model before training.
ST_ROWS = {
    None: {"A": 10, "B": 20, "C": 30, "H": 50},
    0: {"A": 60, "B": 25, "C": 30, "H": 45},
    1: {"A": 75, "B": 70, "C": 35, "H": 40},
    2: {"A": 50, "B": 65, "C": 80, "H": 42},
}


def _score(task, performance, wfr=None, oos=None, wr=None):
    return TaskScore(task, "ACC", "exact_match", float(performance), wfr, oos, wr, n=10)


def _st_matrix(with_initial=True):
    matrix = ContinualMatrix(seen=["A", "B", "C"], held_out=["H"], task_stage={"A": 0, "B": 1, "C": 2})
    for stage, row in ST_ROWS.items():
        if stage is None and not with_initial:
            continue
        matrix.record(stage, {t: _score(t, v) for t, v in row.items()})
    return matrix


def test_final_metrics_by_hand():
    m = _st_matrix()
    assert m.final_stage == 2
    assert m.average_performance() == pytest.approx((50 + 65 + 80) / 3)
    # BWT: A 50 - 60, B 65 - 70 (C was trained at the final stage: excluded).
    assert m.bwt() == pytest.approx((-10 + -5) / 2)
    # Forgetting: A max(60, 75) - 50 = 25, B 70 - 65 = 5: differs from -BWT.
    assert m.forgetting() == pytest.approx((25 + 5) / 2)
    # FWT (seen): B R[0,B] - R[init,B] = 5, C R[1,C] - R[init,C] = 5; A (stage 0) excluded.
    assert m.fwt() == pytest.approx(5.0)
    # FWT to held-out: R[2,H] - R[init,H].
    assert m.fwt_held_out() == pytest.approx(42 - 50)


def test_first_stage_edge_cases():
    m = _st_matrix()
    assert m.average_performance(0) == pytest.approx(60)  # only A trained so far
    assert m.bwt(0) is None  # no task trained before stage 0
    assert m.forgetting(0) is None
    assert m.fwt(0) is None  # no task with 0 < s(i) <= 0
    assert m.fwt_held_out(0) == pytest.approx(45 - 50)


def test_intermediate_stage_and_negative_forgetting():
    m = _st_matrix()
    assert m.average_performance(1) == pytest.approx((75 + 70) / 2)
    assert m.bwt(1) == pytest.approx(75 - 60)
    assert m.forgetting(1) == pytest.approx(60 - 75)  # A improved: negative forgetting
    assert m.fwt(1) == pytest.approx(25 - 20)


def test_without_initial_row_fwt_is_none():
    m = _st_matrix(with_initial=False)
    assert m.fwt() is None and m.fwt_held_out() is None
    assert m.bwt() == pytest.approx(-7.5)


def test_single_stage_run():
    m = ContinualMatrix(seen=["A"], held_out=[], task_stage={"A": 0})
    assert m.final_stage is None and m.average_performance() is None and m.metrics()["bwt"] is None
    m.record(0, {"A": _score("A", 40)})
    assert m.average_performance() == 40 and m.bwt() is None and m.forgetting() is None


def test_sc_stream_uses_each_tasks_own_stage():
    # Stage 0 trains A and B together, stage 1 trains C.
    m = ContinualMatrix(seen=["A", "B", "C"], held_out=["H"], task_stage={"A": 0, "B": 0, "C": 1})
    m.record(None, {"A": _score("A", 0), "B": _score("B", 10), "C": _score("C", 20), "H": _score("H", 30)})
    m.record(0, {"A": _score("A", 50), "B": _score("B", 60), "C": _score("C", 26), "H": _score("H", 28)})
    m.record(1, {"A": _score("A", 40), "B": _score("B", 66), "C": _score("C", 90), "H": _score("H", 33)})
    assert m.average_performance(0) == pytest.approx(55)
    assert m.average_performance() == pytest.approx((40 + 66 + 90) / 3)
    assert m.bwt() == pytest.approx(((40 - 50) + (66 - 60)) / 2)
    assert m.forgetting() == pytest.approx(((50 - 40) + (60 - 66)) / 2)
    assert m.fwt() == pytest.approx(26 - 20)  # only C has s(i) > 0
    assert m.fwt_held_out() == pytest.approx(3)


def test_row_summaries_pool_violation_rates():
    m = ContinualMatrix(seen=["A", "B"], held_out=["H"], task_stage={"A": 0, "B": 1})
    row = m.record(
        0,
        {
            "A": _score("A", 80, wfr=10.0, wr=20.0),
            "B": _score("B", 40, oos=60.0),
            "H": _score("H", 30, oos=30.0),
        },
        ig={"A": 0.2, "B": 0.4, "H": -0.1},
    )
    assert row.label == "stage 1"
    assert row.cells["A"]["v_score"] == pytest.approx(15.0)
    assert row.cells["B"]["v_score"] == pytest.approx(60.0)
    assert row.summary["seen"]["p_score"] == pytest.approx(60)
    assert row.summary["seen"]["v_score"] == pytest.approx((10 + 20 + 60) / 3)  # each rate once
    assert row.summary["trained"]["p_score"] == pytest.approx(80)  # only A trained at stage 0
    assert row.summary["held_out"] == {"p_score": 30, "v_score": 30, "v_score_paper": 30, "ig": -0.1, "n_tasks": 1}
    assert row.summary["seen"]["ig"] == pytest.approx(0.3)
    # the paper's reading: WFR mean 10, OOS mean 60, WR mean 20 -> 30 (pooled above: 30 too)
    assert row.summary["seen"]["v_score_paper"] == pytest.approx((10 + 60 + 20) / 3)
    curves = m.curves()
    assert curves["labels"] == ["stage 1"] and curves["trained_p_score"] == [80]


def test_row_summaries_carry_both_v_score_readings():
    # one wordy-only task at WR 100 and two format-only tasks at WFR 0, all seen
    m = ContinualMatrix(seen=["W", "F1", "F2"], held_out=[], task_stage={"W": 0, "F1": 0, "F2": 0})
    m.record(None, {"W": _score("W", 0, wr=0.0), "F1": _score("F1", 0, wfr=0.0), "F2": _score("F2", 0, wfr=0.0)})
    row = m.record(0, {"W": _score("W", 0, wr=100.0), "F1": _score("F1", 0, wfr=0.0), "F2": _score("F2", 0, wfr=0.0)})
    assert row.summary["seen"]["v_score"] == pytest.approx(100 / 3)  # three rates pooled
    assert row.summary["seen"]["v_score_paper"] == pytest.approx(50)  # (WFR 0 + WR 100) / 2
    assert row.summary["held_out"]["v_score"] is None and row.summary["held_out"]["v_score_paper"] is None
    curves = m.curves()
    assert curves["seen_v_score"] == pytest.approx([0, 100 / 3])
    assert curves["seen_v_score_paper"] == pytest.approx([0, 50])
    back = ContinualMatrix.from_dict(json.loads(json.dumps(m.to_dict())))
    assert back.row(0).summary["seen"]["v_score_paper"] == pytest.approx(50)


def test_record_replaces_a_row_and_keeps_order():
    m = _st_matrix()
    m.record(1, {t: _score(t, 0) for t in "ABCH"}, label="again")
    assert [r.stage for r in m.rows] == [0, 1, 2]
    assert m.row(1).label == "again" and m.value(1, "A") == 0
    labels, tasks, values = m.table()
    assert labels == ["init", "stage 1", "again", "stage 3"] and tasks == ["A", "B", "C", "H"]
    assert values[0] == [10, 20, 30, 50]


def test_json_round_trip(tmp_path):
    m = _st_matrix()
    data = json.loads(json.dumps(m.to_dict()))
    back = ContinualMatrix.from_dict(data)
    assert back.to_dict() == m.to_dict()
    assert back.metrics() == m.metrics()
    assert data["metrics"]["bwt"] == pytest.approx(-7.5)
    path = m.save(tmp_path / "matrix.json")
    assert [p.name for p in tmp_path.iterdir()] == ["matrix.json"]  # no temp file left
    assert ContinualMatrix.load(path).forgetting() == pytest.approx(15)


def test_nan_becomes_null_in_saved_json(tmp_path):
    m = ContinualMatrix(seen=["A"], held_out=[], task_stage={"A": 0})
    m.record(0, {"A": {"performance": 50.0, "wfr": None, "oos": None, "wr": None, "ig": math.nan, "n": 3}})
    text = (m.save(tmp_path / "m.json")).read_text()
    assert "NaN" not in text


def test_invalid_construction():
    with pytest.raises(ValueError, match="without a stage"):
        ContinualMatrix(seen=["A"], held_out=[], task_stage={})
    with pytest.raises(ValueError, match="both seen and held out"):
        ContinualMatrix(seen=["A"], held_out=["A"], task_stage={"A": 0})


def test_from_stream():
    from kpig_trainer.data import load_benchmark

    stream = load_benchmark("demo").stream(order="SC")
    m = ContinualMatrix.from_stream(stream)
    assert m.tasks == stream.seen + stream.held_out
    assert all(m.task_stage[t] == stream.stage_of(t) for t in stream.seen)
    assert len(m.stage_names) == len(stream.stages)
