"""Replay strategies: selection rules, scores against direct computation, two-process agreement."""

import dataclasses
import math
import os

import pytest
import torch
import torch.multiprocessing as mp
from launching import free_port

from kpig_trainer.continual.replay import (
    REPLAY_STRATEGIES,
    ModelScorer,
    ReplayRequest,
    get_replay_strategy,
    lowest,
    response_entropy,
)
from kpig_trainer.data import Instance
from kpig_trainer.kpig.collator import KPIGDataCollator
from kpig_trainer.kpig.info_gain import information_gain

TASKS = ["t0", "t1", "t2", "t3", "t4"]


def make_instances(task, n=12):
    instruction = f"Answer the question about {task} with yes or no. Keep the answer short."
    return [
        Instance(
            f"{task}-{k}",
            task,
            instruction,
            f"question {k} about {task}?",
            ["yes" if k % 2 else "no"],
            key_parts=["with yes or no"],
        )
        for k in range(n)
    ]


def request(seen=TASKS, m=2, n=3, seed=0, stage=5):
    return ReplayRequest(
        stage=stage,
        seen_tasks=list(seen),
        next_tasks=["next"],
        candidates={t: make_instances(t) for t in seen},
        num_tasks=m,
        num_instances=n,
        seed=seed,
    )


class StubScorer:
    """Scores each instance by a per-task table (plus a tiny per-instance offset)."""

    def __init__(self, table):
        self.table = table
        self.calls = 0

    def information_gain(self, instances):
        self.calls += 1
        return [self.table[i.task] + int(i.id.split("-")[1]) * 1e-3 for i in instances]

    entropy = information_gain


def test_lowest_breaks_ties_by_name():
    assert lowest({"b": 0.1, "a": 0.1, "c": -1.0, "d": 2.0}, 3) == ["c", "a", "b"]


def test_sampling_is_seeded_per_stage_and_task():
    req = request()
    assert [i.id for i in req.sample("t1")] == [i.id for i in request().sample("t1")]
    assert len(req.sample("t1")) == 3
    draws = {tuple(i.id for i in request(stage=s).sample("t1")) for s in range(8)}
    assert len(draws) > 1


def test_kpig_replays_the_lowest_ig_tasks_with_their_scored_instances():
    table = {"t0": 0.5, "t1": -0.2, "t2": 0.9, "t3": 0.1, "t4": 0.3}
    req = request(m=2, n=3)
    choice = get_replay_strategy("kpig").select(req, StubScorer(table))
    assert choice.tasks == ["t1", "t3"]
    assert [i.id for i in choice.instances] == [i.id for t in ("t1", "t3") for i in req.sample(t)]
    expected = {t: table[t] + sum(int(i.id.split("-")[1]) for i in req.sample(t)) * 1e-3 / 3 for t in TASKS}
    assert choice.scores == pytest.approx(expected)
    assert choice.to_dict()["instances"][0] == ["t1", req.sample("t1")[0].id]


def test_kpig_without_seen_tasks_replays_nothing_and_needs_no_model():
    choice = get_replay_strategy("kpig").select(request(seen=[]))
    assert choice.tasks == [] and choice.instances == []
    with pytest.raises(ValueError, match="needs a model scorer"):
        get_replay_strategy("kpig").select(request())


def test_random_all_none():
    req = request(m=2, n=4)
    choice = get_replay_strategy("random").select(req)
    assert len(choice.tasks) == 2 and set(choice.tasks) <= set(TASKS)
    assert choice.tasks == sorted(choice.tasks, key=TASKS.index)
    assert choice == get_replay_strategy("random").select(request(m=2, n=4))
    picks = {tuple(get_replay_strategy("random").select(request(m=2, stage=s)).tasks) for s in range(10)}
    assert len(picks) > 1
    everything = get_replay_strategy("all").select(req)
    assert everything.tasks == TASKS and len(everything.instances) == 4 * len(TASKS)
    assert get_replay_strategy("none").select(req).instances == []
    with pytest.raises(ValueError, match="unknown replay strategy 'nope'"):
        get_replay_strategy("nope")
    assert set(REPLAY_STRATEGIES) >= {"kpig", "random", "entropy", "all", "none"}


def test_entropy_picks_the_highest_entropy_instances_across_tasks():
    table = {"t0": 0.5, "t1": 2.0, "t2": 0.1, "t3": 1.0, "t4": 0.3}
    req = request(m=2, n=3)
    choice = get_replay_strategy("entropy").select(req, StubScorer(table))
    flat = [i for t in TASKS for i in req.sample(t)]
    ranked = sorted(flat, key=lambda i: -(table[i.task] + int(i.id.split("-")[1]) * 1e-3))[:6]
    assert {i.id for i in choice.instances} == {i.id for i in ranked}
    assert choice.tasks == ["t1", "t3"]


def test_response_entropy_matches_a_naive_loop():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=gen)
    labels = torch.tensor([[-100, -100, 3, 4, -100], [-100, 1, 2, 3, 6]])
    got = response_entropy(logits, labels)
    for b in range(2):
        values = []
        for t in range(1, 5):
            if labels[b, t] != -100:
                p = torch.softmax(logits[b, t - 1].double(), -1).tolist()
                values.append(-sum(x * math.log(x) for x in p))
        assert got[b].item() == pytest.approx(sum(values) / len(values), rel=1e-5)
    assert response_entropy(logits, torch.full((2, 5), -100)).tolist() == [0.0, 0.0]


def test_model_scorer_equals_one_instance_at_a_time(tiny_model_and_tokenizer):
    model, tokenizer = tiny_model_and_tokenizer
    collator = KPIGDataCollator(tokenizer, max_length=256)
    instances = make_instances("t0", 5) + make_instances("t1", 4)
    scorer = ModelScorer(model, collator, alpha=0.3, batch_size=4, show_progress=False)
    batched = scorer.information_gain(instances)
    single = [information_gain(model, collator([i]), 0.3).item() for i in instances]
    assert batched == pytest.approx(single, abs=1e-5)
    assert any(abs(v) > 1e-6 for v in batched)


def _rank_worker(rank, world, port, model_dir, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(model_dir)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        collator = KPIGDataCollator(tokenizer, max_length=256)
        req = request(m=2, n=3)
        scorer = ModelScorer(model, collator, batch_size=2, show_progress=False)
        choice = get_replay_strategy("kpig").select(req, scorer)
        torch.save({"choice": choice.to_dict()}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.distributed
def test_two_processes_select_the_same_tasks_as_one(tiny_model_path, tmp_path, tiny_model_and_tokenizer):
    mp.spawn(_rank_worker, args=(2, free_port(), str(tiny_model_path), str(tmp_path)), nprocs=2, join=True)
    choices = [torch.load(tmp_path / f"rank{r}.pt")["choice"] for r in range(2)]
    assert choices[0] == choices[1]
    model, tokenizer = tiny_model_and_tokenizer
    alone = get_replay_strategy("kpig").select(
        request(m=2, n=3), ModelScorer(model, KPIGDataCollator(tokenizer, max_length=256), show_progress=False)
    )
    assert choices[0]["tasks"] == alone.tasks
    assert choices[0]["scores"] == pytest.approx(alone.scores, abs=1e-5)


def test_similarity_strategies_follow_the_selector():
    from kpig_trainer.data import Task
    from kpig_trainer.selection.selector import InstructionSelector, similar_seen_tasks

    definitions = {
        "sentiment": "Classify the sentiment of the movie review as positive or negative.",
        "reviews": "Decide whether the product review expresses a positive or a negative opinion.",
        "arith": "Add the two integers and output their sum as a number.",
        "lists": "Remove duplicates from the list of integers and return the list.",
        "next": "Is the restaurant review positive or negative? Answer with one word.",
    }
    tasks = {n: Task(n, "c", d, make_instances(n)) for n, d in definitions.items()}
    req = ReplayRequest(
        stage=4,
        seen_tasks=["sentiment", "reviews", "arith", "lists"],
        next_tasks=["next"],
        candidates={n: tasks[n].instances for n in definitions},
        num_tasks=2,
        num_instances=3,
        seed=0,
        tasks=tasks,
    )
    choice = get_replay_strategy("similarity").select(req)
    direct = InstructionSelector(tasks=tasks, show_progress=False).select_tasks("next", req.seen_tasks, 2)
    assert choice.tasks == [t for t, _ in direct] and set(choice.tasks) == {"sentiment", "reviews"}
    assert choice.scores == pytest.approx(dict(direct))
    # kpig+similarity: among the 2M=4 most similar, the 2 lowest IG; only those 4 are scored
    table = {"sentiment": 0.9, "reviews": 0.1, "arith": -0.5, "lists": 0.3}
    scorer = StubScorer(table)
    mixed = get_replay_strategy("kpig+similarity", top_similar=3).select(req, scorer)
    top3 = [
        t
        for t, _ in similar_seen_tasks(
            ["next"], req.seen_tasks, 3, InstructionSelector(tasks=tasks, show_progress=False)
        )
    ]
    expected = sorted(top3, key=lambda t: table[t])[:2]
    assert mixed.tasks == expected and set(mixed.scores) == set(top3)
    with pytest.raises(ValueError, match="needs a model scorer"):
        get_replay_strategy("kpig+similarity").select(req)


class NoKeyPartScorer(StubScorer):
    """The table's IG, but None (no maskable key part) for the tasks in ``without``."""

    def __init__(self, table, without):
        super().__init__(table)
        self.without = set(without)

    def information_gain(self, instances):
        values = super().information_gain(instances)
        return [None if i.task in self.without else v for i, v in zip(instances, values)]


def test_a_task_without_key_parts_is_never_replayed_for_its_ig(caplog):
    table = {"t0": 0.5, "t1": 0.2, "t2": 0.9, "t3": 0.4, "t4": 0.7}
    with caplog.at_level("WARNING", logger="kpig_trainer.continual.replay"):
        choice = get_replay_strategy("kpig").select(request(m=2, n=3), NoKeyPartScorer(table, ["t1"]))
    assert set(choice.tasks) == {"t3", "t0"}
    assert "t1" not in choice.scores
    assert "t1" in caplog.text and "maskable key part" in caplog.text


def test_a_task_with_some_unmaskable_instances_is_ranked_by_the_others(tiny_model_and_tokenizer):
    model, tokenizer = tiny_model_and_tokenizer
    req = request(seen=["t0", "t1"], m=1, n=4)
    req.candidates["t1"] = [
        dataclasses.replace(i, key_parts=[]) if k % 2 else i for k, i in enumerate(req.candidates["t1"])
    ]
    collator = KPIGDataCollator(tokenizer, max_length=256)
    scorer = ModelScorer(model, collator, show_progress=False)
    scores, samples = get_replay_strategy("kpig").task_scores(req, scorer)
    kept = [i for i in samples["t1"] if i.key_parts]
    assert 0 < len(kept) < len(samples["t1"])
    direct = [information_gain(model, collator([i]), 0.3).item() for i in kept]
    assert scores["t1"] == pytest.approx(sum(direct) / len(direct), abs=1e-5)
