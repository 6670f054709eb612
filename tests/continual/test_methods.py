"""Training methods and replay strategies as plug-ins: a custom method and a custom replay
strategy, registered or passed as objects, run end to end on the tiny model."""

import json

import pytest
import torch
from tiny_runs import tiny_training

from kpig_trainer.continual.methods import ContinualMethod, method_names, register_method
from kpig_trainer.continual.replay import ReplayChoice, ReplayStrategy
from kpig_trainer.continual.runner import ContinualArguments, ContinualRunner
from kpig_trainer.kpig.config import KPIGConfig

SEEN = ["alpha_task", "beta_task", "gamma_task"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("methods-data")
    rows = [
        {
            "task": task,
            "category": "Colors",
            "id": f"{task}-{k}",
            "instruction": f"Read the text about {task}. Answer with yes or no only.",
            "input": f"text number {k} for {task}",
            "output": "yes" if k % 3 else "no",
            "key_parts": ["Answer with yes or no only"],
        }
        for task in SEEN
        for k in range(12)
    ]
    (folder / "tasks.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return folder


@pytest.fixture(autouse=True)
def isolated(tmp_path_factory, monkeypatch):
    import kpig_trainer.continual.methods as methods

    monkeypatch.setenv("KPIG_CACHE", str(tmp_path_factory.getbasetemp() / "kpig-cache"))
    monkeypatch.setattr(methods, "_METHODS", dict(methods._METHODS))  # registrations stay in the test


def make_runner(data_dir, out, name="sft", **kwargs):
    args = ContinualArguments(
        model_name_or_path="tiny-llama",
        tasks=str(data_dir / "tasks.jsonl"),
        method=name,
        test_size=4,
        evaluation="loss",
    )
    training = KPIGConfig(**tiny_training(out, per_device_train_batch_size=2, replay_tasks=1, replay_instances=2))
    return ContinualRunner(args, training, **kwargs)


def steps_per_stage(out):
    steps = {}
    for line in (out / "logs" / "train.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            steps[record["stage"]] = steps.get(record["stage"], 0) + 1
    return steps


class Halves(ContinualMethod):
    """Trains on the first half of each stage's instances and counts the stages it trained."""

    name = "halves"

    def __init__(self, args=None):
        super().__init__(args)
        self.trained = 0
        self.sizes = []

    def stage_instances(self, runner, stage, instances):
        self.sizes.append(len(instances) // 2)
        return instances[: len(instances) // 2]

    def after_stage(self, runner, stage, trainer):
        self.trained += 1

    def state_dict(self):
        return {"trained": self.trained}

    def load_state_dict(self, state):
        self.trained = state["trained"]


def test_a_registered_method_runs_end_to_end_and_carries_its_state(data_dir, tmp_path):
    with pytest.raises(ValueError, match="method must be one of"):
        ContinualArguments(method="halves")
    register_method(Halves)
    assert "halves" in method_names()
    runner = make_runner(data_dir, tmp_path / "run", "halves")
    state = runner.run()
    assert state.completed == 3 and runner.method.trained == 3
    # 8 training instances per task, halved: 4 per stage, 2 steps of 2.
    assert runner.method.sizes == [4, 4, 4] and steps_per_stage(tmp_path / "run") == {1: 2, 2: 2, 3: 2}
    saved = torch.load(tmp_path / "run" / "stages" / "stage_03" / "extra.pt", weights_only=False)
    assert saved == {"trained": 3}
    resumed = make_runner(data_dir, tmp_path / "run", "halves")
    resumed._load_model()  # a resumed run gets the method's state back from the last stage
    assert resumed.method.trained == 3


class LastTaskReplay(ReplayStrategy):
    """Replays the first ``keep`` training instances of the most recently trained task."""

    name = "last-task"

    def __init__(self, keep):
        self.keep = keep

    def select(self, request, scorer=None):
        task = request.seen_tasks[-1]
        return ReplayChoice(self.name, [task], list(request.candidates[task][: self.keep]), {task: 0.0})


def test_method_and_replay_strategy_objects_run_end_to_end(data_dir, tmp_path):
    register_method(Halves)
    method, strategy = Halves(), LastTaskReplay(keep=3)
    runner = make_runner(data_dir, tmp_path / "objects", "halves", method=method, replay_strategy=strategy)
    state = runner.run()
    assert runner.method is method and runner.args.replay_strategy == "last-task"
    stream = runner.stream
    for stage in (1, 2):
        previous = SEEN[stage - 1]
        expected = [[previous, i.id] for i in stream.train[previous][:3]]
        assert state.replay[str(stage)]["instances"] == expected
    # Stage 2 trains on half of (8 own + 3 replayed) instances: 5, in 3 steps of 2.
    assert method.sizes == [4, 5, 5] and steps_per_stage(tmp_path / "objects") == {1: 2, 2: 3, 3: 3}
    with pytest.raises(ValueError, match="args.method is 'sft'"):
        make_runner(data_dir, tmp_path / "bad", "sft", method=Halves())
