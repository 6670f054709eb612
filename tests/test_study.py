"""benchmarks/study.py end to end on the tiny model: 2 stages, 2 methods, one seed."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kpig_trainer.evaluation.report import read_report
from kpig_trainer.evaluation.runs import instance_scores, load_run, p_score_of

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from study import README_BEGIN, README_END  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    folder = tmp_path_factory.mktemp("study")
    (folder / "README.md").write_text(
        f"# Title\n\n## Results\n\nOur words.\n\n{README_BEGIN}\nold numbers\n{README_END}\n\n## Next section\n"
    )
    env = {"KPIG_CACHE": str(folder / "cache"), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(
        [
            sys.executable,
            "benchmarks/study.py",
            "all",
            "--quick",
            "--methods",
            "sft",
            "kpig",
            "--seeds",
            "0",
            "--out",
            str(folder / "runs"),
            "--results",
            str(folder / "results"),
            "--replicates",
            "100",
            "--readme",
            str(folder / "README.md"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        env={**__import__("os").environ, **env},
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return folder


def test_study_writes_every_table_from_the_run_directories(study):
    results = study / "results"
    data = json.loads((results / "study.json").read_text())
    assert set(data["methods"]) == {"sft", "kpig"}
    assert (results / "ig_over_stages.png").stat().st_size > 0
    markdown = (results / "study.md").read_text()
    table1 = markdown.split("## Table 1 layout")[1].split("\n\n")[1].splitlines()
    assert table1[0].count("|") == 10 and len(table1) == 4  # header, rule, sft, kpig
    paired = [p for p in data["paired"] if (p["a"], p["b"]) == ("kpig", "sft")]
    assert {(p["group"], p["score"]) for p in paired} == {
        (g, s) for g in ("seen", "held_out") for s in ("p_score", "v_score")
    }
    for section in (
        "Paired differences",
        "Table 2 layout",
        "Does kpig learn each task?",
        "Per-example forgetting",
        "Misleading constraint",
        "IG over stages",
    ):
        assert section in markdown
    assert set(data["flips"]) == {"sft", "kpig"}
    # KPIG's own terms, from its training log: T = 2 - min(IG, 1) is never below 1
    diagnostics = data["diagnostics"]["kpig"]
    assert diagnostics["steps"] > 0 and 1.0 <= diagnostics["temperature"]["min"] <= diagnostics["temperature"]["max"]
    assert 0.0 <= diagnostics["jsd_share"]["min"] and "What the KPIG terms did" in markdown
    assert set(data["probe"]["lowercase_labels"]["methods"]) == {"sft", "kpig"}


def test_the_readme_block_is_rewritten_from_the_results(study):
    readme = (study / "README.md").read_text()
    before, block, after = (
        readme.split(README_BEGIN)[0],
        readme.split(README_BEGIN)[1].split(README_END)[0],
        readme.split(README_END)[1],
    )
    assert before.endswith("Our words.\n\n") and after == "\n\n## Next section\n"  # only the block changes
    assert "old numbers" not in block and "#### Table 1 layout" in block and "kpig − sft" in block
    data = json.loads((study / "results" / "study.json").read_text())
    kpig_seen_p = data["methods"]["kpig"]["seen_p_score"]["mean"]
    assert f"| kpig | 1 | {kpig_seen_p:.1f} |" in block
    environment = data["environment"]
    assert environment["command"].startswith("benchmarks/study.py all") and environment["cores"] >= 1
    assert f"{environment['cores']} cores" in block and "Wall time of the runs" in block


def test_instance_scores_reproduce_the_runs_own_p_scores(study):
    for method in ("sft", "kpig"):
        run_dir = study / "runs" / method / "seed0"
        run, report = load_run(run_dir), read_report(run_dir)
        scores = instance_scores(run, run.rows[-1])
        for group, tasks in (("seen", run.stream.seen), ("held_out", run.stream.held_out)):
            assert p_score_of(scores, tasks) == pytest.approx(report["summary"][group]["p_score"], abs=1e-6)
        summary = json.loads((study / "results" / "study.json").read_text())["methods"][method]
        assert summary["seen_p_score"]["mean"] == pytest.approx(report["summary"]["seen"]["p_score"])


def test_a_rerun_resumes_every_finished_run(study):
    result = subprocess.run(
        [
            sys.executable,
            "benchmarks/study.py",
            "run",
            "--quick",
            "--methods",
            "sft",
            "kpig",
            "--seeds",
            "0",
            "--out",
            str(study / "runs"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0 and result.stdout.count(": done") == 2


def test_tuning_scores_every_setting_on_validation_data_only(tmp_path):
    env = {"KPIG_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(
        [
            sys.executable,
            "benchmarks/study.py",
            "tune",
            "--quick",
            "--seeds",
            "0",
            "--out",
            str(tmp_path / "runs"),
            "--results",
            str(tmp_path / "results"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        env={**__import__("os").environ, **env},
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    tuning = json.loads((tmp_path / "results" / "tuning.json").read_text())
    settings = tuning["settings"]
    assert list(settings) == ["base", "alpha_0.6", "jsd_weight_0.1", "replay_instances_8"]
    assert (
        settings["alpha_0.6"]["values"]["alpha"],
        settings["jsd_weight_0.1"]["values"]["jsd_weight"],
        settings["replay_instances_8"]["values"]["replay_instances"],
    ) == (0.6, 0.1, 8)
    best = max(s["p_score"] for s in settings.values())
    assert settings[tuning["chosen"]]["p_score"] == best
    assert (tmp_path / "results" / "tuning.md").read_text().count("|") >= 7 * 6
    for name in settings:
        run = load_run(tmp_path / "runs-tune" / name / "seed0")
        assert run.stream.held_out == [] and len(run.rows) == 1  # one row, after the last stage
        # What was scored: validation instances, never a test instance, never a training one.
        predictions = json.loads((run.root / "predictions" / "stage_02.json").read_text())
        test_mode = load_run_stream_test_ids(run)
        for task, answers in predictions.items():
            ids = {a["id"] for a in answers}
            assert len(ids) == 10 and not ids & test_mode[task]
            assert not ids & {i.id for i in run.stream.train[task]}


def load_run_stream_test_ids(run):
    """The test instance ids of the same run's stream with eval_split test."""
    from kpig_trainer.continual.arguments import ContinualArguments, load_stream

    args = ContinualArguments(**{**run.config["continual"], "eval_split": "test"})
    stream = load_stream(args, run.config["training"]["seed"])
    return {t: {i.id for i in stream.test[t]} for t in stream.seen}
