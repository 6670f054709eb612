"""Loaders: SuperNI task files, JSONL, datasets, splits; errors that name file, task and record."""

import json
import logging

import pytest
from datasets import Dataset

from kpig_trainer.data import (
    DataError,
    load_dataset_tasks,
    load_jsonl_tasks,
    load_splits,
    load_superni_task,
    load_tasks,
)
from kpig_trainer.data.benchmark import BENCHMARK_DIR

TASKS_DIR = BENCHMARK_DIR / "tasks"
SMCALFLOW = "task1599_smcalflow_classification"


def write_task(path, **overrides):
    data = {
        "Definition": ['Answer with "yes" or "no". Keep it short.'],
        "Categories": ["Toy Classification"],
        "Positive Examples": [{"input": "a", "output": "yes", "explanation": "because"}],
        "Negative Examples": [],
        "Instances": [
            {"id": "t-1", "input": "is it?", "output": ["yes"]},
            {"id": "t-2", "input": "is it not?", "output": ["no"]},
        ],
    }
    data.update(overrides)
    path.write_text(json.dumps(data))
    return path


def test_shipped_superni_task_matches_its_file():
    path = TASKS_DIR / f"{SMCALFLOW}.json"
    raw = json.loads(path.read_text())
    task = load_superni_task(path)
    assert task.name == SMCALFLOW
    assert task.definition == raw["Definition"][0]
    assert task.category == raw["Categories"][0]
    assert len(task.instances) == len(raw["Instances"])
    assert [i.outputs for i in task.instances] == [r["output"] for r in raw["Instances"]]
    assert [i.id for i in task.instances] == [r["id"] for r in raw["Instances"]]
    assert all(i.instruction == task.definition and i.task == SMCALFLOW for i in task.instances)
    assert len(task.positive_examples) == len(raw["Positive Examples"])
    assert task.positive_examples[0].output == raw["Positive Examples"][0]["output"]


def test_annotation_sets_constraints_category_and_key_parts(tmp_path):
    path = write_task(tmp_path / "toy.json")
    annotation = {
        "category": "Paper Category",
        "metric": "ACC",
        "scope": "In choice",
        "format": "-",
        "labels": ["yes", "no"],
        "max_words": 3,
        "key_parts": ['Answer with "yes" or "no"'],
    }
    task = load_superni_task(path, annotation=annotation)
    assert task.category == "Paper Category"
    assert task.constraints.metric == "ACC" and task.constraints.labels == ("yes", "no")
    assert task.instances[0].key_parts == ['Answer with "yes" or "no"']


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(DataError, match="nope.json: file not found"):
        load_superni_task(tmp_path / "nope.json")


def test_malformed_json_names_file_and_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"Definition": ["x"],\n "Instances": [oops]}')
    with pytest.raises(DataError, match=r"bad.json: malformed JSON at line 2"):
        load_superni_task(path)


def test_missing_field_is_named(tmp_path):
    path = tmp_path / "nodef.json"
    path.write_text(json.dumps({"Instances": []}))
    with pytest.raises(DataError, match=r"nodef.json: task 'nodef': missing field 'Definition'"):
        load_superni_task(path)


def test_empty_output_names_file_task_and_record(tmp_path):
    path = write_task(
        tmp_path / "empty.json",
        Instances=[
            {"id": "ok", "input": "x", "output": ["yes"]},
            {"id": "bad-one", "input": "y", "output": [""]},
        ],
    )
    with pytest.raises(DataError, match=r"empty.json: task 'empty': record 1 \(id 'bad-one'\): empty output"):
        load_superni_task(path)


def test_skip_invalid_drops_and_counts(tmp_path, caplog):
    path = write_task(
        tmp_path / "skip.json",
        Instances=[
            {"id": "ok", "input": "x", "output": ["yes"]},
            {"id": "bad", "input": "y", "output": []},
            {"id": "bad2", "input": "y", "output": ["  "]},
        ],
    )
    with caplog.at_level(logging.WARNING):
        task = load_superni_task(path, skip_invalid=True)
    assert [i.id for i in task.instances] == ["ok"]
    assert "skipped 2 invalid instance(s) of 3" in caplog.text


def test_key_part_not_in_instruction_warns_or_raises(tmp_path, caplog):
    path = write_task(tmp_path / "kp.json")
    annotation = {"key_parts": ["Answer with", "respond in French"]}
    with caplog.at_level(logging.WARNING):
        load_superni_task(path, annotation=annotation)
    assert "kp.json: task 'kp': key parts not found in the definition: ['respond in French']" in caplog.text
    with pytest.raises(DataError, match="respond in French"):
        load_superni_task(path, annotation=annotation, strict_key_parts=True)


def test_jsonl_key_parts_are_checked_against_every_instruction_once_per_task(tmp_path, caplog):
    path = tmp_path / "mixed.jsonl"
    rows = [
        # 'both': one record's own instruction lacks its key part; masking still changes the others
        {"task": "both", "instruction": "Reply yes or no.", "input": "a", "output": "yes", "key_parts": ["yes or no"]},
        {"task": "both", "instruction": "Reply briefly.", "input": "b", "output": "no", "key_parts": ["yes or no"]},
        {"task": "both", "instruction": "Reply briefly.", "input": "c", "output": "no", "key_parts": ["yes or no"]},
        # 'none': its only key part occurs nowhere, so there is nothing to mask
        {"task": "none", "instruction": "Name a colour.", "input": "d", "output": "red", "key_parts": ["red or blue"]},
        {
            "task": "none",
            "instruction": "Name a colour.",
            "input": "e",
            "output": "blue",
            "key_parts": ["red or blue"],
        },
        # 'clean': every key part found
        {
            "task": "clean",
            "instruction": "Answer in one word.",
            "input": "f",
            "output": "x",
            "key_parts": ["one word"],
        },
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    with caplog.at_level(logging.WARNING):
        tasks = load_jsonl_tasks(path)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2  # one per task with an unmatched key part, not one per record
    both = next(w for w in warnings if "task 'both'" in w)
    assert both.startswith(f"{path}: task 'both': key parts not found in its 2 instructions: ['yes or no']")
    assert "nothing in this task can be masked" not in both
    none = next(w for w in warnings if "task 'none'" in w)
    assert "['red or blue']" in none and "nothing in this task can be masked" in none
    assert (tasks["both"].maskable, tasks["none"].maskable, tasks["clean"].maskable) == (True, False, True)
    assert tasks["none"].key_part_check().unmatched == ["red or blue"]
    assert tasks["clean"].key_part_check().unmatched == []


def test_in_choice_without_labels_is_an_error(tmp_path):
    path = write_task(tmp_path / "nolabels.json")
    with pytest.raises(DataError, match="nolabels.json: task 'nolabels': scope 'In choice' needs"):
        load_superni_task(path, annotation={"metric": "ACC", "scope": "In choice"})


def records():
    return [
        {"task": "a", "instruction": "Say yes.", "input": "q1", "output": "yes", "category": "cat1"},
        {"task": "b", "instruction": "Say no.", "input": "q2", "output": ["no", "nope"]},
        {"task": "a", "instruction": "Say yes.", "input": "q3", "output": "yes", "id": "custom"},
    ]


def test_jsonl_groups_records_into_tasks(tmp_path):
    path = tmp_path / "mix.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records()) + "\n\n")
    tasks = load_jsonl_tasks(path)
    assert list(tasks) == ["a", "b"]
    assert [i.input for i in tasks["a"].instances] == ["q1", "q3"]
    assert tasks["a"].instances[1].id == "custom"
    assert tasks["a"].category == "cat1" and tasks["b"].category == "uncategorized"
    assert tasks["b"].instances[0].outputs == ["no", "nope"]
    assert tasks["b"].definition == "Say no."


def test_jsonl_malformed_line_is_named(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(records()[0]) + "\n{not json\n")
    with pytest.raises(DataError, match=r"bad.jsonl: line 2: malformed JSON"):
        load_jsonl_tasks(path)


def test_jsonl_missing_column_names_record(tmp_path):
    path = tmp_path / "nocol.jsonl"
    path.write_text(json.dumps({"task": "a", "instruction": "x"}) + "\n")
    with pytest.raises(DataError, match=r"nocol.jsonl: task 'a': record 0: missing column 'output'"):
        load_jsonl_tasks(path)


def test_dataset_loader_with_column_mapping_equals_jsonl(tmp_path):
    renamed = [
        {
            "name": r["task"],
            "prompt": r["instruction"],
            "context": r["input"],
            "answer": r["output"] if isinstance(r["output"], list) else [r["output"]],
        }
        for r in records()
    ]
    dataset = Dataset.from_list(renamed)
    tasks = load_dataset_tasks(
        dataset, columns={"task": "name", "instruction": "prompt", "input": "context", "output": "answer"}
    )
    path = tmp_path / "same.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records()))
    reference = load_jsonl_tasks(path)
    assert list(tasks) == list(reference)
    for name in tasks:
        got = [(i.instruction, i.input, i.outputs) for i in tasks[name].instances]
        want = [(i.instruction, i.input, i.outputs) for i in reference[name].instances]
        assert got == want


def test_unknown_column_mapping_key_is_rejected():
    with pytest.raises(DataError, match="unknown field"):
        load_dataset_tasks([], columns={"prompt": "x"})


def test_splits_unknown_task_is_named(tmp_path):
    path = tmp_path / "splits.json"
    path.write_text(json.dumps({"seen": ["a", "ghost"], "held_out": ["b"]}))
    with pytest.raises(DataError, match=r"splits.json: seen names unknown task\(s\): \['ghost'\]"):
        load_splits(path, known_tasks=["a", "b"])
    path.write_text(json.dumps({"seen": ["a"], "held_out": ["a"]}))
    with pytest.raises(DataError, match="both seen and held out"):
        load_splits(path, known_tasks=["a", "b"])


def test_load_tasks_dispatches_on_path(tmp_path):
    write_task(tmp_path / "one.json")
    (tmp_path / "x.jsonl").write_text(json.dumps(records()[0]))
    assert list(load_tasks(tmp_path / "one.json")) == ["one"]
    assert list(load_tasks(tmp_path / "x.jsonl")) == ["a"]
    folder = tmp_path / "dir"
    folder.mkdir()
    write_task(folder / "t1.json")
    write_task(folder / "t2.json")
    assert list(load_tasks(folder)) == ["t1", "t2"]
    with pytest.raises(DataError, match="not a task directory"):
        load_tasks(tmp_path / "x.csv")
