"""`kpig data summary` / `python -m kpig_trainer.data summary`."""

import json
import subprocess
import sys

from kpig_trainer.cli import main
from kpig_trainer.data import load_benchmark


def test_summary_json_matches_the_stream(capsys):
    assert main(["data", "summary", "--benchmark", "demo", "--order", "SC", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    stream = load_benchmark("demo").stream(order="SC")
    assert summary["totals"]["stages"] == len(stream.stages)
    assert [s["tasks"] for s in summary["stages"]] == [list(s.tasks) for s in stream.stages]
    assert summary["totals"]["train_instances"] == sum(len(v) for v in stream.train.values())
    assert {r["task"] for r in summary["tasks"]} == set(stream.seen) | set(stream.held_out)


def test_summary_table_lists_every_section(capsys):
    assert main(["data", "summary"]) == 0
    out = capsys.readouterr().out
    for heading in ("Tasks", "Categories", "Stage plan", "Instances:"):
        assert heading in out
    assert "task1599_smcalflow_classification" in out


def test_summary_of_a_jsonl_file(tmp_path, capsys):
    path = tmp_path / "mine.jsonl"
    rows = [
        {"task": t, "instruction": f"Do {t}.", "input": str(k), "output": "x", "category": c}
        for t, c in (("a", "one"), ("b", "two"))
        for k in range(10)
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    assert main(["data", "summary", "--tasks", str(path), "--order", "SC", "--test-size", "2", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert [s["name"] for s in summary["stages"]] == ["one", "two"]
    assert summary["totals"]["train_instances"] == 16


def test_summary_counts_tasks_whose_key_parts_cannot_be_masked(tmp_path, capsys):
    path = tmp_path / "keyparts.jsonl"
    plan = {
        "found": ("Answer yes or no.", ["yes or no"]),
        "missing": ("Answer briefly.", ["yes or no"]),
        "partly": ("Answer in French.", ["in French", "in one word"]),
        "without": ("Answer.", []),
    }
    rows = [
        {"task": t, "instruction": text, "input": str(k), "output": "x", "key_parts": parts}
        for t, (text, parts) in plan.items()
        for k in range(5)
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    assert main(["data", "summary", "--tasks", str(path), "--test-size", "1", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    # unmatched: 'missing' and 'partly'; nothing to mask: 'missing' and 'without' (no key part at all)
    assert summary["totals"]["tasks_with_unmatched_key_parts"] == 2
    assert summary["totals"]["unmaskable_tasks"] == 2
    assert summary["unmatched_key_parts"] == {"missing": ["yes or no"], "partly": ["in one word"]}
    assert {r["task"]: r["maskable"] for r in summary["tasks"]} == {
        "found": "yes",
        "missing": "no",
        "partly": "yes",
        "without": "no",
    }
    assert main(["data", "summary", "--tasks", str(path), "--test-size", "1"]) == 0
    assert (
        "Key parts: 2 task(s) name key parts not found in their instruction; 2 task(s) have nothing to mask"
        in capsys.readouterr().out
    )


def test_bad_input_exits_2_with_the_file_named(tmp_path, capsys):
    assert main(["data", "summary", "--tasks", str(tmp_path / "missing.jsonl")]) == 2
    assert "missing.jsonl: file not found" in capsys.readouterr().err


def test_module_entry_point_runs():
    result = subprocess.run(
        [sys.executable, "-m", "kpig_trainer.data", "summary", "--json"], capture_output=True, text=True, check=True
    )
    assert json.loads(result.stdout)["totals"]["seen_tasks"] == 12
