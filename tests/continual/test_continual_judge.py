"""The LLM judge in continual runs: GPT-metric tasks judged by a stub endpoint, the ROUGE-L
fallback in the report, option errors, and the run fingerprint without judge options."""

import dataclasses
import hashlib
import json
import re

import pytest
from tiny_runs import tiny_training

from kpig_trainer.continual.runner import ContinualArguments, ContinualRunner
from kpig_trainer.continual.state import RunState
from kpig_trainer.kpig.config import KPIGConfig

GPT_TASK = "riddle_task"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("judge-data")
    rows = [
        {
            "task": GPT_TASK,
            "category": "Riddles",
            "id": f"r-{k}",
            "instruction": "Name something that fits the description. Answer with a short phrase.",
            "input": f"description number {k}",
            "output": f"a thing {k}",
        }
        for k in range(8)
    ]
    (folder / "tasks.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (folder / "annotations.json").write_text(json.dumps({GPT_TASK: {"metric": "GPT"}}))
    (folder / "splits.json").write_text(json.dumps({"seen": [GPT_TASK], "held_out": []}))
    return folder


@pytest.fixture(autouse=True)
def isolated(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("KPIG_CACHE", str(tmp_path_factory.getbasetemp() / "kpig-cache"))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")  # never route loopback through a proxy


def make_runner(data_dir, out, **overrides):
    continual = dict(
        model_name_or_path="tiny-llama",
        tasks=str(data_dir / "tasks.jsonl"),
        annotations=str(data_dir / "annotations.json"),
        splits=str(data_dir / "splits.json"),
        method="sft",
        test_size=4,
        evaluation="generate",
        eval_ig=False,
    )
    training = tiny_training(out)
    for key, value in overrides.items():
        (continual if key in ContinualArguments.__dataclass_fields__ else training)[key] = value
    return ContinualRunner(ContinualArguments(**continual), KPIGConfig(**training))


def graded_answer(prompt):
    """The answer the judge was asked about (the last section of its question)."""
    return re.search(r"Answer to grade:\n(.*)\n\nIs the answer reasonable\?$", prompt, re.S).group(1)


def shown(prediction):
    """How a prediction appears in the judge's question (stripped; empty is "(none)")."""
    return prediction.strip() or "(none)"


def test_gpt_tasks_are_judged_by_the_endpoint(data_dir, tmp_path):
    from openai_stub import Reply, StubServer

    from kpig_trainer.continual.table import stage_table
    from kpig_trainer.evaluation.report import read_report

    verdicts = {}

    def respond(prompt, n):  # a verdict that depends on the answer: even length -> yes
        answer = graded_answer(prompt)
        verdicts[answer] = len(answer) % 2 == 0
        return Reply("Yes." if verdicts[answer] else "No, it is not.")

    out = tmp_path / "judged"
    with StubServer(respond) as server:
        state = make_runner(
            data_dir, out, judge_base_url=server.base_url, judge_model="stub", judge_api_key_env=""
        ).run()
        prompts = list(server.prompts)
    assert set(state.evaluation) == {"init", "1"}
    rows = {
        key: json.loads((out / "predictions" / f"{key}.json").read_text())[GPT_TASK] for key in ("init", "stage_01")
    }
    # One request per distinct (instance, answer): an answer already judged (same instance, same
    # text in both rows) is served from the judge's cache.
    asked = {(p["id"], shown(p["prediction"])) for row in rows.values() for p in row}
    assert len(prompts) == len(asked) > 0
    assert all("Name something that fits the description." in p for p in prompts)
    for key, entry_key in (("init", "init"), ("stage_01", "1")):
        expected = 100 * sum(verdicts[shown(p["prediction"])] for p in rows[key]) / len(rows[key])
        score = state.evaluation[entry_key]["scores"][GPT_TASK]
        assert score["metric_used"] == "gpt" and not score["fallback"]
        assert score["performance"] == pytest.approx(expected)
    report = read_report(out)
    (task,) = report["tasks"]
    assert task["metric_used"] == "gpt" and task["fallback"] is False
    assert task["performance"] == pytest.approx(state.evaluation["1"]["scores"][GPT_TASK]["performance"])
    assert report["settings"]["judge"] == "stub"
    assert not any("ROUGE-L" in note for note in report["notes"])
    assert "ROUGE-L fallback" not in (out / "report.md").read_text()
    assert len((out / "judge_cache.jsonl").read_text().splitlines()) == len(asked)
    # The printed stage table keeps its columns (the paper's V reading is in report.md, not here).
    header = stage_table(state).splitlines()[0].split()
    assert header == [
        "after",
        "seen",
        "P",
        "seen",
        "V",
        "held-out",
        "P",
        "held-out",
        "V",
        "mean",
        "IG",
        "trained",
        "replayed",
    ]


def test_without_a_judge_the_report_marks_the_rouge_fallback(data_dir, tmp_path):
    from kpig_trainer.evaluation.report import read_report

    out = tmp_path / "plain"
    state = make_runner(data_dir, out, method="init").run()
    score = state.evaluation["init"]["scores"][GPT_TASK]
    assert score["metric_used"] == "rouge_l" and score["fallback"] is True
    report = read_report(out)
    (task,) = report["tasks"]
    assert task["fallback"] is True
    assert f"GPT tasks scored with ROUGE-L: no judge configured ({GPT_TASK})" in report["notes"]
    assert "| GPT (ROUGE-L fallback) |" in (out / "report.md").read_text()
    assert not (out / "judge_cache.jsonl").exists()


def test_a_failing_judge_falls_back_and_the_report_says_so(data_dir, tmp_path):
    from openai_stub import Reply, StubServer

    from kpig_trainer.evaluation.report import read_report

    out = tmp_path / "down"
    with StubServer(
        lambda prompt, n: Reply(status=500, error="judge down", headers={"retry-after-ms": "10"})
    ) as server:
        state = make_runner(
            data_dir, out, method="init", judge_base_url=server.base_url, judge_model="stub", judge_api_key_env=""
        ).run()
        assert server.requests >= 1
    score = state.evaluation["init"]["scores"][GPT_TASK]
    assert score["fallback"] is True and score["metric_used"] == "rouge_l"
    assert "judge down" in state.evaluation["init"]["settings"]["judge_error"]
    report = read_report(out)
    assert f"GPT tasks scored with ROUGE-L: the LLM judge failed ({GPT_TASK})" in report["notes"]
    assert report["tasks"][0]["fallback"] is True


def test_a_missing_api_key_names_the_option(data_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("KPIG_TEST_JUDGE_KEY", raising=False)
    with pytest.raises(ValueError, match="judge_api_key_env: the environment variable KPIG_TEST_JUDGE_KEY is not set"):
        make_runner(
            data_dir, tmp_path / "run", judge_base_url="http://127.0.0.1:9/v1", judge_api_key_env="KPIG_TEST_JUDGE_KEY"
        )
    assert not (tmp_path / "run" / "state.json").exists()
    monkeypatch.setenv("KPIG_TEST_JUDGE_KEY", "sk-test")  # set, the same options are accepted
    assert make_runner(
        data_dir, tmp_path / "run", judge_base_url="http://127.0.0.1:9/v1", judge_api_key_env="KPIG_TEST_JUDGE_KEY"
    ).judge.available


def test_judge_options_are_checked():
    with pytest.raises(ValueError, match="judge_base_url is set but evaluation is 'loss'"):
        ContinualArguments(judge_base_url="http://127.0.0.1:9/v1", evaluation="loss")
    with pytest.raises(ValueError, match="judge_model is empty"):
        ContinualArguments(judge_base_url="http://127.0.0.1:9/v1", judge_model="")
    cleared = ContinualArguments(judge_base_url="", judge_api_key_env="", evaluation="loss")  # '' switches off
    assert cleared.judge_base_url is None and cleared.judge_api_key_env is None


# The ContinualArguments fields before the judge options existed, and the fingerprint formula of
# that time: a run directory made then must resume.
FIELDS_BEFORE_JUDGE = (
    "model_name_or_path benchmark tasks annotations splits order stage_order insta_target insta_k max_stages "
    "max_held_out_tasks max_train_instances max_test_instances test_size method replay_strategy "
    "similarity_embedder similarity_aggregate regularization_weight fisher_batches ewc_decay use_peft lora_r "
    "lora_alpha lora_dropout lora_target_modules instruction_pools keep_last_stages evaluate evaluation eval_ig "
    "eval_batch_size held_out_demonstrations"
).split()
UNHASHED_TRAINING = {
    "output_dir",
    "logging_dir",
    "logging_steps",
    "save_steps",
    "report_to",
    "disable_tqdm",
    "save_total_limit",
    "logging_first_step",
}


def fingerprint_before_judge(runner):
    args = dataclasses.asdict(runner.args)
    training = {k: v for k, v in runner.training_args.to_dict().items() if k not in UNHASHED_TRAINING}
    data = {
        "continual": {k: args[k] for k in FIELDS_BEFORE_JUDGE},
        "training": training,
        "stages": [list(s.tasks) for s in runner.stream.stages],
    }
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def test_unset_judge_options_keep_the_fingerprint(data_dir, tmp_path, monkeypatch):
    probe = make_runner(data_dir, tmp_path / "probe", method="init")
    old = fingerprint_before_judge(probe)
    assert probe.fingerprint() == old
    # A run directory made before: its state.json carries the old fingerprint, and it resumes.
    run = tmp_path / "old-run"
    run.mkdir()
    RunState(old, [GPT_TASK]).save(run / "state.json")
    assert make_runner(data_dir, run, method="init").state.fingerprint == old
    # A judge changes what GPT tasks score, so it changes the fingerprint; where it is served
    # from (the URL, the key's variable, the cache file) does not.
    monkeypatch.setenv("KPIG_TEST_JUDGE_KEY", "sk-test")
    judged = dict(method="init", judge_base_url="http://127.0.0.1:9/v1", judge_model="judge-a", judge_api_key_env="")
    first = make_runner(data_dir, tmp_path / "a", **judged).fingerprint()
    assert first != old
    moved = make_runner(
        data_dir,
        tmp_path / "b",
        **{**judged, "judge_base_url": "http://127.0.0.1:10/v1", "judge_api_key_env": "KPIG_TEST_JUDGE_KEY"},
        judge_cache=str(tmp_path / "c.jsonl"),
    )
    assert moved.fingerprint() == first
    assert make_runner(data_dir, tmp_path / "c", **{**judged, "judge_model": "judge-b"}).fingerprint() != first


@pytest.mark.distributed
def test_two_processes_ask_the_judge_once_per_answer(data_dir, tmp_path):
    from launching import accelerate_launch, two_processes
    from openai_stub import Reply, StubServer

    from kpig_trainer.testing import save_tiny_llama

    out = tmp_path / "two"
    model = save_tiny_llama(tmp_path / "tiny", seed=0)  # two processes must not build the alias's cache at once
    with StubServer(lambda prompt, n: Reply("Yes.")) as server:
        lines = [
            f"model_name_or_path: {model}",
            f"tasks: {data_dir / 'tasks.jsonl'}",
            f"annotations: {data_dir / 'annotations.json'}",
            f"splits: {data_dir / 'splits.json'}",
            "method: init",
            "test_size: 4",
            "evaluation: generate",
            "eval_ig: false",
            "max_length: 128",
            "report_to: none",
            "seed: 0",
            "disable_tqdm: true",
            f"judge_base_url: {server.base_url}",
            "judge_model: stub",
            "judge_api_key_env: ''",
        ]
        (tmp_path / "recipe.yaml").write_text("\n".join(lines) + "\n")
        accelerate_launch(
            [
                *two_processes(),
                "examples/cit.py",
                "--recipe",
                str(tmp_path / "recipe.yaml"),
                "--output_dir",
                str(out),
            ],
            tmp_path,
            env={"NO_PROXY": "127.0.0.1"},
        )
        requests = server.requests
    predictions = json.loads((out / "predictions" / "init.json").read_text())[GPT_TASK]
    # Both processes generate every answer; only process 0 asks, once per distinct (instance, answer).
    assert requests == len({(p["id"], shown(p["prediction"])) for p in predictions}) > 0
    score = RunState.load(out / "state.json").evaluation["init"]["scores"][GPT_TASK]
    assert score["metric_used"] == "gpt" and score["performance"] == 100
