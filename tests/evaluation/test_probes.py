"""Half-listening probes: the shipped smcalflow probe, counting, scoring, a real tiny run."""

import json

import pytest

from kpig_trainer.data import load_benchmark
from kpig_trainer.data.masking import find_key_part_spans
from kpig_trainer.evaluation import probes
from kpig_trainer.evaluation.probes import (
    PROBE_DIR,
    instruction_variant_probe,
    load_probe,
    misleading_constraint_probe,
    probe_label,
    run_probe,
)

TASK = "task1599_smcalflow_classification"


@pytest.fixture(scope="module")
def smcalflow():
    stream = load_benchmark("demo").stream()
    return stream.tasks[TASK], stream.test[TASK]


def test_shipped_probe_has_the_papers_six_instructions():
    probe = load_probe(TASK)
    variants = probe["instruction_variants"]
    assert [v["name"] for v in variants] == [f"Ins_{k}" for k in range(1, 7)]
    for variant in variants:
        assert variant["key_parts"]
        for part in variant["key_parts"]:
            assert part in variant["instruction"]
        assert not find_key_part_spans(variant["instruction"], variant["key_parts"]).unmatched
    # Appendix D prints Ins_3's last key part with a stray leading quote; the data fixes it.
    assert variants[2]["key_parts"][-1] == 'Respond with either "User" or "Agent"'
    assert "2403.10056" in probe["source"]
    spec = probe["misleading_constraints"][0]
    assert spec["old_labels"] == ["User", "Agent"] and spec["new_labels"] == ["user", "agent"]
    assert spec["replace"] == {'"User" or "Agent"': '"user" or "agent"'}


def test_load_probe_by_path_and_errors(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"instruction_variants": [{"instruction": "Say A.", "key_parts": ["Say A"]}]}))
    probe = load_probe(path)
    assert probe["task"] == "mine" and probe["instruction_variants"][0]["name"] == "Ins_1"
    assert probe["misleading_constraints"] == []
    path.write_text(json.dumps({"instruction_variants": [{"instruction": "Say A.", "key_parts": ["Say B"]}]}))
    with pytest.raises(ValueError, match="Say B"):
        load_probe(path)
    path.write_text(json.dumps({"misleading_constraints": [{"replace": {"a": "b"}, "old_labels": ["A"]}]}))
    with pytest.raises(ValueError, match="new_labels"):
        load_probe(path)
    with pytest.raises(FileNotFoundError):
        load_probe("task_without_probe")
    assert (PROBE_DIR / f"{TASK}.json").exists()


def test_probe_label_is_case_sensitive():
    assert probe_label("  user. ") == "user"
    assert probe_label('"Agent"') == "Agent"
    assert probe_label("'user'.") == "user"
    assert probe_label("USER") == "USER"
    assert probe_label("The user") == "The user"


def test_misleading_constraint_counts(monkeypatch, smcalflow):
    task, instances = smcalflow
    instances = instances[:7]
    answers = ["user", "Agent", "agent.", " User ", "The user", '"user"', "AGENT"]
    seen = {}

    def fake_generate(model, tokenizer, batch, tasks, **kwargs):
        seen["instructions"] = {i.instruction for i in batch}
        seen["key_parts"] = batch[0].key_parts
        return answers[: len(batch)]

    monkeypatch.setattr(probes, "generate_answers", fake_generate)
    spec = load_probe(TASK)["misleading_constraints"][0]
    result = misleading_constraint_probe(
        None, None, task, instances, spec["replace"], spec["old_labels"], spec["new_labels"], compute_ig=False
    )
    (instruction,) = seen["instructions"]
    assert 'Answer with "user" or "agent".' in instruction and '"User" or "Agent"' not in instruction
    assert 'Answer with "user" or "agent"' in seen["key_parts"]  # key parts follow the change
    assert result["counts"] == {"user": 2, "agent": 1, "User": 1, "Agent": 1, "other": 2}
    assert result["n"] == 7
    assert result["follows_new"] == pytest.approx(100 * 3 / 7)
    assert result["follows_old"] == pytest.approx(100 * 2 / 7)
    assert result["other"] == pytest.approx(100 * 2 / 7)
    assert sum(result["rates"].values()) == pytest.approx(100)
    refs = [i.outputs[0].lower() for i in instances]
    expected_correct = sum(probe_label(a) in ("user", "agent") and probe_label(a) == r for a, r in zip(answers, refs))
    assert result["correct"] == pytest.approx(100 * expected_correct / 7)
    assert result["ig"] is None and len(result["predictions"]) == 7


def test_misleading_constraint_must_change_the_instruction(smcalflow):
    task, instances = smcalflow
    with pytest.raises(ValueError, match="not in its instruction"):
        misleading_constraint_probe(None, None, task, instances[:2], {"no such text": "x"}, ["A"], ["a"])


def test_instruction_variant_scores(monkeypatch, smcalflow):
    task, instances = smcalflow
    instances = instances[:4]
    variants = load_probe(TASK)["instruction_variants"][:2]

    def fake_generate(model, tokenizer, batch, tasks, **kwargs):
        if batch[0].instruction == variants[0]["instruction"]:
            return [i.outputs[0] for i in batch]  # all correct
        if batch[0].instruction == variants[1]["instruction"]:
            return ["banana"] * len(batch)  # wrong and out of scope, but short
        return ["Agent"] * len(batch)  # the original instruction

    monkeypatch.setattr(probes, "generate_answers", fake_generate)
    rows = instruction_variant_probe(None, None, task, instances, variants, compute_ig=False)
    assert [r["variant"] for r in rows] == ["original", "Ins_1", "Ins_2"]
    assert rows[0]["instruction"] == task.definition
    assert rows[1]["p_score"] == 100 and rows[1]["v_score"] == 0
    # "banana": ACC 0; OOS 100 and WR 0 (one word <= 3): V = mean(100, 0).
    assert rows[2]["p_score"] == 0 and rows[2]["oos"] == 100 and rows[2]["wr"] == 0 and rows[2]["v_score"] == 50
    expected = 100 * sum(i.outputs[0].lower() == "agent" for i in instances) / 4
    assert rows[0]["p_score"] == pytest.approx(expected)


def test_real_tiny_model_probe_shapes(tiny_model_and_tokenizer, smcalflow):
    model, tokenizer = tiny_model_and_tokenizer
    task, instances = smcalflow
    result = run_probe(model, tokenizer, task, instances[:2], max_new_tokens=3, batch_size=2)
    rows = result["instruction_variants"]
    assert [r["variant"] for r in rows] == ["original"] + [f"Ins_{k}" for k in range(1, 7)]
    for row in rows:
        assert 0 <= row["p_score"] <= 100 and isinstance(row["ig"], float) and row["n"] == 2
    (misleading,) = result["misleading_constraints"]
    assert misleading["name"] == "lowercase_labels"
    assert sum(misleading["counts"].values()) == 2 and isinstance(misleading["ig"], float)
