"""`kpig train`: TRL's parser with `base:` chains and `env:`, model options from trl.ModelConfig,
the demo recipe inside the package, and a wheel that runs with no checkout."""

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from trl import get_peft_config

from kpig_trainer import cli
from kpig_trainer.train import DEFAULT_RECIPE, parse_run_args

ROOT = Path(__file__).resolve().parents[1]


def test_config_and_recipe_flags_are_one_option(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"base: {DEFAULT_RECIPE}\nmax_stages: 2\nlearning_rate: 3.0e-4\n")
    for flag in (["--config", str(recipe)], ["--recipe", str(recipe)], [f"--config={recipe}"]):
        args, training = parse_run_args(flag)
        assert (args.max_stages, training.learning_rate, args.benchmark) == (2, 3e-4, "demo")


def test_env_is_set_and_merged_along_the_base_chain(tmp_path, monkeypatch):
    for name in ("KPIG_T_A", "KPIG_T_B"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "base.yaml").write_text(f"base: {DEFAULT_RECIPE}\nenv:\n  KPIG_T_A: one\n  KPIG_T_B: two\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\nenv:\n  KPIG_T_B: three\n")
    monkeypatch.setattr(os, "environ", dict(os.environ))  # the parser writes here; restored after
    parse_run_args(["--config", str(tmp_path / "child.yaml")])
    assert (os.environ["KPIG_T_A"], os.environ["KPIG_T_B"]) == ("one", "three")
    (tmp_path / "bad.yaml").write_text("env: [A]\n")
    with pytest.raises(ValueError, match="bad.yaml: env is a mapping"):
        parse_run_args(["--config", str(tmp_path / "bad.yaml")])


def test_model_and_lora_options_are_trls(tmp_path):
    args, _ = parse_run_args(
        [
            "--method",
            "lora",
            "--lora_r",
            "4",
            "--use_rslora",
            "true",
            "--lora_target_modules",
            "q_proj",
            "v_proj",
            "--model_revision",
            "v1",
        ]
    )
    peft = get_peft_config(args)
    assert args.use_peft and (peft.r, peft.lora_alpha, peft.use_rslora) == (4, 16, True)
    assert set(peft.target_modules) == {"q_proj", "v_proj"} and args.model_revision == "v1"
    default, _ = parse_run_args([])  # our defaults where TRL's differ: the embedded model, rank 8
    assert (default.model_name_or_path, default.lora_r, default.lora_alpha, default.dtype) == (
        "smollm2",
        8,
        16,
        "float32",
    )


def test_kpig_train_help_lists_every_option(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["train", "--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0
    for option in ("--config CONFIG", "--model_name_or_path", "--replay_strategy", "--jsd_weight", "--lora_r"):
        assert option in out
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "train" in capsys.readouterr().out


@pytest.mark.slow
def test_a_wheel_runs_the_demo_entry_point_with_no_checkout(tmp_path):
    source = tmp_path / "src"
    shutil.copytree(
        ROOT,
        source,
        ignore=shutil.ignore_patterns(".git", ".venv", "runs", "build", "*.egg-info", "__pycache__", ".pytest_cache"),
    )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "dist"),
            str(source),
        ],
        check=True,
        capture_output=True,
    )
    wheel = next((tmp_path / "dist").glob("kpig_trainer-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    installed = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", str(wheel)],
        cwd=tmp_path,
        env=clean,
        capture_output=True,
        text=True,
    )
    assert "Successfully installed kpig-trainer" in installed.stdout, installed.stdout + installed.stderr
    # The dependencies (torch, transformers, ...) are this environment's; kpig-trainer is the wheel's. (Written
    # after the install: pip would take this environment's kpig-trainer for an installed one.)
    Path(purelib, "_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {**clean, "KPIG_CACHE": str(tmp_path / "cache")}
    where = subprocess.run(
        [str(python), "-c", "import kpig_trainer; print(kpig_trainer.__file__)"],
        cwd=work,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert where.startswith(purelib)
    kpig = str(venv / "bin" / "kpig")
    help_text = subprocess.run(
        [kpig, "train", "--help"], cwd=work, env=env, check=True, capture_output=True, text=True
    ).stdout
    assert "--config CONFIG" in help_text
    run = subprocess.run(
        [
            kpig,
            "train",
            "--model_name_or_path",
            "tiny-llama",
            "--max_stages",
            "1",
            "--max_train_instances",
            "4",
            "--max_test_instances",
            "2",
            "--max_held_out_tasks",
            "1",
            "--eval_ig",
            "false",
            "--output_dir",
            "out",
            "--disable_tqdm",
            "true",
        ],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "stage 1" in run.stdout and (work / "out" / "state.json").is_file()
    assert (work / "out" / "stages" / "stage_01" / "model").is_dir()
