"""Offline path: heuristic key parts, template rewrites, the end-to-end pipeline and the CLI."""

import argparse
import json
import random

import pytest
from openai_stub import Reply, StubServer

from kpig_trainer.data import Task, load_benchmark
from kpig_trainer.data.masking import mask_key_parts
from kpig_trainer.diversity import (
    HEURISTIC_STRATEGIES,
    diversify,
    evaluate_heuristic,
    extract_key_parts_heuristic,
    heuristic_rewrite,
    load_pools,
    pool_path,
    validate_key_parts,
)
from kpig_trainer.diversity.cli import register_cli
from kpig_trainer.diversity.heuristic import split_sentences

DEMO_PAIR = ["task1722_civil_comments_threat_classification", "task190_snli_classification"]


@pytest.mark.parametrize(
    "instruction, expected",
    [
        (
            "In this task, you are given a tweet. Your job is to decide whether the tweet is sarcastic. "
            'Answer with "sarcastic" or "literal".',
            ["decide whether the tweet is sarcastic", 'Answer with "sarcastic" or "literal"'],
        ),
        (
            "Given a list of numbers, sort them in ascending order. Return the result as a list separated by commas.",
            ["sort them in ascending order", "Return the result as a list separated by commas"],
        ),
        (
            "You will be shown a news article. Summaries are useful to readers. Write a title for the article. "
            "The title should be less than 10 words.",
            ["Write a title for the article", "The title should be less than 10 words"],
        ),
        (
            "Each review was written by a customer. Possible answers are Positive, Negative or Neutral.",
            ["Possible answers are Positive, Negative or Neutral"],
        ),
        (
            "You are given a paragraph. Provide the named entities as a JSON object. Keep in mind that names can "
            "be ambiguous.",
            ["Provide the named entities as a JSON object"],
        ),
        (
            "In this task, you are given two statements, i.e. a premise and a claim. The output should be 'yes' if "
            "the premise supports the claim, i.e. Statement 1, and 'no' otherwise.",
            ["The output should be 'yes' if the premise supports the claim, i.e. Statement 1, and 'no' otherwise"],
        ),
        ("In this task, you are given a sentence. Sentences come from novels.", []),
    ],
)
def test_heuristic_extractor_on_hand_made_instructions(instruction, expected):
    parts = extract_key_parts_heuristic(instruction)
    assert parts == expected
    assert all(part in instruction for part in parts)


def test_label_definitions_are_key_parts():
    instruction = (
        "You are given a premise and an update. A weakener makes the hypothesis less likely. "
        'The premise is a sentence. Answer with "strengthener" or "weakener".'
    )
    parts = extract_key_parts_heuristic(instruction)
    assert "A weakener makes the hypothesis less likely" in parts
    assert "The premise is a sentence" not in parts


def test_sentence_split_ignores_abbreviations():
    text = "Is it true, i.e. Statement 2? Yes. Answer e.g. Yes or No.\nNext line"
    assert [text[s:e] for s, e in split_sentences(text)] == [
        "Is it true, i.e. Statement 2?",
        "Yes.",
        "Answer e.g. Yes or No.",
        "Next line",
    ]


@pytest.mark.parametrize("strategy", HEURISTIC_STRATEGIES)
def test_rewrites_keep_key_parts_verbatim(strategy):
    task = load_benchmark("demo").tasks["task1599_smcalflow_classification"]
    rng = random.Random(3)
    changed = 0
    for _ in range(10):
        text = heuristic_rewrite(task.definition, task.key_parts, strategy, rng)
        assert all(part in text for part in task.key_parts)
        assert validate_key_parts(text, task.key_parts).kept == task.key_parts
        changed += text != task.definition
    assert changed == 10


def test_paraphrase_never_edits_inside_a_key_part():
    instruction = "You are given a list. Your job is to sort it. Your job is to be quick."
    key_parts = ["Your job is to sort it"]
    for seed in range(20):
        text = heuristic_rewrite(instruction, key_parts, "paraphrase", random.Random(seed))
        assert "Your job is to sort it" in text


def test_rewrites_do_not_stack_preambles():
    task = load_benchmark("demo").tasks["task155_count_nouns_verbs"]
    rng = random.Random(0)
    text = task.definition
    for _ in range(30):
        text = heuristic_rewrite(text, task.key_parts, rng.choice(["preamble", "reasoning"]), rng)
    assert len(split_sentences(text)) <= 3  # opening + the definition + closing


def test_offline_pipeline_end_to_end_on_two_demo_tasks(tmp_path):
    tasks = {name: load_benchmark("demo").tasks[name] for name in DEMO_PAIR}
    summary = diversify(tasks, pool_size=31, client=None, cache_dir=tmp_path, concurrency=2, progress=False)
    assert summary.complete and summary.model == "heuristic" and summary.stats == {}
    pools = load_pools(tmp_path)
    assert set(pools) == set(DEMO_PAIR)
    for name, task in tasks.items():
        pool = pools[name]
        assert len(pool) == 31 and len({p["instruction"] for p in pool}) == 31
        assert pool[0] == {"instruction": task.definition, "key_parts": task.key_parts}
        for item in pool:
            assert item["key_parts"] and all(part in item["instruction"] for part in item["key_parts"])
            assert mask_key_parts(item["instruction"], item["key_parts"]) != item["instruction"]
        raw = [json.loads(line) for line in pool_path(tmp_path, name).read_text().splitlines()]
        assert {r["strategy"] for r in raw[1:]} <= set(HEURISTIC_STRATEGIES)
        assert all(r["model"] == "heuristic" for r in raw[1:])


def test_unannotated_task_gets_heuristic_seed_key_parts(tmp_path):
    task = Task(
        name="plain",
        category="c",
        definition="You are given a word. Your task is to spell it backwards. Answer in lowercase only.",
    )
    diversify([task], pool_size=4, cache_dir=tmp_path, progress=False)
    seed = json.loads(pool_path(tmp_path, "plain").read_text().splitlines()[0])
    assert seed["key_parts"] == ["spell it backwards", "Answer in lowercase only"]
    assert seed["key_parts_by"] == "heuristic"


def test_task_without_any_key_parts_ends_incomplete(tmp_path):
    task = Task(
        name="vague", category="c", definition="In this task, you are given a sentence. Sentences come from novels."
    )
    summary = diversify([task], pool_size=4, cache_dir=tmp_path, max_attempts_per_entry=2, progress=False)
    result = summary.tasks["vague"]
    assert result.status == "incomplete" and result.entries == 1
    assert result.rejections == {"no_key_parts": 6}


def test_evaluate_heuristic_counts_character_overlap():
    task = Task(name="t", category="c", definition="Abc def. Ghi jkl.", key_parts=["Abc def"])
    result = evaluate_heuristic([task], extractor=lambda text: ["def", "Ghi jkl"])
    row = result["tasks"][0]
    assert (row["gold_chars"], row["pred_chars"], row["overlap"]) == (6, 9, 3)
    assert result["micro"]["precision"] == pytest.approx(3 / 9)
    assert result["micro"]["recall"] == pytest.approx(3 / 6)
    assert result["gold_spans_hit"] == 1.0
    assert result["whole_definition"]["recall"] == 1.0
    assert result["whole_definition"]["precision"] == pytest.approx(6 / 14)


def test_heuristic_quality_on_the_demo_tasks():
    """A regression floor, measured against the hand-written key parts (see the README)."""
    result = evaluate_heuristic(load_benchmark("demo").tasks)
    assert result["evaluated"] == 19
    assert result["micro"]["precision"] >= 0.85 and result["micro"]["recall"] >= 0.8
    assert result["micro"]["f1"] > result["whole_definition"]["f1"]


# --- CLI -------------------------------------------------------------------------------------
def kpig(argv):
    parser = argparse.ArgumentParser(prog="kpig")
    register_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.handler(args)


def test_cli_offline_run_and_resume(tmp_path, capsys):
    argv = [
        "diversify",
        "--benchmark",
        "demo",
        "--task",
        DEMO_PAIR[0],
        "--task",
        DEMO_PAIR[1],
        "--pool-size",
        "8",
        "--out",
        str(tmp_path),
        "--offline",
        "--no-progress",
    ]
    assert kpig(argv) == 0
    out = capsys.readouterr().out
    assert "Instruction pools (heuristic, target 8 per task)" in out and DEMO_PAIR[0] in out
    assert kpig(argv + ["--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["complete"] and summary["tasks"][DEMO_PAIR[1]] == {
        "entries": 8,
        "existing": 8,
        "added": 0,
        "attempts": 0,
        "rejections": {},
        "status": "complete",
        "message": "",
    }


def test_cli_evaluate_heuristic(capsys):
    assert kpig(["diversify", "--benchmark", "demo", "--evaluate-heuristic", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["evaluated"] == 19 and 0 < result["micro"]["precision"] <= 1
    assert kpig(["diversify", "--benchmark", "demo", "--task", DEMO_PAIR[0], "--evaluate-heuristic"]) == 0
    assert "gold spans hit" in capsys.readouterr().out


def test_cli_errors(tmp_path, capsys, monkeypatch):
    assert kpig(["diversify", "--offline", "--no-progress"]) == 2
    assert "--out is required" in capsys.readouterr().err
    assert kpig(["diversify", "--out", str(tmp_path), "--base-url", "http://127.0.0.1:9/v1"]) == 2
    assert "--base-url needs --model" in capsys.readouterr().err
    assert kpig(["diversify", "--out", str(tmp_path), "--offline", "--strategies", "breadth"]) == 2
    assert "unknown strategies ['breadth']" in capsys.readouterr().err
    monkeypatch.setenv("KPIG_TEST_STUB_KEY", "sk-wrong")
    with StubServer(lambda prompt, n: Reply(status=401, error="bad key")) as server:
        code = kpig(
            [
                "diversify",
                "--task",
                DEMO_PAIR[0],
                "--out",
                str(tmp_path),
                "--base-url",
                server.base_url,
                "--model",
                "m",
                "--api-key-env",
                "KPIG_TEST_STUB_KEY",
                "--no-progress",
                "--pool-size",
                "3",
            ]
        )
    assert code == 2
    captured = capsys.readouterr()
    assert "HTTP 401" in captured.err and "KPIG_TEST_STUB_KEY" in captured.err and server.base_url in captured.err
    assert "error" in captured.out  # the summary table is still printed
