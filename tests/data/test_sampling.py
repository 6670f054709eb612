"""Test-set sampling: the Self-BLEU sampler against sacrebleu, its determinism, label balance and
diversity, and the test_sampling option from build_stream up to ContinualArguments and the CLI."""

import collections
import dataclasses
import hashlib
import json
import random
import statistics

import pytest
import sacrebleu

from kpig_trainer.cli import main
from kpig_trainer.continual.arguments import ContinualArguments, load_stream
from kpig_trainer.data import (
    Constraints,
    DataError,
    Instance,
    Task,
    balanced_sample,
    build_stream,
    load_benchmark,
    self_bleu_sample,
    split_task,
)
from kpig_trainer.data.sampling import BleuReferences, label_key


def self_bleu(texts):
    """Self-BLEU as Zhu et al. define it, straight from sacrebleu: each text against all the others."""
    return statistics.mean(sacrebleu.sentence_bleu(t, texts[:k] + texts[k + 1 :]).score for k, t in enumerate(texts))


def family_task(families=10, copies=6, scope="-"):
    """Near-duplicates: each family is one sentence of its own words, repeated with a different tail."""
    instances = [
        Instance(
            f"f{f}-{c}",
            "dups",
            "Copy the text.",
            " ".join(f"w{f}x{j}" for j in range(8)) + f" tail {c}",
            ["yes" if f % 2 else "no"],
        )
        for f in range(families)
        for c in range(copies)
    ]
    constraints = Constraints(metric="ACC", scope=scope, labels=("yes", "no") if scope == "In choice" else ())
    return Task("dups", "C", "Copy the text.", instances, constraints)


def family(instance):
    return instance.id.split("-")[0]


def test_scores_equal_sacrebleu_sentence_bleu():
    rng = random.Random(0)
    words = ["the", "cat", "sat", "on", "a", "mat", ",", "dog's", "(red)", "ran", "7", "3.5", "."]
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 25))) for _ in range(30)]
    texts += ["", "the cat sat on the mat", "the the the the cat"]  # empty, exact repeat, clipped counts
    references = BleuReferences()
    chosen = []
    for text in texts[:12]:
        for hypothesis in texts:
            expected = sacrebleu.sentence_bleu(hypothesis, chosen).score if chosen else 0.0
            assert references.bleu(references.statistics(hypothesis)) == pytest.approx(expected, abs=1e-9)
        references.add(references.statistics(text))
        chosen.append(text)


def test_same_seed_same_sample_other_seed_another():
    task = family_task(families=20, copies=5)
    first = split_task(task, seed=3, test_size=12, test_sampling="self_bleu")
    again = split_task(task, seed=3, test_size=12, test_sampling="self_bleu")
    assert [[i.id for i in part] for part in first] == [[i.id for i in part] for part in again]
    other = split_task(task, seed=4, test_size=12, test_sampling="self_bleu")
    assert {i.id for i in other[1]} != {i.id for i in first[1]}
    assert {i.id for i in first[0]} | {i.id for i in first[1]} == {i.id for i in task.instances}
    assert not {i.id for i in first[0]} & {i.id for i in first[1]}


def test_greedy_avoids_near_duplicates_that_a_random_draw_takes():
    task = family_task()
    chosen = self_bleu_sample(task.instances, 10, random.Random(1), by_label=False, candidates_per_step=None)
    assert len({family(i) for i in chosen}) == 10
    _, drawn = split_task(task, seed=1, test_size=10)  # the balanced (here: plain random) draw
    assert len({family(i) for i in drawn}) < 10


@pytest.mark.parametrize("seed", range(4))
def test_the_chosen_set_has_a_lower_self_bleu_than_the_balanced_draw(seed):
    # Half the task is near-duplicates of 5 sentences, half is varied text.
    rng = random.Random(99)
    vocabulary = [f"word{k}" for k in range(300)]
    inputs = [f"the report about item {k % 5} is ready for review today number {k}" for k in range(60)]
    inputs += [" ".join(rng.choice(vocabulary) for _ in range(12)) for _ in range(60)]
    instances = [Instance(f"i{k}", "mixed", "Summarize.", text, ["ok"]) for k, text in enumerate(inputs)]
    task = Task("mixed", "C", "Summarize.", instances, Constraints(metric="ROUGE"))
    diverse = split_task(task, seed=seed, test_size=20, test_sampling="self_bleu")[1]
    balanced = split_task(task, seed=seed, test_size=20)[1]
    assert self_bleu([i.input for i in diverse]) < self_bleu([i.input for i in balanced]) - 5


def test_label_balance_is_kept():
    # 36 "yes" and 4 "no", as the balanced sampler's own test: the same shares under self_bleu.
    instances = [
        Instance(
            f"i{k}", "skew", "Answer yes or no.", f"sentence {k} about {k % 7}", ["No." if k % 10 == 0 else "yes"]
        )
        for k in range(40)
    ]
    task = Task(
        "skew", "C", "Answer yes or no.", instances, Constraints(metric="ACC", scope="In choice", labels=("yes", "no"))
    )
    for n, expected in ((8, {"yes": 4, "no": 4}), (10, {"yes": 6, "no": 4})):
        _, test = split_task(task, seed=0, test_size=n, test_sampling="self_bleu")
        assert collections.Counter(label_key(i.output) for i in test) == expected


@pytest.mark.parametrize("n", [1, 5, 7, 13, 20])
def test_label_shares_match_the_balanced_sampler(n):
    labels = ["red"] * 3 + ["green"] * 9 + ["Blue."] * 14
    instances = [
        Instance(f"i{k}", "colours", "Name the colour.", f"thing {k}", [label]) for k, label in enumerate(labels)
    ]
    shares = collections.Counter(label_key(i.output) for i in self_bleu_sample(instances, n, random.Random(5)))
    expected = collections.Counter(label_key(i.output) for i in balanced_sample(list(instances), n, random.Random(5)))
    assert shares == expected


def test_near_duplicates_are_avoided_within_each_label():
    task = family_task(scope="In choice")  # odd families say "yes", even ones "no"
    chosen = self_bleu_sample(task.instances, 10, random.Random(2), candidates_per_step=None)
    assert len({family(i) for i in chosen}) == 10
    assert collections.Counter(i.output for i in chosen) == {"yes": 5, "no": 5}


def test_bad_options_name_themselves():
    task = family_task()
    with pytest.raises(DataError, match="test_sampling must be one of"):
        split_task(task, seed=0, test_sampling="bleu")
    with pytest.raises(DataError, match="test_sampling must be one of"):
        build_stream({"dups": task}, ["dups"], test_sampling="diverse")
    with pytest.raises(ValueError, match="candidates_per_step"):
        self_bleu_sample(task.instances, 3, random.Random(0), candidates_per_step=0)
    with pytest.raises(ValueError, match="test_sampling must be one of"):
        ContinualArguments(test_sampling="Self-BLEU")


def test_held_out_tasks_are_sampled_the_same_way():
    task = family_task()
    stream = build_stream(
        {"dups": task, "seen": family_task(scope="-")},
        ["seen"],
        ["dups"],
        max_test_instances=10,
        test_sampling="self_bleu",
    )
    expected = split_task(task, seed=42, max_test_instances=10, test_only=True, test_sampling="self_bleu")[1]
    assert [i.id for i in stream.test["dups"]] == [i.id for i in expected]
    assert stream.settings["test_sampling"] == "self_bleu"


def test_continual_arguments_reach_the_stream():
    name = load_benchmark("demo").seen[0]
    default = load_stream(ContinualArguments(), seed=42)
    diverse = load_stream(ContinualArguments(test_sampling="self_bleu"), seed=42)
    task = default.tasks[name]
    expected = split_task(
        task, seed=42, test_size=0.2, max_train_instances=40, max_test_instances=20, test_sampling="self_bleu"
    )
    assert [i.id for i in diverse.test[name]] == [i.id for i in expected[1]]
    assert [i.id for i in diverse.train[name]] == [i.id for i in expected[0]]
    assert [i.id for i in default.test[name]] == [
        i.id for i in split_task(task, seed=42, test_size=0.2, max_train_instances=40, max_test_instances=20)[1]
    ]
    assert any({i.id for i in diverse.test[t]} != {i.id for i in default.test[t]} for t in default.seen)
    assert [s.tasks for s in diverse.stages] == [s.tasks for s in default.stages]


def test_cli_summary_takes_the_option(capsys):
    assert main(["data", "summary", "--test-sampling", "self_bleu", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    stream = load_benchmark("demo").stream(test_sampling="self_bleu")
    assert summary["test_sampling"] == "self_bleu"
    assert {r["task"]: r["test"] for r in summary["tasks"]} == {t: len(v) for t, v in stream.test.items()}
    assert main(["data", "summary"]) == 0
    assert "(ST, seed 42, balanced test sampling)" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["data", "summary", "--test-sampling", "paper"])
    assert "invalid choice: 'paper'" in capsys.readouterr().err


def test_run_fingerprint_covers_the_option(tmp_path, tmp_path_factory, monkeypatch):
    from kpig_trainer.continual.runner import ContinualRunner
    from kpig_trainer.kpig.config import KPIGConfig

    monkeypatch.setenv("KPIG_CACHE", str(tmp_path_factory.getbasetemp() / "kpig-cache"))
    rows = [
        {
            "task": "only",
            "category": "C",
            "id": f"o-{k}",
            "instruction": "Answer yes or no.",
            "input": f"text {k}",
            "output": "yes",
        }
        for k in range(12)
    ]
    (tmp_path / "tasks.jsonl").write_text("\n".join(json.dumps(r) for r in rows))

    def runner(out, **options):
        args = ContinualArguments(
            model_name_or_path="tiny-llama",
            tasks=str(tmp_path / "tasks.jsonl"),
            method="init",
            evaluation="loss",
            test_size=4,
            **options,
        )
        return ContinualRunner(args, KPIGConfig(output_dir=str(tmp_path / out), report_to=[], use_cpu=True, seed=0))

    default = runner("a")
    # The hash of a run from before the option existed: every field but test_sampling and those
    # added after it (the judge's, the evaluation schedule's, the stream's task lists and the model options
    # that came with trl.ModelConfig).
    from kpig_trainer.continual.arguments import MODEL_CONFIG_OPTIONS

    later = {
        "test_sampling",
        "judge_base_url",
        "judge_model",
        "judge_api_key_env",
        "judge_cache",
        "seen_tasks",
        "held_out_tasks",
        "eval_tasks",
        "eval_init",
        "eval_split",
        "validation_size",
        *MODEL_CONFIG_OPTIONS,
    }
    fields = {k: v for k, v in dataclasses.asdict(default.args).items() if k not in later}
    training = {
        k: v
        for k, v in default.training_args.to_dict().items()
        if k
        not in {
            "output_dir",
            "logging_dir",
            "logging_steps",
            "save_steps",
            "report_to",
            "disable_tqdm",
            "save_total_limit",
            "logging_first_step",
        }
    }
    data = {"continual": fields, "training": training, "stages": [list(s.tasks) for s in default.stream.stages]}
    old = hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]
    assert default.fingerprint() == old
    assert runner("b", test_sampling="self_bleu").fingerprint() != default.fingerprint()
