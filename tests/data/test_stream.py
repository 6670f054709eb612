"""Streams: ST / SC orders, deterministic splits, label-balanced tests, the datasets view."""

import collections

import pytest

from kpig_trainer.data import (
    Constraints,
    DataError,
    Instance,
    Task,
    build_stream,
    load_benchmark,
    plan_stages,
    split_task,
)
from kpig_trainer.data.stream import label_key


def make_task(name, category, n=30, labels=("yes", "no"), scope="-"):
    constraints = Constraints(metric="ACC", scope=scope, labels=tuple(labels) if scope == "In choice" else ())
    instances = [
        Instance(f"{name}-{k}", name, f"Instruction of {name}.", f"input {k}", [labels[k % len(labels)]])
        for k in range(n)
    ]
    return Task(name, category, f"Instruction of {name}.", instances, constraints)


@pytest.fixture
def tasks():
    specs = [("t1", "A"), ("t2", "B"), ("t3", "A"), ("t4", "C"), ("t5", "B"), ("h1", "A"), ("h2", "D")]
    return {name: make_task(name, cat) for name, cat in specs}


SEEN = ["t1", "t2", "t3", "t4", "t5"]


def test_st_one_task_per_stage_in_given_order(tasks):
    stream = build_stream(tasks, SEEN, ["h1", "h2"], order="ST")
    assert [s.tasks for s in stream.stages] == [(t,) for t in SEEN]
    assert [s.index for s in stream.stages] == list(range(5))
    assert stream.seen_before(2) == ["t1", "t2"]


def test_sc_groups_by_category_in_first_appearance_order(tasks):
    stream = build_stream(tasks, SEEN, order="SC")
    assert [(s.name, s.tasks) for s in stream.stages] == [("A", ("t1", "t3")), ("B", ("t2", "t5")), ("C", ("t4",))]


def test_sc_explicit_category_order_and_errors(tasks):
    stages = plan_stages(tasks, SEEN, order="SC", categories=["C", "B", "A"])
    assert [s.name for s in stages] == ["C", "B", "A"]
    with pytest.raises(DataError, match=r"categories with no seen task: \['Z'\]"):
        plan_stages(tasks, SEEN, order="SC", categories=["A", "B", "C", "Z"])
    with pytest.raises(DataError, match="missing from the category order"):
        plan_stages(tasks, SEEN, order="SC", categories=["A", "B"])


def test_shuffled_stage_order_is_a_seeded_permutation(tasks):
    first = plan_stages(tasks, SEEN, stage_order="shuffle", seed=1)
    again = plan_stages(tasks, SEEN, stage_order="shuffle", seed=1)
    assert first == again
    assert sorted(t for s in first for t in s.tasks) == sorted(SEEN)
    orders = {tuple(s.tasks[0] for s in plan_stages(tasks, SEEN, stage_order="shuffle", seed=k)) for k in range(10)}
    assert len(orders) > 1


def test_no_stage_and_bad_names_are_errors(tasks):
    with pytest.raises(DataError, match="no stage"):
        build_stream(tasks, [])
    with pytest.raises(DataError, match=r"unknown task\(s\): \['ghost'\]"):
        build_stream(tasks, ["t1", "ghost"])
    with pytest.raises(DataError, match="order must be one of"):
        build_stream(tasks, SEEN, order="XY")


def test_split_is_deterministic_disjoint_and_sized(tasks):
    task = tasks["t1"]
    train, test = split_task(task, seed=3, test_size=0.2)
    again = split_task(task, seed=3, test_size=0.2)
    assert ([i.id for i in train], [i.id for i in test]) == ([i.id for i in again[0]], [i.id for i in again[1]])
    assert len(test) == 6 and len(train) == 24
    assert not {i.id for i in train} & {i.id for i in test}
    other = split_task(task, seed=4, test_size=0.2)
    assert {i.id for i in other[1]} != {i.id for i in test}
    order = {i.id: k for k, i in enumerate(task.instances)}
    assert [order[i.id] for i in test] == sorted(order[i.id] for i in test)


def test_task_split_does_not_depend_on_other_tasks(tasks):
    alone = build_stream({"t3": tasks["t3"]}, ["t3"], seed=7)
    crowd = build_stream(tasks, SEEN, ["h1"], seed=7, stage_order="shuffle")
    assert [i.id for i in alone.test["t3"]] == [i.id for i in crowd.test["t3"]]
    assert [i.id for i in alone.train["t3"]] == [i.id for i in crowd.train["t3"]]


def test_caps_and_counts(tasks):
    stream = build_stream(tasks, SEEN, ["h1"], test_size=10, max_train_instances=7, max_test_instances=8)
    assert all(len(stream.train[t]) == 7 for t in SEEN)
    assert all(len(stream.test[t]) == 8 for t in SEEN)
    assert len(stream.test["h1"]) == 8 and "h1" not in stream.train


def test_a_count_too_large_for_a_task_takes_half_of_it(tasks, caplog):
    # The paper's 100 test instances per task: a 30-instance task gives 15 and trains on 15.
    stream = build_stream(tasks, ["t1", "t2"], test_size=100)
    assert [(len(stream.train[t]), len(stream.test[t])) for t in ("t1", "t2")] == [(15, 15), (15, 15)]
    assert "task 't1': 30 instances cannot give 100 test instances" in caplog.text
    caplog.clear()
    assert len(build_stream(tasks, ["t1"], test_size=100, max_test_instances=8).test["t1"]) == 8
    assert len(build_stream(tasks, ["t1"], test_size=15).test["t1"]) == 15
    assert "cannot give" not in caplog.text
    # A fraction is taken as asked; a task of one instance cannot be split at all.
    assert len(build_stream(tasks, ["t1"], test_size=0.8).train["t1"]) == 6
    with pytest.raises(DataError, match="task 'one': 1 instance"):
        build_stream({"one": make_task("one", "A", n=1)}, ["one"], test_size=100)


def test_paper_test_size_on_the_shipped_benchmark():
    benchmark = load_benchmark("superni-kpig")
    stream = benchmark.stream(test_size=100, max_test_instances=100)
    sizes = {t: len(benchmark.tasks[t].instances) for t in benchmark.seen + benchmark.held_out}
    expected = {t: min(100, sizes[t] // 2) for t in benchmark.seen}
    assert {t: len(stream.test[t]) for t in benchmark.seen} == expected
    assert {t: len(stream.train[t]) for t in benchmark.seen} == {t: sizes[t] - expected[t] for t in benchmark.seen}
    assert all(len(stream.test[t]) == 100 for t in benchmark.held_out)


def test_test_sampling_is_balanced_over_labels():
    # 36 "yes" and 4 "no": a plain sample of 10 would rarely hold 4 "no"; round robin must.
    instances = [
        Instance(f"i{k}", "skew", "Answer yes or no.", str(k), ["No." if k % 10 == 0 else "yes"]) for k in range(40)
    ]
    task = Task(
        "skew", "C", "Answer yes or no.", instances, Constraints(metric="ACC", scope="In choice", labels=("yes", "no"))
    )
    _, test = split_task(task, seed=0, test_size=8)
    counts = collections.Counter(label_key(i.output) for i in test)
    assert counts == {"yes": 4, "no": 4}
    _, test = split_task(task, seed=0, test_size=10)
    assert collections.Counter(label_key(i.output) for i in test) == {"yes": 6, "no": 4}


def test_dataset_dict_view(tasks):
    stream = build_stream(tasks, SEEN, ["h1", "h2"], order="SC", max_test_instances=5)
    dd = stream.to_dataset_dict()
    assert list(dd) == ["stage_1", "stage_2", "stage_3", "test", "held_out"]
    assert dd["stage_1"].num_rows == len(stream.train["t1"]) + len(stream.train["t3"])
    assert set(dd["stage_1"]["task"]) == {"t1", "t3"} and set(dd["stage_1"]["stage"]) == {0}
    assert dd["test"].num_rows == 5 * len(SEEN)
    stage_by_task = dict(zip(dd["test"]["task"], dd["test"]["stage"]))
    assert stage_by_task == {"t1": 0, "t3": 0, "t2": 1, "t5": 1, "t4": 2}
    assert dd["held_out"].num_rows == 10 and set(dd["held_out"]["stage"]) == {-1}
    row = dd["stage_2"][0]
    assert row["outputs"] == stream.train["t2"][0].outputs and row["category"] == "B"
