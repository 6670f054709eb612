"""Reports: report.json round trip, report.md tables, PNG plots, compare; evaluate_tasks."""

import json
import math
import struct

import pytest

from kpig_trainer.evaluation.evaluate import EvalResult, evaluate_stream_stage, evaluate_tasks
from kpig_trainer.evaluation.matrix import ContinualMatrix
from kpig_trainer.evaluation.report import (
    SCHEMA,
    build_report,
    compare_markdown,
    read_report,
    render_markdown,
    table1_row,
    write_report,
)
from kpig_trainer.evaluation.scores import TaskScore

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _result(seen_p=(80.0, 40.0), held_p=30.0, fallback=False):
    scores = {
        "A": TaskScore("A", "ACC", "exact_match", seen_p[0], 10.0, None, 20.0, 5),
        "B": TaskScore(
            "B",
            "GPT",
            "rouge_l",
            seen_p[1],
            None,
            60.0,
            None,
            5,
            fallback=fallback,
            notes=["GPT metric scored with ROUGE-L: no LLM judge available"] if fallback else [],
        ),
        "H": TaskScore("H", "ACC", "exact_match", held_p, None, 30.0, 0.0, 5),
    }
    predictions = {t: [{"id": f"{t}-0", "prediction": "x", "references": ["y"]}] for t in scores}
    return EvalResult(
        scores,
        predictions,
        ["A", "B"],
        ["H"],
        ig={"A": 0.2, "B": 0.4, "H": -0.1},
        timings={"generation": 1.5, "total": 2.0},
        settings={"held_out_demonstrations": 2},
    )


def _assert_png(path):
    data = path.read_bytes()
    assert len(data) > 0 and data[:8] == PNG_MAGIC
    width, height = struct.unpack(">II", data[16:24])  # the IHDR chunk
    assert width > 100 and height > 100


def test_eval_report_files_and_round_trip(tmp_path):
    result = _result(fallback=True)
    report = write_report(tmp_path, result, {"model": "m", "benchmark": "demo"}, name="run-a")
    assert (tmp_path / "report.json").exists() and (tmp_path / "report.md").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left
    loaded = read_report(tmp_path)
    assert loaded == json.loads(json.dumps(report))
    assert loaded["schema"] == SCHEMA and loaded["kind"] == "eval" and loaded["matrix"] is None
    # Summary numbers, hand-computed: seen P = (80 + 40) / 2, seen V = mean(10, 20, 60).
    assert loaded["summary"]["seen"]["p_score"] == pytest.approx(60)
    assert loaded["summary"]["seen"]["v_score"] == pytest.approx(30)
    assert loaded["summary"]["held_out"]["p_score"] == pytest.approx(30)
    assert loaded["summary"]["held_out"]["v_score"] == pytest.approx(15)
    assert loaded["summary"]["seen"]["ig"] == pytest.approx(0.3)
    assert {v for v in ("python", "torch", "transformers", "kpig_trainer")} <= set(loaded["versions"])
    assert loaded["versions"]["kpig_trainer"]
    assert loaded["config"] == {"model": "m", "benchmark": "demo"}
    rows = {t["task"]: t for t in loaded["tasks"]}
    assert rows["H"]["group"] == "held_out" and rows["A"]["v_score"] == pytest.approx(15)
    assert any("GPT tasks scored with ROUGE-L: no judge configured (B)" in n for n in loaded["notes"])
    markdown = (tmp_path / "report.md").read_text()
    assert "| Run | Seen P-score | Seen V-score | Held-out P-score | Held-out V-score |" in markdown
    assert "| run-a | 60.0 | 30.0 | 30.0 | 15.0 |" in markdown
    assert "| A | seen | ACC | 5 | 80.0 | 10.0 | - | 20.0 | 15.0 | 0.200 |" in markdown
    assert "GPT (ROUGE-L fallback)" in markdown
    assert set(loaded["plots"]) == {"heatmap_performance.png", "heatmap_vscore.png", "task_scores.png"}
    for name in loaded["plots"]:
        _assert_png(tmp_path / name)
        assert f"![{name}]({name})" in markdown


def _matrix():
    matrix = ContinualMatrix(["A", "B"], ["H"], {"A": 0, "B": 1}, ["A", "B"])
    matrix.record(None, _result((50.0, 20.0), 45.0))
    matrix.record(0, _result((90.0, 25.0), 40.0))
    matrix.record(1, _result((70.0, 60.0), 35.0))
    return matrix


def test_continual_report_with_matrix(tmp_path):
    matrix = _matrix()
    final = _result((70.0, 60.0), 35.0)
    report = write_report(tmp_path, matrix, {"method": "kpig"}, final=final, name="kpig-st")
    loaded = read_report(tmp_path / "report.json")
    assert loaded["kind"] == "continual"
    metrics = loaded["matrix"]["metrics"]
    assert metrics["average_performance"] == pytest.approx(65)
    assert metrics["bwt"] == pytest.approx(70 - 90)
    assert metrics["forgetting"] == pytest.approx(20)
    assert metrics["fwt"] == pytest.approx(25 - 20)
    assert metrics["fwt_held_out"] == pytest.approx(35 - 45)
    assert ContinualMatrix.from_dict(loaded["matrix"]).bwt() == pytest.approx(-20)
    assert set(report["plots"]) == {
        "heatmap_performance.png",
        "heatmap_vscore.png",
        "scores_over_stages.png",
        "ig_over_stages.png",
    }
    for name in report["plots"]:
        _assert_png(tmp_path / name)
    markdown = (tmp_path / "report.md").read_text()
    assert "| Average | BWT | Forgetting | FWT (seen) | FWT (held-out) |" in markdown
    assert "| 65.0 | -20.0 | 20.0 | 5.0 | -10.0 |" in markdown
    assert "| init | 50.0 | 20.0 | 45.0 |" in markdown
    # Without the final EvalResult the tasks come from the matrix's last row.
    bare = build_report(matrix)
    assert [t["task"] for t in bare["tasks"]] == ["A", "B", "H"]
    assert bare["summary"]["seen"]["p_score"] == pytest.approx(65)


def test_compare_two_reports(tmp_path):
    write_report(tmp_path / "a", _result(), name="run-a", plots=False)
    write_report(tmp_path / "b", _matrix(), final=_result((70.0, 60.0), 35.0), name="run-b", plots=False)
    table = compare_markdown([read_report(tmp_path / "a"), read_report(tmp_path / "b")])
    lines = table.strip().splitlines()
    assert lines[0].startswith(
        "| Run | Seen P-score | Seen V-score | Held-out P-score | Held-out V-score | "
        "Seen V (paper) | Held-out V (paper) | Average"
    )
    # Best of each column in bold (ties: both); a column with one value has no best.
    assert lines[2] == "| run-a | 60.0 | **30.0** | 30.0 | **15.0** | **30.0** | **15.0** | - | - | - | - | - |"
    assert lines[3] == (
        "| run-b | **65.0** | **30.0** | **35.0** | **15.0** | **30.0** | **15.0** "
        "| 65.0 | -20.0 | 20.0 | 5.0 | -10.0 |"
    )
    renamed = compare_markdown([read_report(tmp_path / "a")], names=["X"])
    assert "| X | 60.0 | 30.0 |" in renamed
    # A report written before v_score_paper existed: the table keeps its old columns.
    old = read_report(tmp_path / "a")
    for group in old["summary"].values():
        group.pop("v_score_paper")
    assert compare_markdown([old]).splitlines()[0] == (
        "| Run | Seen P-score | Seen V-score | Held-out P-score | Held-out V-score |"
    )


def _readings_differ():
    """Seen: W wordy-only at WR 100, F1 and F2 format-only at WFR 0. Held-out: H with OOS 30, WR 0."""
    scores = {
        "W": TaskScore("W", "ACC", "exact_match", 50.0, None, None, 100.0, 4),
        "F1": TaskScore("F1", "ACC", "exact_match", 50.0, 0.0, None, None, 4),
        "F2": TaskScore("F2", "ACC", "exact_match", 50.0, 0.0, None, None, 4),
        "H": TaskScore("H", "ACC", "exact_match", 20.0, None, 30.0, 0.0, 4),
    }
    return EvalResult(scores, {}, ["W", "F1", "F2"], ["H"])


def test_report_carries_both_v_score_readings(tmp_path):
    # seen, pooled: (100 + 0 + 0) / 3 = 33.3; the paper's reading: (WFR 0 + WR 100) / 2 = 50.
    # held-out: one task, so both readings are (30 + 0) / 2 = 15. all: pooled (100 + 0 + 0 + 30 + 0) / 5
    # = 26; paper: WFR 0, OOS 30, WR (100 + 0) / 2 = 50 -> 80 / 3.
    report = write_report(tmp_path, _readings_differ(), name="r", plots=False)
    loaded = read_report(tmp_path)
    assert loaded["schema"] == "kpig-report/1"
    seen, held_out, everything = (loaded["summary"][g] for g in ("seen", "held_out", "all"))
    assert seen["v_score"] == pytest.approx(100 / 3) and seen["v_score_paper"] == pytest.approx(50)
    assert held_out["v_score"] == pytest.approx(15) and held_out["v_score_paper"] == pytest.approx(15)
    assert everything["v_score"] == pytest.approx(26) and everything["v_score_paper"] == pytest.approx(80 / 3)
    row = table1_row(report)
    assert (row["seen_v"], row["seen_v_paper"]) == (pytest.approx(100 / 3), pytest.approx(50))
    markdown = (tmp_path / "report.md").read_text()
    assert (
        "| Run | Seen P-score | Seen V-score | Held-out P-score | Held-out V-score | Seen V (paper) "
        "| Held-out V (paper) |" in markdown
    )
    assert "| r | 50.0 | 33.3 | 20.0 | 15.0 | 50.0 | 15.0 |" in markdown
    assert "| Group | P-score | V-score | V (paper) | WFR | OOS | WR | IG | Tasks |" in markdown
    assert "| seen | 50.0 | 33.3 | 50.0 | 0.0 | - | 100.0 | - | 3 |" in markdown
    assert "| all | 42.5 | 26.0 | 26.7 | 0.0 | 30.0 | 50.0 | - | 4 |" in markdown
    assert "The headline V-score is the mean of every applicable (task, check) rate" in markdown


def test_continual_report_carries_both_v_score_readings(tmp_path):
    matrix = ContinualMatrix(["W", "F1", "F2"], ["H"], {"W": 0, "F1": 1, "F2": 1})
    matrix.record(0, _readings_differ())
    matrix.record(1, _readings_differ())
    write_report(tmp_path, matrix, final=_readings_differ(), name="c", plots=False)
    loaded = read_report(tmp_path)
    final_row = loaded["matrix"]["rows"][-1]["summary"]
    assert final_row["trained"]["v_score"] == pytest.approx(100 / 3)
    assert final_row["trained"]["v_score_paper"] == pytest.approx(50)
    # stage 1 trained only W (WR 100): both readings 100
    assert loaded["matrix"]["rows"][0]["summary"]["trained"]["v_score_paper"] == pytest.approx(100)
    markdown = (tmp_path / "report.md").read_text()
    assert (
        "| After | Trained P | Trained V | Held-out P | Held-out V | Trained V (paper) | Held-out V (paper) |"
        in markdown
    )
    assert "| stage 1 | 50.0 | 100.0 | 20.0 | 15.0 | 100.0 | 15.0 |" in markdown
    assert "| stage 2 | 50.0 | 33.3 | 20.0 | 15.0 | 50.0 | 15.0 |" in markdown


def test_nan_and_missing_values_become_null(tmp_path):
    result = _result()
    result.scores = {"A": result.scores["A"]}
    result.held_out = []
    report = write_report(tmp_path, result, plots=False)
    text = (tmp_path / "report.json").read_text()
    assert "NaN" not in text
    assert report["summary"]["held_out"]["p_score"] is None
    assert table1_row(report)["held_out_p"] is None
    assert "| eval | 80.0 | 15.0 | - | - |" in render_markdown(report)


def test_read_report_rejects_other_json(tmp_path):
    (tmp_path / "report.json").write_text(json.dumps({"schema": "other"}))
    with pytest.raises(ValueError, match="not a kpig report"):
        read_report(tmp_path)


def test_evaluate_stage_into_matrix_and_report(tiny_model_and_tokenizer, tmp_path):
    from kpig_trainer.data import load_benchmark

    model, tokenizer = tiny_model_and_tokenizer
    stream = load_benchmark("demo").stream(
        seen=["task1599_smcalflow_classification", "task097_conala_remove_duplicates"],
        held_out=["task340_winomt_classification_gender_pro"],
        max_test_instances=2,
    )
    matrix = ContinualMatrix.from_stream(stream)
    for stage in (None, 0):
        result = evaluate_stream_stage(
            model, tokenizer, stream, stage, max_new_tokens=3, compute_ig=True, show_progress=False
        )
        assert set(result.scores) == set(stream.seen + stream.held_out)
        assert result.settings["stage"] == stage
        matrix.record(stage, result)
    assert result.settings["trained"] == ["task1599_smcalflow_classification"]
    assert all(isinstance(v, float) for v in result.ig.values())
    assert result.timings["total"] >= result.timings["generation"] > 0
    assert all(len(result.predictions[t]) == 2 for t in result.scores)
    report = write_report(tmp_path, matrix, final=result, name="tiny")
    assert report["summary"]["held_out"]["n_tasks"] == 1
    assert 0 <= report["summary"]["seen"]["p_score"] <= 100
    assert EvalResult.from_dict(json.loads(json.dumps(result.to_dict()))).summary() == result.summary()
    with pytest.raises(IndexError):
        evaluate_stream_stage(model, tokenizer, stream, 5)


def test_evaluate_tasks_skips_empty_and_checks_names(tiny_model_and_tokenizer, caplog):
    from kpig_trainer.data import load_benchmark

    model, tokenizer = tiny_model_and_tokenizer
    stream = load_benchmark("demo").stream(max_test_instances=1)
    name = stream.seen[0]
    result = evaluate_tasks(
        model,
        tokenizer,
        stream.tasks,
        {name: stream.test[name], stream.seen[1]: []},
        max_new_tokens=2,
        show_progress=False,
    )
    assert list(result.scores) == [name] and "no instances" in caplog.text
    assert math.isnan(result.summary()["held_out"]["p_score"] or math.nan)
    with pytest.raises(KeyError, match="no Task record"):
        evaluate_tasks(model, tokenizer, {}, {name: stream.test[name]})
