"""The main job under `accelerate launch` with two gloo processes on the CPU.

Both ranks must select the same replay tasks (scores are sharded and all-gathered), and the
choice must equal that of a single process training with the same effective batch.
"""

import json
from pathlib import Path

import pytest
from launching import accelerate_launch, exit_probe_env, two_processes

from kpig_trainer.continual.state import RunState
from kpig_trainer.testing import save_tiny_llama

TASKS = {"alpha_task": "Colors", "beta_task": "Colors", "gamma_task": "Numbers", "held_task": "Numbers"}

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    folder = tmp_path_factory.mktemp("distributed-run")
    rows = []
    for n, (task, category) in enumerate(TASKS.items()):
        for k in range(12):
            # Tasks differ in wording and answers, so their information gains differ.
            rows.append(
                {
                    "task": task,
                    "category": category,
                    "id": f"{task}-{k}",
                    "instruction": f"Read the text about {task}. "
                    + [
                        "Answer with yes or no only.",
                        "Reply red, green or blue.",
                        "Give one digit.",
                        "Answer yes or no.",
                    ][n],
                    "input": f"text number {k} for {task}",
                    "output": ["yes", "red", str(k % 10), "no"][n],
                    "key_parts": [["yes or no", "red, green or blue", "one digit", "yes or no"][n]],
                }
            )
    (folder / "tasks.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (folder / "splits.json").write_text(
        json.dumps({"seen": ["alpha_task", "beta_task", "gamma_task"], "held_out": ["held_task"]})
    )
    model = save_tiny_llama(folder / "tiny", seed=0)
    lines = [
        f"model_name_or_path: {model}",
        f"tasks: {folder / 'tasks.jsonl'}",
        f"splits: {folder / 'splits.json'}",
        "method: kpig",
        "replay_strategy: kpig",
        "test_size: 4",
        "evaluation: loss",
        "replay_tasks: 1",
        "replay_instances: 4",
        "learning_rate: 5.0e-3",
        "num_train_epochs: 1",
        "gradient_accumulation_steps: 1",
        "lr_scheduler_type: constant",
        "max_length: 128",
        "logging_steps: 1",
        "save_strategy: 'no'",
        "report_to: none",
        "seed: 0",
        "disable_tqdm: true",
        "eval_batch_size: 4",
    ]
    (folder / "recipe.yaml").write_text("\n".join(lines) + "\n")
    return folder


def replay_log(out: Path, rank: int = 0) -> list[dict]:
    name = "replay.jsonl" if rank == 0 else f"replay.rank{rank}.jsonl"
    return [json.loads(line) for line in (out / "logs" / name).read_text().splitlines()]


def test_two_processes_choose_the_same_replay_as_each_other_and_as_one(recipe, tmp_path):
    two, one = tmp_path / "two", tmp_path / "one"
    result = accelerate_launch(
        [
            *two_processes(),
            "examples/cit.py",
            "--recipe",
            str(recipe / "recipe.yaml"),
            "--output_dir",
            str(two),
            "--per_device_train_batch_size",
            "2",
        ],
        tmp_path,
    )
    assert "run directory" in result.stdout  # the table and the path are printed once, by rank 0
    # One process, same effective batch (2 x 2 = 4).
    accelerate_launch(
        [
            "--config_file",
            "recipes/accelerate/cpu.yaml",
            "examples/cit.py",
            "--recipe",
            str(recipe / "recipe.yaml"),
            "--output_dir",
            str(one),
            "--per_device_train_batch_size",
            "4",
        ],
        tmp_path,
    )

    rank0, rank1, single = replay_log(two, 0), replay_log(two, 1), replay_log(one)
    assert [r["stage"] for r in rank0] == [2, 3]
    # Identical across ranks, scores included: each rank scored half and all-gathered.
    for a, b in zip(rank0, rank1):
        assert a["tasks"] == b["tasks"] and a["instances"] == b["instances"] and a["scores"] == b["scores"]
    state = RunState.load(two / "state.json")
    assert state.completed == 3
    assert [state.replay[str(s)]["tasks"] for s in (1, 2)] == [r["tasks"] for r in rank0]
    # The lowest mean IG of the logged table is chosen, and a single process agrees.
    for mine, theirs in zip(rank0, single):
        scores = mine["scores"]
        assert mine["tasks"] == [min(scores, key=lambda t: (scores[t], t))]
        assert set(scores) == set(theirs["scores"])
        for task in scores:
            assert scores[task] == pytest.approx(theirs["scores"][task], abs=2e-3)
        assert mine["tasks"] == theirs["tasks"] and mine["instances"] == theirs["instances"]
    # Both processes wrote their own log; the Trainer's records are on rank 0 only.
    assert (two / "logs" / "run.log").read_text() and (two / "logs" / "run.rank1.log").read_text()
    records = [json.loads(line) for line in (two / "logs" / "train.jsonl").read_text().splitlines()]
    assert {r["stage"] for r in records} == {1, 2, 3} and all("loss" in r or "train_runtime" in r for r in records)


def test_two_process_main_job_exits_cleanly_on_every_rank(recipe, tmp_path):
    """Every rank ends its process group before the interpreter exits, and exits 0.

    A group left alive aborts a rank at exit now and then (SIGABRT from a gloo worker thread
    during finalization); the exit probe reports the live group on every run, so this fails
    every time the main job forgets to end it, not only when the race is lost.
    """
    probe = tmp_path / "probe"
    result = accelerate_launch(
        [
            *two_processes(),
            "examples/cit.py",
            "--recipe",
            str(recipe / "recipe.yaml"),
            "--output_dir",
            str(tmp_path / "run"),
            "--per_device_train_batch_size",
            "2",
            "--max_stages",
            "2",
        ],
        tmp_path,
        env=exit_probe_env(probe),
    )
    assert result.returncode == 0 and "terminate called" not in result.stderr
    records = sorted((json.loads(p.read_text()) for p in probe.glob("rank*.json")), key=lambda r: r["rank"])
    assert records == [{"rank": 0, "process_group_alive": False}, {"rank": 1, "process_group_alive": False}]
    assert RunState.load(tmp_path / "run" / "state.json").completed == 2
