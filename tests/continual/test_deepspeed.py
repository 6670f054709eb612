"""DeepSpeed ZeRO-2 / ZeRO-3 with two CPU processes: the previous-stage model and the main job.

Each run is compared with the same run under plain data parallelism (or one process): DeepSpeed
must change where the weights live, not the numbers.
"""

import json
from pathlib import Path

import pytest

pytest.importorskip("deepspeed", reason="the deepspeed extra: pip install 'kpig-trainer[deepspeed]'")

from launching import ROOT, exit_probe_env, free_port  # noqa: E402
from launching import accelerate_launch as launch  # noqa: E402

from kpig_trainer.continual.state import RunState  # noqa: E402
from kpig_trainer.testing import save_tiny_llama  # noqa: E402

SCRIPT = ROOT / "tests" / "scripts" / "two_stages.py"

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def zero_config(folder: Path, stage: int) -> Path:
    path = folder / f"zero{stage}.yaml"
    path.write_text(
        "\n".join(
            [
                "compute_environment: LOCAL_MACHINE",
                "distributed_type: DEEPSPEED",
                "deepspeed_config:",
                f"  zero_stage: {stage}",
                "  gradient_accumulation_steps: auto",
                "  gradient_clipping: auto",
                "  offload_optimizer_device: none",
                "  offload_param_device: none",
                "  zero3_init_flag: true",
                "  zero3_save_16bit_model: true",
                "num_processes: 2",
                "num_machines: 1",
                "machine_rank: 0",
                f"main_process_port: {free_port()}",
                "mixed_precision: 'no'",
                "",
            ]
        )
    )
    return path


def ddp_flags():
    return ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--main_process_port", str(free_port())]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("ds-tiny") / "model", seed=0)


def two_stages(flags, tiny, mode, tmp_path, name):
    out, probe = tmp_path / name, tmp_path / f"{name}-exit"
    launch([*flags, str(SCRIPT), str(tiny), mode, str(out)], tmp_path, env=exit_probe_env(probe))
    records = [json.loads(Path(f"{out}.{rank}").read_text()) for rank in (0, 1)]
    assert records[0] == records[1]  # every rank computed the same losses
    # ... and ended its process group before exiting (a live one can abort the process there)
    assert [json.loads((probe / f"rank{r}.json").read_text())["process_group_alive"] for r in (0, 1)] == [False] * 2
    return records[0]


@pytest.fixture(scope="module")
def ddp_reference(tiny, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("ds-ddp")
    return two_stages(ddp_flags(), tiny, "copy", tmp_path, "ddp")


@pytest.mark.parametrize("stage, mode", [(2, "copy"), (3, "copy"), (3, "cached")])
def test_previous_model_under_zero_matches_data_parallel(stage, mode, tiny, ddp_reference, tmp_path):
    record = two_stages(["--config_file", str(zero_config(tmp_path, stage))], tiny, mode, tmp_path, f"zero{stage}")
    assert record["deepspeed"] and record["world"] == 2 and not ddp_reference["deepspeed"]
    # Stage 2's teacher is the stage-1 model: no divergence before the first update.
    assert record["jsd"][0] == pytest.approx(0.0, abs=1e-6)
    if mode == "copy":  # ZeRO-3: rebuilt from the shards and re-sharded; the weights are the same
        teacher, student = record["checksum"]
        assert teacher == pytest.approx(student, rel=1e-9)
        assert record["jsd"] == pytest.approx(ddp_reference["jsd"], rel=1e-3, abs=1e-7)
    assert record["loss1"] == pytest.approx(ddp_reference["loss1"], rel=1e-5)
    # `cached` replaces the exact JSD by its top-k approximation: close, not equal
    assert record["loss2"] == pytest.approx(ddp_reference["loss2"], rel=1e-5 if mode == "copy" else 1e-3)


def test_main_job_under_zero3_matches_one_process(tiny, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    rows = []
    tasks = {"alpha_task": "yes or no", "beta_task": "red, green or blue", "gamma_task": "one digit"}
    answers = {"alpha_task": "yes", "beta_task": "red", "gamma_task": "7"}
    for task, key in tasks.items():
        for k in range(12):
            rows.append(
                {
                    "task": task,
                    "category": task,
                    "id": f"{task}-{k}",
                    "instruction": f"Read the text about {task}. Answer with {key}.",
                    "input": f"text number {k}",
                    "output": answers[task],
                    "key_parts": [key],
                }
            )
    (data / "tasks.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    recipe = data / "recipe.yaml"
    recipe.write_text(
        "\n".join(
            [
                f"model_name_or_path: {tiny}",
                f"tasks: {data / 'tasks.jsonl'}",
                "method: kpig",
                "test_size: 4",
                "evaluation: loss",
                "replay_tasks: 1",
                "replay_instances: 4",
                "learning_rate: 5.0e-3",
                "lr_scheduler_type: constant",
                "max_length: 128",
                "save_strategy: 'no'",
                "report_to: none",
                "seed: 0",
                "disable_tqdm: true",
                "eval_batch_size: 4",
                "",
            ]
        )
    )
    zero, one = tmp_path / "zero3", tmp_path / "one"
    launch(
        [
            "--config_file",
            str(zero_config(tmp_path, 3)),
            "examples/cit.py",
            "--recipe",
            str(recipe),
            "--output_dir",
            str(zero),
            "--per_device_train_batch_size",
            "2",
        ],
        tmp_path,
    )
    launch(
        [
            "--config_file",
            "recipes/accelerate/cpu.yaml",
            "examples/cit.py",
            "--recipe",
            str(recipe),
            "--output_dir",
            str(one),
            "--per_device_train_batch_size",
            "4",
        ],
        tmp_path,
    )
    a, b = RunState.load(zero / "state.json"), RunState.load(one / "state.json")
    assert a.completed == b.completed == 3
    assert {k: v["tasks"] for k, v in a.replay.items()} == {k: v["tasks"] for k, v in b.replay.items()}
    for stage in ("init", "1", "2", "3"):
        assert a.evaluation[stage]["test_loss"] == pytest.approx(b.evaluation[stage]["test_loss"], rel=1e-3)
    # The saved stage model holds the full weights (gathered from the shards), not empty shards.
    from safetensors.torch import load_file

    saved = load_file(str(zero / "stages" / "stage_03" / "model" / "model.safetensors"))
    reference = load_file(str(one / "stages" / "stage_03" / "model" / "model.safetensors"))
    assert saved.keys() == reference.keys()
    for name in saved:
        assert saved[name].shape == reference[name].shape
        assert (saved[name] - reference[name]).abs().max() < 1e-2
