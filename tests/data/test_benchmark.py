"""The shipped benchmark: every task annotated, key parts verbatim, labels cover the outputs."""

import json
from pathlib import Path

import pytest

from kpig_trainer.data import load_annotations, load_benchmark
from kpig_trainer.data.benchmark import BENCHMARK_DIR, demo_selection

TABLES = json.loads((Path(__file__).parents[1] / "fixtures" / "kpig_tables.json").read_text())
PAPER = {row["file"][: -len(".json")]: row for row in TABLES}
ANNOTATIONS = load_annotations()
SPLITS = json.loads((BENCHMARK_DIR / "splits.json").read_text())
TASK_FILES = {p.stem: p for p in (BENCHMARK_DIR / "tasks").glob("*.json")}


def definition(name):
    return json.loads(TASK_FILES[name].read_text())["Definition"][0]


def outputs(name):
    return [o for inst in json.loads(TASK_FILES[name].read_text())["Instances"] for o in inst["output"]]


def norm(text):
    return text.strip().casefold().rstrip(".").strip()


def test_every_shipped_task_is_annotated_with_the_papers_fields():
    assert len(TASK_FILES) == 101
    assert set(ANNOTATIONS) == set(TASK_FILES) == set(PAPER)
    for name, entry in ANNOTATIONS.items():
        for field in ("paper_name", "category", "metric", "scope", "format", "usage"):
            assert entry[field] == PAPER[name][field], (name, field)


def test_usage_agrees_with_the_split():
    assert len(SPLITS["seen"]) == 74 and len(SPLITS["held_out"]) == 27
    assert {n for n, e in ANNOTATIONS.items() if e["usage"] == "train"} == set(SPLITS["seen"])
    assert {n for n, e in ANNOTATIONS.items() if e["usage"] == "test"} == set(SPLITS["held_out"])


@pytest.mark.parametrize("name", sorted(TASK_FILES))
def test_key_parts_are_verbatim_spans_of_the_definition(name):
    text = definition(name)
    for part in ANNOTATIONS[name]["key_parts"]:
        assert part.strip(), name
        assert part in text, (name, part)
        assert part.strip() != text.strip(), name


@pytest.mark.parametrize("name", sorted(n for n, e in ANNOTATIONS.items() if e["scope"] == "In choice"))
def test_in_choice_labels_cover_every_output(name):
    labels = ANNOTATIONS[name]["labels"]
    assert labels, name
    allowed = {norm(label) for label in labels}
    stray = sorted({o for o in outputs(name) if norm(o) not in allowed})
    assert not stray, (name, stray[:5])


def test_other_scopes_have_no_labels():
    for name, entry in ANNOTATIONS.items():
        if entry["scope"] != "In choice":
            assert entry["labels"] == [], name


def test_demo_subset_is_annotated_and_sized():
    demo = demo_selection()
    assert 8 <= len(demo["seen"]) <= 12 and 6 <= len(demo["held_out"]) <= 8
    for name in demo["seen"]:
        assert ANNOTATIONS[name]["usage"] == "train", name
    for name in demo["held_out"]:
        assert ANNOTATIONS[name]["usage"] == "test", name
    for name in demo["seen"] + demo["held_out"]:
        assert ANNOTATIONS[name]["key_parts"], f"demo task {name} needs hand-written key parts"
        assert (
            len(json.loads(TASK_FILES[name].read_text())["Instances"])
            >= demo["max_train_instances"] + demo["max_test_instances"]
        )


def test_demo_benchmark_builds_its_stream():
    demo = demo_selection()
    bench = load_benchmark("demo")
    stream = bench.stream()
    assert [s.tasks[0] for s in stream.stages] == demo["seen"]
    assert all(len(stream.train[t]) == demo["max_train_instances"] for t in demo["seen"])
    assert all(len(stream.test[t]) == demo["max_test_instances"] for t in demo["seen"] + demo["held_out"])
    for name in demo["seen"]:
        assert stream.tasks[name].key_parts == ANNOTATIONS[name]["key_parts"]
        assert stream.tasks[name].constraints.metric == PAPER[name]["metric"]


def test_full_benchmark_streams_match_the_papers_split():
    bench = load_benchmark("superni-kpig")
    assert len(bench.tasks) == 101
    st = bench.stream(order="ST")
    assert len(st.stages) == 74
    sc = bench.stream(order="SC")
    seen_categories = {PAPER[n]["category"] for n in SPLITS["seen"]}
    assert len(sc.stages) == len(seen_categories)
    for stage in sc.stages:
        assert {PAPER[t]["category"] for t in stage.tasks} == {stage.name}
