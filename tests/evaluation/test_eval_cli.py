"""`kpig eval` / `kpig compare` (via kpig_trainer.evaluation.cli) end to end."""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kpig_trainer.data import load_benchmark
from kpig_trainer.evaluation.cli import main, register_cli

SEEN = "task1599_smcalflow_classification"
HELD_OUT = "task340_winomt_classification_gender_pro"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def eval_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "tiny"
    code = main(
        [
            "eval",
            "--model",
            "tiny-llama",
            "--benchmark",
            "demo",
            "--task",
            SEEN,
            "--task",
            HELD_OUT,
            "--max-test",
            "3",
            "--out",
            str(out),
            "--ig",
            "--no-progress",
        ]
    )
    assert code == 0
    return out


def test_eval_writes_the_report(eval_run):
    report = json.loads((eval_run / "report.json").read_text())
    assert report["kind"] == "eval" and report["name"] == "tiny-llama"
    assert [t["task"] for t in report["tasks"]] == [SEEN, HELD_OUT]
    assert [t["group"] for t in report["tasks"]] == ["seen", "held_out"]
    assert all(t["n"] == 3 for t in report["tasks"])
    for group in ("seen", "held_out"):
        assert 0 <= report["summary"][group]["p_score"] <= 100
        assert report["summary"][group]["n_tasks"] == 1
        assert isinstance(report["summary"][group]["ig"], float)
    assert report["config"]["model"] == "tiny-llama" and report["config"]["max_test"] == 3
    assert report["settings"]["held_out_demonstrations"] == 2
    assert report["timings"]["wall"] >= report["timings"]["total"] > 0
    assert "held-out tasks evaluated with 2 demonstrations in the context" in report["notes"]
    markdown = (eval_run / "report.md").read_text()
    assert "| tiny-llama |" in markdown and f"| {SEEN} | seen |" in markdown
    for name in report["plots"]:
        data = (eval_run / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 1000


def test_eval_instances_are_the_streams_test_split(eval_run):
    stream = load_benchmark("demo").stream(max_test_instances=3)
    report = json.loads((eval_run / "report.json").read_text())
    for task in (SEEN, HELD_OUT):
        assert [p["id"] for p in report["predictions"][task]] == [i.id for i in stream.test[task]]


def test_eval_draws_the_test_instances_of_a_self_bleu_run(tmp_path):
    out = tmp_path / "sb"
    assert (
        main(
            [
                "eval",
                "--model",
                "tiny-llama",
                "--benchmark",
                "demo",
                "--task",
                SEEN,
                "--max-test",
                "3",
                "--test-size",
                "5",
                "--test-sampling",
                "self_bleu",
                "--out",
                str(out),
                "--no-progress",
                "--no-plots",
            ]
        )
        == 0
    )
    stream = load_benchmark("demo").stream(test_size=5, test_sampling="self_bleu", max_test_instances=3)
    default = load_benchmark("demo").stream(max_test_instances=3)
    ids = [p["id"] for p in json.loads((out / "report.json").read_text())["predictions"][SEEN]]
    assert ids == [i.id for i in stream.test[SEEN]]
    assert ids != [i.id for i in default.test[SEEN]]  # the option changes the draw


def test_compare_two_reports(eval_run, tmp_path, capsys):
    other = json.loads((eval_run / "report.json").read_text())
    other["name"] = "other-run"
    other["summary"]["seen"]["p_score"] = 101.0  # marks the best value
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "report.json").write_text(json.dumps(other))
    out = tmp_path / "table.md"
    assert main(["compare", str(eval_run), str(tmp_path / "other" / "report.json"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed == out.read_text()
    lines = printed.splitlines()
    assert lines[0] == (
        "| Run | Seen P-score | Seen V-score | Held-out P-score | Held-out V-score | "
        "Seen V (paper) | Held-out V (paper) |"
    )
    assert lines[2].startswith("| tiny-llama |") and lines[3].startswith("| other-run | **101.0** |")
    assert main(["compare", str(eval_run), "--names", "a", "b"]) == 2


def test_module_entry_point_compare(eval_run):
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "kpig_trainer.evaluation", "compare", str(eval_run), "--names", "INIT"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[2].startswith("| INIT |")
    assert time.perf_counter() - started < 120


def test_register_cli_adds_both_subcommands():
    parser = argparse.ArgumentParser(prog="kpig")
    register_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["eval", "--model", "m", "--task", "a", "--task", "b", "--probes"])
    assert args.task == ["a", "b"] and args.probes and args.benchmark is None and callable(args.handler)
    args = parser.parse_args(["compare", "r1", "r2"])
    assert [str(r) for r in args.runs] == ["r1", "r2"]


def test_unknown_task_is_an_error(tmp_path, capsys):
    code = main(["eval", "--model", "tiny-llama", "--task", "no_such_task", "--out", str(tmp_path)])
    assert code == 2 and "no_such_task" in capsys.readouterr().err
    assert not (tmp_path / "report.json").exists()


def test_probes_flag(tmp_path):
    out = tmp_path / "probes"
    code = main(
        [
            "eval",
            "--model",
            "tiny-llama",
            "--task",
            SEEN,
            "--max-test",
            "1",
            "--max-new-tokens",
            "2",
            "--probes",
            "--out",
            str(out),
            "--no-plots",
            "--no-progress",
        ]
    )
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    probe = report["probes"][SEEN]
    assert len(probe["instruction_variants"]) == 7 and probe["misleading_constraints"][0]["n"] == 1
    assert "Instruction variants (cf. the paper's Table 3)" in (out / "report.md").read_text()
    assert report["plots"] == []


@pytest.mark.slow
def test_smollm2_eval(tmp_path, capsys):
    out = tmp_path / "smollm2"
    started = time.perf_counter()
    code = main(
        [
            "eval",
            "--model",
            "smollm2",
            "--benchmark",
            "demo",
            "--task",
            SEEN,
            "--task",
            HELD_OUT,
            "--max-test",
            "4",
            "--out",
            str(out),
            "--no-progress",
            "--threads",
            "1",
        ]
    )
    wall = time.perf_counter() - started
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    for group in ("seen", "held_out"):
        p = report["summary"][group]["p_score"]
        assert isinstance(p, float) and 0 <= p <= 100
        assert 0 <= report["summary"][group]["v_score"] <= 100
    timings = report["timings"]
    assert 0 < timings["generation"] <= timings["total"] <= timings["wall"] <= wall + 1
    assert wall < 900
    with capsys.disabled():
        print(
            f"\nSmolLM2 INIT, 2 demo tasks x 4: seen P/V {report['summary']['seen']['p_score']:.1f}/"
            f"{report['summary']['seen']['v_score']:.1f}, held-out P/V "
            f"{report['summary']['held_out']['p_score']:.1f}/{report['summary']['held_out']['v_score']:.1f}, "
            f"generation {timings['generation']:.1f} s, wall {wall:.1f} s"
        )


GPT_TASK = "task1217_atomic_answer_generation"  # held-out, metric GPT


def test_eval_with_a_judge_endpoint(tmp_path):
    from openai_stub import Reply, StubServer

    out = tmp_path / "judged"
    with StubServer(lambda prompt, n: Reply("Yes.")) as server:
        code = main(
            [
                "eval",
                "--model",
                "tiny-llama",
                "--benchmark",
                "superni-kpig",
                "--task",
                GPT_TASK,
                "--max-test",
                "2",
                "--max-new-tokens",
                "2",
                "--out",
                str(out),
                "--no-plots",
                "--no-progress",
                "--judge-base-url",
                server.base_url,
                "--judge-model",
                "stub",
                "--judge-api-key-env",
                "",
            ]
        )
        requests = server.requests
    assert code == 0 and requests == 2
    report = json.loads((out / "report.json").read_text())
    (row,) = report["tasks"]
    assert row["metric_used"] == "gpt" and row["performance"] == 100 and not row["fallback"]
    assert report["settings"]["judge"] == "stub" and not any("ROUGE-L" in n for n in report["notes"])
    assert len((out / "judge_cache.jsonl").read_text().splitlines()) == 2


def test_judge_failure_falls_back_to_rouge(tiny_model_and_tokenizer):
    from openai_stub import Reply, StubServer

    from kpig_trainer.evaluation import LLMJudge
    from kpig_trainer.evaluation.evaluate import evaluate_tasks
    from kpig_trainer.evaluation.report import build_report

    benchmark = load_benchmark("superni-kpig")
    task = benchmark.tasks[GPT_TASK]
    model, tokenizer = tiny_model_and_tokenizer
    with StubServer(lambda prompt, n: Reply(status=500, error="down")) as server:
        judge = LLMJudge(base_url=server.base_url, model="stub", api_key_env=None, max_retries=0, timeout=5)
        result = evaluate_tasks(
            model,
            tokenizer,
            {GPT_TASK: task},
            {GPT_TASK: task.instances[:2]},
            held_out=[GPT_TASK],
            judge=judge,
            max_new_tokens=2,
            show_progress=False,
        )
        assert server.requests == 1  # the first failure disables the judge
    score = result.scores[GPT_TASK]
    assert score.fallback and score.metric_used == "rouge_l"
    assert any(note.startswith("LLM judge failed") for note in score.notes)
    assert "down" in result.settings["judge_error"]
    notes = build_report(result)["notes"]
    assert f"GPT tasks scored with ROUGE-L: the LLM judge failed ({GPT_TASK})" in notes


def test_eval_with_a_peft_adapter(tiny_model_path, tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    lora.save_pretrained(tmp_path / "adapter")
    out = tmp_path / "report"
    code = main(
        [
            "eval",
            "--model",
            str(tiny_model_path),
            "--adapter",
            str(tmp_path / "adapter"),
            "--task",
            SEEN,
            "--max-test",
            "1",
            "--max-new-tokens",
            "2",
            "--out",
            str(out),
            "--no-plots",
            "--no-progress",
        ]
    )
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["adapter"] == str(tmp_path / "adapter") and report["name"].endswith("+ adapter")
