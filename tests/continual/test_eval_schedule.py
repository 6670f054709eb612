"""What a continual run evaluates: eval_tasks, eval_init, eval_split validation, and the stream
chosen by seen_tasks / held_out_tasks."""

import json

import pytest
from tiny_runs import tiny_training

from kpig_trainer.continual.arguments import load_stream
from kpig_trainer.continual.runner import ContinualArguments, ContinualRunner
from kpig_trainer.data.records import DataError
from kpig_trainer.kpig.config import KPIGConfig

SEEN = ["alpha_task", "beta_task", "gamma_task"]
TASKS = [*SEEN, "held_task", "spare_task"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("schedule-data")
    rows = [
        {
            "task": task,
            "category": "Colors",
            "id": f"{task}-{k}",
            "instruction": f"Read the text about {task}. Answer with yes or no only.",
            "input": f"text number {k} for {task}",
            "output": "yes" if k % 3 else "no",
        }
        for task in TASKS
        for k in range(16)
    ]
    (folder / "tasks.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (folder / "splits.json").write_text(json.dumps({"seen": SEEN, "held_out": ["held_task"]}))
    return folder


@pytest.fixture(autouse=True)
def tiny_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("KPIG_CACHE", str(tmp_path_factory.getbasetemp() / "kpig-cache"))


def arguments(data_dir, **overrides):
    return ContinualArguments(
        **{
            "model_name_or_path": "tiny-llama",
            "tasks": str(data_dir / "tasks.jsonl"),
            "splits": str(data_dir / "splits.json"),
            "method": "sft",
            "test_size": 4,
            "max_train_instances": 6,
            **overrides,
        }
    )


def make_runner(data_dir, out, evaluate_fn=None, **overrides):
    training = tiny_training(out)
    continual = {k: v for k, v in overrides.items() if k in ContinualArguments.__dataclass_fields__}
    training.update({k: v for k, v in overrides.items() if k not in continual})
    return ContinualRunner(arguments(data_dir, **continual), KPIGConfig(**training), evaluate_fn=evaluate_fn)


def recording_evaluation(calls):
    """An evaluation that records which test sets each row was given (and scores a loss of 0)."""

    def evaluate(model, tokenizer, stream, stage):
        calls.append((stage, sorted(stream.test), list(stream.held_out)))
        return {"test_loss": {t: 0.0 for t in stream.test}}

    return evaluate


@pytest.mark.parametrize(
    "eval_tasks, eval_init, expected",
    [
        ("all", True, [(-1, TASKS[:4]), (0, TASKS[:4]), (1, TASKS[:4]), (2, TASKS[:4])]),
        ("trained", True, [(-1, TASKS[:4]), (0, ["alpha_task"]), (1, ["alpha_task", "beta_task"]), (2, TASKS[:4])]),
        ("trained", False, [(0, ["alpha_task"]), (1, ["alpha_task", "beta_task"]), (2, TASKS[:4])]),
        ("final", False, [(2, TASKS[:4])]),
    ],
)
def test_each_row_scores_the_tasks_eval_tasks_names(data_dir, tmp_path, eval_tasks, eval_init, expected):
    calls = []
    state = make_runner(
        data_dir, tmp_path / "run", recording_evaluation(calls), eval_tasks=eval_tasks, eval_init=eval_init
    ).run()
    assert [(stage, tasks) for stage, tasks, _ in calls] == [(s, sorted(t)) for s, t in expected]
    # Held-out tasks only where every task is scored.
    assert all(held == (["held_task"] if len(tasks) == 4 else []) for _, tasks, held in calls)
    keys = ["init" if s < 0 else str(s + 1) for s, _ in expected]
    assert list(state.evaluation) == keys
    assert state.completed == 3


def test_a_trained_only_run_still_gives_bwt_and_forgetting(data_dir, tmp_path):
    from kpig_trainer.evaluation.report import read_report

    make_runner(
        data_dir, tmp_path / "gen", evaluation="generate", eval_ig=False, eval_tasks="trained", eval_init=False
    ).run()
    report = read_report(tmp_path / "gen")
    rows = report["matrix"]["rows"]
    assert [r["label"] for r in rows] == ["stage 1", "stage 2", "stage 3"]
    assert set(rows[0]["cells"]) == {"alpha_task"} and set(rows[2]["cells"]) == set(TASKS[:4])
    # BWT from the cells that exist: the last row minus each task's own-stage row.
    expected = (
        sum(rows[2]["cells"][t]["performance"] - rows[k]["cells"][t]["performance"] for k, t in enumerate(SEEN[:2]))
        / 2
    )
    metrics = report["matrix"]["metrics"]
    assert metrics["bwt"] == pytest.approx(expected) and metrics["forgetting"] is not None
    assert metrics["fwt"] is None  # no init row, no forward transfer


def test_validation_split_is_carved_from_training_data_beyond_the_cap(data_dir):
    test_mode = load_stream(arguments(data_dir), seed=0)
    valid = load_stream(arguments(data_dir, eval_split="validation", validation_size=3), seed=0)
    assert valid.held_out == [] and set(valid.test) == set(SEEN)
    for task in SEEN:
        ids = lambda instances: [i.id for i in instances]  # noqa: E731
        # The same training set as the test-mode run, and a disjoint evaluation set.
        assert ids(valid.train[task]) == ids(test_mode.train[task])
        assert len(valid.test[task]) == 3
        assert not set(ids(valid.test[task])) & set(ids(valid.train[task]))
        assert not set(ids(valid.test[task])) & set(ids(test_mode.test[task]))  # never a test instance


def test_validation_needs_enough_training_instances(data_dir):
    with pytest.raises(DataError, match="validation_size=12"):  # 12 left after the test split: 6 + 12 > 12
        load_stream(arguments(data_dir, eval_split="validation", validation_size=12), 0)
    with pytest.raises(DataError, match="needs max_train_instances"):
        load_stream(arguments(data_dir, eval_split="validation", max_train_instances=None), 0)
    with pytest.raises(ValueError, match="eval_split"):
        arguments(data_dir, eval_split="dev")
    with pytest.raises(ValueError, match="eval_tasks"):
        arguments(data_dir, eval_tasks="some")


def test_seen_and_held_out_tasks_choose_the_stream(data_dir):
    stream = load_stream(
        arguments(data_dir, seen_tasks=["gamma_task", "alpha_task"], held_out_tasks=["spare_task"]), 0
    )
    assert [list(s.tasks) for s in stream.stages] == [["gamma_task"], ["alpha_task"]]
    assert stream.held_out == ["spare_task"] and set(stream.test) == {"gamma_task", "alpha_task", "spare_task"}
    with pytest.raises(DataError, match=r"seen_tasks names task\(s\).*'nope'"):
        load_stream(arguments(data_dir, seen_tasks=["alpha_task", "nope"]), 0)
    with pytest.raises(DataError, match="held_out_tasks"):
        load_stream(arguments(data_dir, held_out_tasks=["nope"]), 0)


def test_schedule_options_change_the_fingerprint_only_when_set(data_dir, tmp_path):
    base = make_runner(data_dir, tmp_path / "a").fingerprint()
    assert make_runner(data_dir, tmp_path / "b", eval_tasks="all", eval_init=True).fingerprint() == base
    assert make_runner(data_dir, tmp_path / "c", eval_tasks="trained").fingerprint() != base
    assert make_runner(data_dir, tmp_path / "d", eval_init=False).fingerprint() != base
