"""The continual loop: stages, replay, methods, checkpoints, and resume after a kill."""

import json

import pytest
import torch
from safetensors.torch import load_file
from tiny_runs import tiny_training
from transformers import TrainerCallback

from kpig_trainer.continual.runner import ContinualArguments, ContinualRunner
from kpig_trainer.continual.state import RunState
from kpig_trainer.kpig.config import KPIGConfig

TASKS = {"alpha_task": "Colors", "beta_task": "Colors", "gamma_task": "Numbers", "held_task": "Numbers"}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("continual-data")
    rows = []
    for task, category in TASKS.items():
        for k in range(12):
            rows.append(
                {
                    "task": task,
                    "category": category,
                    "id": f"{task}-{k}",
                    "instruction": f"Read the text about {task}. Answer with yes or no only.",
                    "input": f"text number {k} for {task}",
                    "output": "yes" if k % 3 else "no",
                    "key_parts": ["Answer with yes or no only"],
                }
            )
    (folder / "tasks.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (folder / "splits.json").write_text(
        json.dumps({"seen": ["alpha_task", "beta_task", "gamma_task"], "held_out": ["held_task"]})
    )
    return folder


@pytest.fixture(autouse=True)
def tiny_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("KPIG_CACHE", str(tmp_path_factory.getbasetemp() / "kpig-cache"))


def make_runner(data_dir, out, method="kpig", callbacks=None, evaluate_fn=None, **overrides):
    continual = dict(
        model_name_or_path="tiny-llama",
        tasks=str(data_dir / "tasks.jsonl"),
        splits=str(data_dir / "splits.json"),
        method=method,
        test_size=4,
        keep_last_stages=2,
        evaluation="loss",
    )
    training = tiny_training(out, replay_tasks=1, replay_instances=2)
    for key, value in overrides.items():
        (continual if key in ContinualArguments.__dataclass_fields__ else training)[key] = value
    return ContinualRunner(
        ContinualArguments(**continual), KPIGConfig(**training), evaluate_fn=evaluate_fn, callbacks=callbacks
    )


def final_weights(out, stage=3):
    return load_file(str(out / "stages" / f"stage_{stage:02d}" / "model" / "model.safetensors"))


def test_kpig_run_trains_every_stage_with_lowest_ig_replay(data_dir, tmp_path):
    state = make_runner(data_dir, tmp_path / "run").run()
    assert state.completed == 3 and state.stages == ["alpha_task", "beta_task", "gamma_task"]
    # stage 2 can only replay alpha_task; stage 3 replays the seen task with the lowest IG
    assert state.replay["1"]["tasks"] == ["alpha_task"] and len(state.replay["1"]["instances"]) == 2
    scores = state.replay["2"]["scores"]
    assert set(scores) == {"alpha_task", "beta_task"}
    assert state.replay["2"]["tasks"] == [min(scores, key=lambda t: (scores[t], t))]
    assert set(state.evaluation) == {"init", "1", "2", "3"}
    assert set(state.evaluation["3"]["test_loss"]) == set(TASKS)
    on_disk = RunState.load(tmp_path / "run" / "state.json")
    assert on_disk.completed == 3 and on_disk.replay == state.replay
    stages = sorted(p.name for p in (tmp_path / "run" / "stages").iterdir())
    assert stages == ["stage_01", "stage_02", "stage_03"]
    assert not (tmp_path / "run" / "stages" / "stage_01" / "model").exists()  # keep_last_stages=2
    assert (tmp_path / "run" / "stages" / "stage_03" / "model" / "model.safetensors").exists()
    assert not (tmp_path / "run" / "stages" / "stage_03" / "trainer").exists()
    # training moved the weights, and the stage-2 loss on alpha_task's test split is recorded
    assert state.evaluation["3"]["test_loss"]["alpha_task"] != state.evaluation["init"]["test_loss"]["alpha_task"]


MID_STAGE_SAVES = {"save_strategy": "steps", "save_steps": 2}


class Crash(RuntimeError):
    pass


class CrashAt(TrainerCallback):
    """Raises at the end of a given step of the n-th trainer it sees (a kill mid-stage)."""

    def __init__(self, trainer_index, step):
        self.trainer_index, self.step, self.seen = trainer_index, step, 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.seen += 1

    def on_step_end(self, args, state, control, **kwargs):
        if self.seen == self.trainer_index and state.global_step == self.step:
            raise Crash(f"killed at step {self.step}")


def test_resume_after_a_kill_mid_stage_equals_an_uninterrupted_run(data_dir, tmp_path):
    reference = make_runner(data_dir, tmp_path / "a", **MID_STAGE_SAVES).run()
    # stage 2 has 8 + 2 replayed instances: 3 steps; checkpoint-2 exists when step 3 crashes
    with pytest.raises(Crash):
        make_runner(data_dir, tmp_path / "b", callbacks=[CrashAt(2, 3)], **MID_STAGE_SAVES).run()
    crashed = RunState.load(tmp_path / "b" / "state.json")
    assert crashed.completed == 1
    assert (tmp_path / "b" / "stages" / "stage_02" / "trainer" / "checkpoint-2").is_dir()
    resumed = make_runner(data_dir, tmp_path / "b", **MID_STAGE_SAVES).run()
    assert resumed.replay == reference.replay
    for key in reference.evaluation:
        assert resumed.evaluation[key]["test_loss"] == pytest.approx(reference.evaluation[key]["test_loss"], abs=1e-5)
    want, got = final_weights(tmp_path / "a"), final_weights(tmp_path / "b")
    assert want.keys() == got.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-5)


def test_resume_after_a_kill_between_stages(data_dir, tmp_path, monkeypatch):
    reference = make_runner(data_dir, tmp_path / "a", method="sft", replay_strategy="random").run()
    restore = crash_after_finishing(1, monkeypatch)
    with pytest.raises(Crash):
        make_runner(data_dir, tmp_path / "b", method="sft", replay_strategy="random").run()
    restore()
    assert RunState.load(tmp_path / "b" / "state.json").completed == 2
    resumed = make_runner(data_dir, tmp_path / "b", method="sft", replay_strategy="random").run()
    assert resumed.replay == reference.replay
    want, got = final_weights(tmp_path / "a"), final_weights(tmp_path / "b")
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-5)


def crash_after_finishing(stage_index, monkeypatch):
    """Make the run die right after it has finished (and checkpointed) stage ``stage_index``."""
    from kpig_trainer.continual import state as run_state

    original = run_state.RunDirectory.finish_stage

    def finish_then_die(self, stage, keep_last):
        original(self, stage, keep_last)
        if stage == stage_index:
            raise Crash("killed between stages")

    monkeypatch.setattr(run_state.RunDirectory, "finish_stage", finish_then_die)
    return lambda: monkeypatch.setattr(run_state.RunDirectory, "finish_stage", original)


def test_a_resumed_run_shows_its_rows_in_stage_order(data_dir, tmp_path, monkeypatch):
    from kpig_trainer.continual.table import stage_table
    from kpig_trainer.evaluation.evaluate import EvalResult
    from kpig_trainer.evaluation.report import read_report

    options = dict(method="sft", replay_strategy="random", evaluation="generate")
    restore = crash_after_finishing(1, monkeypatch)
    with pytest.raises(Crash):
        make_runner(data_dir, tmp_path / "run", **options).run()
    restore()
    state = make_runner(data_dir, tmp_path / "run", **options).run()
    order = ["init", "1", "2", "3"]
    assert list(state.evaluation) == order
    assert list(RunState.load(tmp_path / "run" / "state.json").evaluation) == order
    raw = json.loads((tmp_path / "run" / "state.json").read_text())
    assert list(raw["evaluation"]) == order  # the file itself, as a person reads it
    table = stage_table(state).splitlines()
    assert [line.split("  ")[0] for line in table[2:]] == ["start", "stage 1", "stage 2", "stage 3"]
    report = read_report(tmp_path / "run")
    assert report["matrix"]["initial"]["label"] == "init"
    assert [r["label"] for r in report["matrix"]["rows"]] == ["stage 1", "stage 2", "stage 3"]
    # The headline is the final stage's evaluation, not the last row read from disk.
    final = EvalResult.from_dict({**state.evaluation["3"], "predictions": {}}).summary()
    assert report["summary"]["seen"]["p_score"] == pytest.approx(final["seen"]["p_score"])
    assert report["summary"]["held_out"]["v_score"] == pytest.approx(final["held_out"]["v_score"])
    markdown = (tmp_path / "run" / "report.md").read_text()
    matrix_rows = [
        line.split("|")[1].strip()
        for line in markdown.split("Performance after each stage")[1].split("\n\n")[1].splitlines()[2:]
    ]
    assert matrix_rows == ["init", "stage 1", "stage 2", "stage 3"]
    assert {"heatmap_performance.png", "scores_over_stages.png"} <= set(report["plots"])


def test_a_missing_model_path_stops_the_run_with_a_clear_error(data_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="'/nonexistent': no such local folder"):
        make_runner(data_dir, tmp_path / "run", model_name_or_path="/nonexistent").run()


def test_a_run_directory_refuses_other_settings(data_dir, tmp_path):
    make_runner(data_dir, tmp_path / "run", method="init").run()
    with pytest.raises(ValueError, match="holds a run with other settings"):
        make_runner(data_dir, tmp_path / "run", method="init", learning_rate=1e-4)


@pytest.mark.parametrize(
    "method, extra",
    [
        ("sft", {}),
        ("lora", {}),
        ("l2", {"regularization_weight": 10.0}),
        ("ewc", {"fisher_batches": 2}),
        ("multi", {}),
        ("init", {}),
        ("kpig", {"replay_strategy": "entropy"}),
    ],
)
def test_every_method_runs(data_dir, tmp_path, method, extra):
    state = make_runner(data_dir, tmp_path / method, method=method, **extra).run()
    if method == "init":
        assert state.completed == 0 and set(state.evaluation) == {"init"}
        return
    expected = 1 if method == "multi" else 3
    assert state.completed == expected
    assert state.stages == (["multi"] if method == "multi" else ["alpha_task", "beta_task", "gamma_task"])
    if method in ("l2", "ewc"):
        extra_state = torch.load(tmp_path / method / "stages" / "stage_03" / "extra.pt", weights_only=False)
        assert set(extra_state) == ({"anchor", "fisher"} if method == "ewc" else {"anchor"})
    if method == "lora":
        assert (tmp_path / method / "stages" / "stage_03" / "model" / "adapter_config.json").exists()


def test_similarity_replay_equals_a_direct_selection(data_dir, tmp_path):
    from kpig_trainer.selection.selector import InstructionSelector

    state = make_runner(data_dir, tmp_path / "sim", method="sft", replay_strategy="similarity", replay_tasks=1).run()
    runner = make_runner(data_dir, tmp_path / "sim", method="sft", replay_strategy="similarity", replay_tasks=1)
    selector = InstructionSelector(tasks=runner.stream.tasks, show_progress=False)
    direct = selector.select_tasks("gamma_task", ["alpha_task", "beta_task"], 1)
    assert state.replay["2"]["tasks"] == [direct[0][0]]
    assert state.replay["2"]["scores"][direct[0][0]] == pytest.approx(direct[0][1], abs=1e-6)
    assert state.replay["1"]["tasks"] == ["alpha_task"]


def test_generation_evaluation_fills_the_matrix_and_the_report(data_dir, tmp_path):
    from kpig_trainer.continual.table import stage_table
    from kpig_trainer.evaluation.report import read_report

    state = make_runner(data_dir, tmp_path / "gen", method="sft", evaluation="generate", eval_ig=True).run()
    assert set(state.evaluation) == {"init", "1", "2", "3"}
    assert set(state.evaluation["2"]["scores"]) == set(TASKS)
    assert all(v is not None for v in state.evaluation["3"]["ig"].values())
    report = read_report(tmp_path / "gen")
    assert report["kind"] == "continual"
    assert [r["label"] for r in report["matrix"]["rows"]] == ["stage 1", "stage 2", "stage 3"]
    assert (tmp_path / "gen" / "report.md").exists() and report["plots"]
    predictions = json.loads((tmp_path / "gen" / "predictions" / "stage_03.json").read_text())
    assert set(predictions) == set(TASKS)
    assert len(predictions["held_task"]) == 12 and len(predictions["alpha_task"]) == 4  # held-out: every instance
    table = stage_table(state)
    assert "seen P" in table and "held-out V" in table and "alpha_task" in table


def test_insta_selection_trains_on_the_most_similar_tasks(data_dir):
    from kpig_trainer.continual.runner import load_stream
    from kpig_trainer.data import load_jsonl_tasks
    from kpig_trainer.selection.selector import InstructionSelector

    args = ContinualArguments(
        tasks=str(data_dir / "tasks.jsonl"),
        splits=str(data_dir / "splits.json"),
        insta_target="held_task",
        insta_k=2,
        method="sft",
    )
    stream = load_stream(args, seed=0)
    tasks = load_jsonl_tasks(data_dir / "tasks.jsonl")
    direct = InstructionSelector(tasks=tasks, show_progress=False).select_tasks(
        "held_task", ["alpha_task", "beta_task", "gamma_task"], 2
    )
    assert stream.seen == [t for t, _ in direct] and stream.held_out == ["held_task"]
    assert [s.tasks for s in stream.stages] == [(t,) for t, _ in direct]


def _sampled(runner, stage, task):
    """The N instances of ``task`` a strategy sees at the boundary before ``stage`` (documented
    seeding: ``random.Random(f"{seed}/{stage}/{task}")``)."""
    import random

    pool = list(runner.stream.train[task])
    return random.Random(f"0/{stage}/{task}").sample(pool, min(2, len(pool)))


def _ids(instances):
    return [[i.task, i.id] for i in instances]


@pytest.mark.parametrize("strategy", ["none", "all", "random", "entropy"])
def test_replay_sets_are_what_each_strategy_defines(data_dir, tmp_path, strategy):
    import random

    runner = make_runner(data_dir, tmp_path / strategy, method="sft", replay_strategy=strategy, keep_last_stages=0)
    state = runner.run()
    assert state.completed == 3
    for stage, seen in ((1, ["alpha_task"]), (2, ["alpha_task", "beta_task"])):
        choice = state.replay[str(stage)]
        if strategy == "none":
            assert choice["tasks"] == [] and choice["instances"] == []
        elif strategy == "all":
            assert choice["tasks"] == seen
            assert choice["instances"] == [x for t in seen for x in _ids(_sampled(runner, stage, t))]
        elif strategy == "random":
            tasks = random.Random(f"0/{stage}/random-tasks").sample(seen, 1)
            assert choice["tasks"] == tasks
            assert choice["instances"] == _ids(_sampled(runner, stage, tasks[0]))
    if strategy == "random":  # seeded: a second run chooses the same
        again = make_runner(data_dir, tmp_path / "again", method="sft", replay_strategy="random").run()
        assert again.replay == state.replay
    if strategy == "entropy":
        # Recompute, one instance at a time with a plain loop, the mean predictive entropy of each
        # candidate's response under the stage-2 model; the M x N = 2 highest are replayed.
        from kpig_trainer.kpig.collator import KPIGDataCollator
        from kpig_trainer.models import load_model_and_tokenizer

        model, tokenizer = load_model_and_tokenizer(tmp_path / strategy / "stages" / "stage_02" / "model")
        model.eval()
        collate = KPIGDataCollator(tokenizer, max_length=128, with_masked=False)
        entropies = {}
        for task in ("alpha_task", "beta_task"):
            for instance in _sampled(runner, 2, task):
                batch = collate([instance])
                with torch.no_grad():
                    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[0]
                labels = batch["labels"][0].tolist()
                values = []
                for t in range(1, len(labels)):
                    if labels[t] != -100:
                        p = torch.softmax(logits[t - 1].double(), dim=-1)
                        values.append(float(-(p * p.log()).sum()))
                entropies[(task, instance.id)] = sum(values) / len(values)
        top = sorted(entropies, key=lambda key: -entropies[key])[:2]
        assert sorted(map(tuple, state.replay["2"]["instances"])) == sorted(top)
