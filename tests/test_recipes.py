"""Recipes: every shipped recipe resolves to valid arguments; bases, overrides and errors."""

from pathlib import Path

import pytest
import yaml

from kpig_trainer.continual.arguments import METHODS
from kpig_trainer.train import parse_run_args, read_recipe

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
RUN_RECIPES = sorted(p for p in RECIPES.rglob("*.yaml") if p.parent.name != "accelerate")


@pytest.mark.parametrize("path", RUN_RECIPES, ids=lambda p: str(p.relative_to(RECIPES)))
def test_every_recipe_parses(path):
    # GPU recipes ask for bf16, which TrainingArguments refuses on a CPU: check the rest here.
    cpu = ["--bf16", "false"] if read_recipe(path).get("bf16") else []
    continual, training = parse_run_args(["--recipe", str(path), *cpu])
    assert continual.method in METHODS
    assert training.output_dir.startswith("runs/")
    assert Path(path.parent / read_recipe(path).get("base", path.name)).exists()


def test_paper_setups_carry_the_papers_hyperparameters():
    assert read_recipe(RECIPES / "superni_st" / "kpig.yaml")["bf16"] is True
    _, st = parse_run_args(["--recipe", str(RECIPES / "superni_st" / "kpig.yaml"), "--bf16", "false"])
    assert (st.learning_rate, st.alpha, st.jsd_weight, st.replay_tasks, st.replay_instances) == (
        2e-5,
        0.3,
        0.02,
        10,
        10,
    )
    assert st.per_device_train_batch_size * st.gradient_accumulation_steps * 8 == 384
    sc_args, sc = parse_run_args(["--recipe", str(RECIPES / "superni_sc" / "kpig.yaml"), "--bf16", "false"])
    assert sc_args.order == "SC" and sc.alpha == 0.3
    _, domain = parse_run_args(["--recipe", str(RECIPES / "domain" / "kpig.yaml"), "--bf16", "false"])
    assert (domain.alpha, domain.jsd_weight, domain.replay_tasks, domain.replay_instances) == (0.6, 0.01, 3, 100)
    # Appendix C / Table 6: test sets of 100 (SuperNI) and 500 (Domain) instances, drawn by Self-BLEU.
    st_args, _ = parse_run_args(["--recipe", str(RECIPES / "superni_st" / "kpig.yaml"), "--bf16", "false"])
    domain_args, _ = parse_run_args(["--recipe", str(RECIPES / "domain" / "kpig.yaml"), "--bf16", "false"])
    for args, size in ((st_args, 100), (sc_args, 100), (domain_args, 500)):
        assert (args.test_size, args.max_test_instances, args.test_sampling) == (size, size, "self_bleu")


def test_baselines_inherit_and_override():
    _, base = parse_run_args(["--recipe", str(RECIPES / "superni_st" / "kpig.yaml"), "--bf16", "false"])
    args, training = parse_run_args(["--recipe", str(RECIPES / "superni_sc" / "ewc.yaml"), "--bf16", "false"])
    assert (args.method, args.replay_strategy, args.order) == ("ewc", "none", "SC")
    assert training.learning_rate == base.learning_rate and training.output_dir == "runs/superni_sc/ewc"


def test_command_line_overrides_the_recipe():
    args, training = parse_run_args(["--learning_rate", "1e-3", "--max_stages", "2", "--method", "sft"])
    assert training.learning_rate == 1e-3 and args.max_stages == 2 and args.method == "sft"
    default_args, default = parse_run_args([])
    assert default_args.model_name_or_path == "smollm2" and default_args.max_stages == 4
    assert default.output_dir == "runs/demo"


def test_bad_recipes_name_the_file_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: kpig\nlearning_rat: 1e-5\n")
    with pytest.raises(ValueError, match=r"bad.yaml: unknown option\(s\) \['learning_rat'\]"):
        read_recipe(bad)
    loop = tmp_path / "loop.yaml"
    loop.write_text("base: loop.yaml\n")
    with pytest.raises(ValueError, match="include each other"):
        read_recipe(loop)
    with pytest.raises(ValueError, match="recipe not found"):
        read_recipe(tmp_path / "missing.yaml")
    with pytest.raises(ValueError, match="method must be one of"):
        parse_run_args(["--method", "magic"])


@pytest.mark.parametrize("name", ["cpu", "cpu_2proc", "ddp_8gpu", "zero2", "zero3"])
def test_accelerate_configs_are_complete(name):
    config = yaml.safe_load((RECIPES / "accelerate" / f"{name}.yaml").read_text())
    assert {"distributed_type", "num_processes", "num_machines"} <= set(config)
    if name.startswith("zero"):
        assert config["deepspeed_config"]["zero_stage"] == int(name[-1])


PAPER_DIRS = ("superni_st", "superni_sc", "domain")


def _resolved(path):
    return parse_run_args(["--recipe", str(path), "--bf16", "false"])


def test_paper_kpig_recipes_follow_algorithm_1_and_section_3_2():
    paper = {
        p.relative_to(RECIPES).as_posix(): _resolved(p)
        for d in PAPER_DIRS
        for p in sorted((RECIPES / d).glob("*.yaml"))
    }
    kpig = {name: run for name, run in paper.items() if run[0].method == "kpig"}
    assert sorted(kpig) == [
        "domain/kpig.yaml",
        "superni_sc/kpig.yaml",
        "superni_st/kpig.yaml",
        "superni_st/kpig_wo_div.yaml",
    ]
    # Algorithm 1: the frozen previous-stage model's IG sets the temperature, with the cached teacher.
    assert {name: (t.ig_source, t.previous_model) for name, (_, t) in kpig.items()} == {
        name: ("previous", "cached") for name in kpig
    }
    # Section 3.2: the SuperNI setups train on the shipped pools; the ablation and the baselines do not.
    pools = {name: args.instruction_pools for name, (args, _) in paper.items()}
    assert pools.pop("superni_st/kpig.yaml") == pools.pop("superni_sc/kpig.yaml") == "benchmark"
    assert pools.pop("domain/kpig.yaml") == "data/domain/pools"  # the user's own tasks, own pools
    assert set(pools.values()) == {None} and len(pools) == 19  # 9 baselines x (ST, SC) + w/o div


def test_the_demo_keeps_the_current_models_ig_and_no_pools():
    for path in [RECIPES / "demo.yaml", *sorted((RECIPES / "demo").glob("*.yaml"))]:
        args, training = parse_run_args(["--recipe", str(path)])
        assert (training.ig_source, args.instruction_pools) == ("current", None), path.name


def test_the_tuned_kpig_values_are_the_defaults_of_the_small_model_recipes():
    import json

    tuning = json.loads((RECIPES.parent / "benchmarks" / "results" / "study" / "tuning.json").read_text())
    chosen = tuning["settings"][tuning["chosen"]]["values"]
    assert max(s["p_score"] for s in tuning["settings"].values()) == tuning["settings"][tuning["chosen"]]["p_score"]
    for path in (RECIPES / "demo.yaml", RECIPES / "study" / "base.yaml", RECIPES / "superni_st_small" / "kpig.yaml"):
        _, training = parse_run_args(["--recipe", str(path)])
        values = {k: getattr(training, k) for k in ("alpha", "jsd_weight", "replay_tasks", "replay_instances")}
        assert values == chosen, path
    args, training = parse_run_args(["--recipe", str(RECIPES / "superni_st_small" / "kpig.yaml")])
    assert (args.model_name_or_path, training.ig_source, args.instruction_pools) == (
        "smollm2",
        "previous",
        "benchmark",
    )
