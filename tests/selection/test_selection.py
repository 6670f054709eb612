"""INSTA task selection: selector, caching, alignment, replay helpers, CLI and bad input.

Runs on the shipped SuperNI-KPIG benchmark with the embedded all-MiniLM-L6-v2 (offline).
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from kpig_trainer.data import Task, load_benchmark  # noqa: E402
from kpig_trainer.selection.align import (  # noqa: E402
    InstructionPair,
    align_embedder,
    build_alignment_pairs,
    instruction_views,
    separation_report,
    split_sentences,
)
from kpig_trainer.selection.selector import (  # noqa: E402
    InstructionSelector,
    SelectionError,
    kpig_similarity_tasks,
    load_pools,
    lowest_ig_among,
    select_training_tasks,
    similar_seen_tasks,
    task_instructions,
)

WINOMT = (
    "task340_winomt_classification_gender_pro",
    "task341_winomt_classification_gender_anti",
    "task342_winomt_classification_profession_pro",
    "task351_winomt_classification_gender_identifiability_anti",
)

# Hand-written paraphrases that keep each task's key parts.
VARIANTS = {
    "task1604_ethos_text_classification": [
        "You will read a comment. Decide whether it is 'hate' speech or 'not hate' speech, and reply with "
        "'hate' or 'not hate' only.",
        "Label the given comment as hate speech or not. Your answer must be either 'hate' or 'not hate'.",
    ],
    "task208_combinations_of_list": [
        "You get a list of integers and letters inside [] separated by commas. Make every list that results "
        "from dropping exactly one item of the input list, and output a list of all those lists.",
        "Drop one item at a time from the given list (integers and letters, comma-separated, in brackets) and "
        "write a list containing all the possible lists obtained this way.",
    ],
    "task1447_drug_extraction_ade": [
        "Read the sentence and recognize the name of the drug or medicine mentioned in it. If several "
        "answers are correct, write only one of them.",
        "Identify the drug or medicine named in the given sentence (a substance that changes a person's "
        "mental or physical state) and write its name; one correct answer is enough.",
    ],
}


@pytest.fixture(scope="module")
def benchmark():
    return load_benchmark("superni-kpig")


@pytest.fixture(scope="module")
def selector(benchmark):
    return InstructionSelector(tasks=benchmark.tasks, show_progress=False)


def _task(name: str, definition: str) -> Task:
    return Task(name=name, category="Test", definition=definition)


# ---------------------------------------------------------------------------------------------
# Ranking on the shipped benchmark


def test_hand_written_variants_rank_their_own_task_first(benchmark, selector):
    everything = list(benchmark.tasks)
    for name, variants in VARIANTS.items():
        for index, text in enumerate(variants):
            ranking = selector.select_tasks(_task(f"variant-{index}", text), everything, k=3)
            assert ranking[0][0] == name, (name, index, ranking)
            assert ranking[0][1] - ranking[1][1] > 0.1, (name, index, ranking)


def test_pooled_variants_rank_each_other_above_unrelated_tasks(benchmark, selector):
    pools = {
        name: [{"instruction": benchmark.tasks[name].definition}] + [{"instruction": v} for v in variants]
        for name, variants in VARIANTS.items()
    }
    for aggregate in ("mean", "max"):
        pooled = InstructionSelector(
            selector.model, aggregate=aggregate, tasks=benchmark.tasks, pools=pools, show_progress=False
        )
        for name, variants in VARIANTS.items():
            copy = _task(f"{name}-copy", variants[0])
            # The copy (one variant) against all tasks: its own task, embedded through the pool, wins.
            assert pooled.select_tasks(copy, list(benchmark.tasks), k=1)[0][0] == name
            own = pooled.score(copy, name)
            others = [n for n in VARIANTS if n != name]
            assert all(own > pooled.score(copy, other) + 0.2 for other in others)


def test_winomt_gender_tasks_rank_each_other_in_the_top_3(benchmark, selector):
    everything = list(benchmark.tasks)
    ranks = {}
    for target in WINOMT:
        ranking = [name for name, _ in selector.select_tasks(target, everything, k=len(everything) - 1)]
        ranks[target] = {other: ranking.index(other) + 1 for other in WINOMT if other != target}
    # The held-out task340 and the seen task341 share their definition: each is the other's first.
    assert ranks[WINOMT[0]][WINOMT[1]] == 1 and ranks[WINOMT[1]][WINOMT[0]] == 1
    # All four winomt tasks are each other's top 3 among the 101 tasks.
    assert all(rank <= 3 for row in ranks.values() for rank in row.values()), ranks


def test_scores_are_mean_or_max_of_pairwise_cosines(benchmark, selector):
    a, b = "task1604_ethos_text_classification", "task1447_drug_extraction_ade"
    pools = {n: [{"instruction": t} for t in [benchmark.tasks[n].definition, *VARIANTS[n]]] for n in (a, b)}
    mean = InstructionSelector(selector.model, tasks=benchmark.tasks, pools=pools, show_progress=False)
    vectors = {n: mean.model.encode([p["instruction"] for p in pools[n]], normalize_embeddings=True) for n in (a, b)}
    cosines = vectors[a] @ vectors[b].T
    assert cosines.shape == (3, 3)
    assert mean.score(a, b) == pytest.approx(float(cosines.mean()), abs=1e-5)
    maximum = InstructionSelector(mean.model, aggregate="max", tasks=benchmark.tasks, pools=pools, show_progress=False)
    assert maximum.score(a, b) == pytest.approx(float(cosines.max()), abs=1e-5)
    assert task_instructions(benchmark.tasks[a], pools) == [p["instruction"] for p in pools[a]]


def test_insta_training_set_builds_a_stream_of_the_selected_tasks(benchmark, selector):
    target = "task1604_ethos_text_classification"
    chosen = select_training_tasks(benchmark, target, 4, selector)
    assert chosen == [name for name, _ in selector.select_tasks(target, benchmark.seen, 4)]
    stream = benchmark.stream(seen=chosen, held_out=[target], max_train_instances=2, max_test_instances=2)
    assert stream.seen == chosen and stream.held_out == [target]
    with pytest.raises(SelectionError, match="unknown target task 'nope'"):
        select_training_tasks(benchmark, "nope", 4, selector)


# ---------------------------------------------------------------------------------------------
# Caching


class _CountingModel:
    """Wraps a SentenceTransformer and counts the texts it encodes."""

    def __init__(self, model):
        self.model, self.encoded = model, 0

    def encode(self, texts, **kwargs):
        self.encoded += len(texts)
        return self.model.encode(texts, **kwargs)

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __repr__(self):
        return repr(self.model)


def test_embeddings_are_cached_in_memory_and_on_disk(selector, tmp_path, monkeypatch):
    from kpig_trainer.selection import selector as selection

    monkeypatch.setattr(selection, "_MEMORY_CACHE", {})  # a clean process-wide cache for this test
    tasks = {
        f"probe{i}": _task(f"probe{i}", f"Probe {i}: {text}")
        for i, text in enumerate(
            [
                "Translate the sentence into French.",
                "Count the nouns.",
                "Summarize the article in one line.",
                "Classify the review as positive or negative.",
                "Write a title for the story.",
                "Sort the list.",
            ]
        )
    }
    names = list(tasks)
    counting = _CountingModel(selector.model)
    first = InstructionSelector(counting, tasks=tasks, cache=tmp_path, show_progress=False)
    assert first.fingerprint == selector.fingerprint  # same weights, same identity
    expected = first.select_tasks(names[0], names, k=3)
    assert counting.encoded == 6
    assert first.select_tasks(names[0], names, k=3) == expected and counting.encoded == 6
    # Another selector of the same model shares the in-memory cache.
    shared = InstructionSelector(counting, aggregate="max", tasks=tasks, show_progress=False)
    assert shared.select_tasks(names[0], names, k=3) == expected and counting.encoded == 6
    assert (tmp_path / f"{first.fingerprint}.npz").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp file left
    monkeypatch.setattr(selection, "_MEMORY_CACHE", {})  # as in a new process: only the disk cache is left
    second = InstructionSelector(counting, tasks=tasks, cache=tmp_path, show_progress=False)
    assert second.select_tasks(names[0], names, k=3) == expected and counting.encoded == 6
    uncached = InstructionSelector(counting, tasks=tasks, cache=False, show_progress=False)
    ranking = uncached.select_tasks(names[0], names, k=3)
    assert [n for n, _ in ranking] == [n for n, _ in expected]
    assert np.allclose([s for _, s in ranking], [s for _, s in expected], atol=1e-5)
    assert counting.encoded == 12  # no cache: encoded again, once


# ---------------------------------------------------------------------------------------------
# Bad input


def test_bad_input_gives_clear_errors(benchmark, selector, tmp_path):
    seen = benchmark.seen
    with pytest.raises(SelectionError, match="task 'empty' has no instruction"):
        selector.select_tasks(_task("empty", "   "), seen, k=3)
    with pytest.raises(SelectionError, match="k=75 exceeds the 74 candidate tasks"):
        selector.select_tasks("task340_winomt_classification_gender_pro", seen, k=75)
    with pytest.raises(SelectionError, match="k must be a positive integer"):
        selector.select_tasks(seen[0], seen, k=0)
    with pytest.raises(SelectionError, match="unknown task 'no_such_task'"):
        selector.select_tasks("no_such_task", seen, k=1)
    with pytest.raises(SelectionError, match="pool entry 1 has no 'instruction'"):
        task_instructions(benchmark.tasks[seen[0]], {seen[0]: [{"instruction": "x"}, {"text": "y"}]})
    with pytest.raises(SelectionError, match="aggregate must be one of"):
        InstructionSelector(selector.model, aggregate="median")
    missing = tmp_path / "missing-model"
    with pytest.raises(SelectionError, match=f"embedder path '{missing}' does not exist"):
        InstructionSelector(str(missing))
    (tmp_path / "empty").mkdir()
    with pytest.raises(SelectionError, match="holds no modules.json or config.json"):
        InstructionSelector(tmp_path / "empty")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "modules.json").write_text("not json")
    with pytest.raises(SelectionError, match="'.*broken' does not load as a SentenceTransformer"):
        InstructionSelector(tmp_path / "broken")


def test_load_pools_reads_jsonl_and_drops_a_torn_last_line(tmp_path, caplog):
    rows = [{"instruction": "Classify the comment.", "key_parts": []}, {"instruction": "Label the comment."}]
    (tmp_path / "task_a.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + '\n{"instruction": "Lab')
    assert load_pools(tmp_path) == {"task_a": rows}
    assert "incomplete or corrupt" in caplog.text
    (tmp_path / "task_b.jsonl").write_text('{"instruction": \n{"instruction": "ok"}\n')
    with pytest.raises(SelectionError, match="task_b.jsonl: line 1: corrupt pool entry"):
        load_pools(tmp_path)
    with pytest.raises(SelectionError, match="does not exist"):
        load_pools(tmp_path / "nowhere")


# ---------------------------------------------------------------------------------------------
# Replay helpers (`similarity`, `kpig+similarity`)


def test_similar_seen_tasks_equals_select_tasks(benchmark, selector):
    seen = benchmark.seen[:40]
    nxt = "task340_winomt_classification_gender_pro"
    assert similar_seen_tasks([nxt], seen, 5, selector) == selector.select_tasks(nxt, seen, 5)
    # Several next tasks: a seen task scores its best similarity to any of them.
    stage = [nxt, "task219_rocstories_title_answer_generation"]
    merged: dict[str, float] = {}
    for target in stage:
        for name, score in selector.select_tasks(target, seen, len(seen)):
            merged[name] = max(score, merged.get(name, -1.0))
    expected = sorted(merged.items(), key=lambda item: (-item[1], item[0]))[:6]
    assert similar_seen_tasks(stage, seen, 6, selector) == expected
    # Clamped early in a stream; next-stage tasks are never replayed.
    assert [n for n, _ in similar_seen_tasks([nxt], seen[:2], 10, selector)] == [
        n for n, _ in selector.select_tasks(nxt, seen[:2], 2)
    ]
    assert all(n != seen[0] for n, _ in similar_seen_tasks([seen[0]], seen[:5], 5, selector))


def test_kpig_similarity_picks_the_lowest_ig_among_the_most_similar(benchmark, selector):
    seen, nxt = benchmark.seen, "task340_winomt_classification_gender_pro"
    top4 = [name for name, _ in selector.select_tasks(nxt, seen, 4)]
    ig = {name: 1.0 for name in seen}
    ig[top4[0]], ig[top4[2]], ig[top4[3]] = 0.9, 0.2, 0.5
    far = selector.select_tasks(nxt, seen, len(seen))[-1][0]
    ig[far] = -5.0  # lowest IG of all, but not similar: never chosen
    chosen = kpig_similarity_tasks([nxt], seen, ig, 2, selector, top_similar=4)
    assert chosen == [(top4[2], 0.2), (top4[3], 0.5)]
    assert [n for n, _ in kpig_similarity_tasks([nxt], seen, ig, 2, selector)] == [top4[2], top4[3]]  # default 2*m
    assert lowest_ig_among([("a", 0.9), ("b", 0.8)], {"a": 0.1, "b": 0.1}, 1) == [("a", 0.1)]  # tie: more similar
    with pytest.raises(SelectionError, match=r"no IG for the similar tasks \['b'\]"):
        lowest_ig_among([("a", 0.9), ("b", 0.8)], {"a": 0.1}, 1)


# ---------------------------------------------------------------------------------------------
# Alignment


def test_instruction_views_and_pairs(benchmark, selector):
    task = benchmark.tasks["task208_combinations_of_list"]
    assert len(split_sentences(task.definition)) == 6
    views = instruction_views(task)
    assert views[0] == task.definition and len(views) == 4 and len(set(views)) == 4
    assert instruction_views(task) == views  # seeded
    pools = {task.name: [{"instruction": task.definition}, *({"instruction": v} for v in VARIANTS[task.name])]}
    assert set(instruction_views(task, pools)) == {p["instruction"] for p in pools[task.name]}
    names = benchmark.seen[:20]
    pairs = build_alignment_pairs(names, selector, negative_threshold=0.3)
    positives = [p for p in pairs if p.same_task]
    negatives = [p for p in pairs if not p.same_task]
    assert len(positives) == 2 * len(names) and len(negatives) == len(positives)
    assert all(selector.score(p.task_a, p.task_b) < 0.3 for p in negatives)
    assert all(p.text_a != p.text_b for p in positives)


def test_separation_report_matches_a_direct_computation():
    vectors = {"a1": [1, 0, 0], "a2": [0.9, 0.1, 0], "b1": [0, 1, 0], "b2": [0.8, 0.6, 0], "c1": [0, 0, 1]}

    class Fixed:
        def embed(self, texts):
            rows = np.array([vectors[t] for t in texts], dtype=np.float32)
            return rows / np.linalg.norm(rows, axis=1, keepdims=True)

    pairs = [
        InstructionPair("a1", "a2", "a", "a"),
        InstructionPair("b1", "b2", "b", "b"),
        InstructionPair("a1", "c1", "a", "c"),
        InstructionPair("b1", "c1", "b", "c"),
    ]
    report = separation_report(Fixed(), pairs)
    cos = lambda x, y: float(np.dot(*Fixed().embed([x, y])))  # noqa: E731
    assert report["same_task_mean"] == pytest.approx((cos("a1", "a2") + cos("b1", "b2")) / 2)
    assert report["different_task_mean"] == pytest.approx(0.0, abs=1e-6)
    # For a1, a2 (0.99) beats b1, b2 (0.8), c1; for b1, b2 (0.6) beats a1, a2 (0.11), c1.
    assert report["ranking_accuracy"] == 1.0
    pairs.append(InstructionPair("b2", "b1", "b", "b"))  # for b2, a1 (0.8) and a2 beat b1 (0.6)
    assert separation_report(Fixed(), pairs)["ranking_accuracy"] == pytest.approx(2 / 3)


@pytest.mark.slow
def test_alignment_raises_separation_on_held_out_tasks(benchmark, selector, tmp_path):
    train_tasks, eval_tasks = benchmark.seen[:8], benchmark.held_out[:8]
    eval_pairs = build_alignment_pairs(eval_tasks, selector, negative_threshold=None, negatives_per_positive=3, seed=1)
    before = separation_report(selector, eval_pairs)
    out = tmp_path / "aligned"
    result = align_embedder(
        [benchmark.tasks[n] for n in train_tasks],
        out,
        embedder=selector.model,
        batch_size=16,
        learning_rate=5e-5,
        max_seq_length=64,
        show_progress=False,
    )  # 8 tasks x (2 positive + 2 negative pairs) = 2 steps of 16 pairs
    assert len(result.pairs) == 32 and result.metadata["positive_pairs"] == 16
    trained_texts = {t for p in result.pairs for t in (p.text_a, p.text_b)}
    assert not trained_texts & {t for p in eval_pairs for t in (p.text_a, p.text_b)}
    assert (out / "kpig_alignment.json").is_file() and [p.name for p in tmp_path.iterdir()] == ["aligned"]
    aligned = InstructionSelector(out, tasks=benchmark.tasks, show_progress=False)  # reloads by path
    assert aligned.fingerprint != selector.fingerprint
    probe = [benchmark.tasks[n].definition for n in eval_tasks[:3]]
    assert np.allclose(aligned.embed(probe), result.model.encode(probe, normalize_embeddings=True), atol=1e-5)
    after = separation_report(aligned, eval_pairs)
    print(
        f"\nseparation on {len(eval_tasks)} held-out tasks, {before['same_task_pairs']} same / "
        f"{before['different_task_pairs']} different pairs: before {before} after {after}"
    )
    assert after["gap"] > before["gap"]
    assert after["different_task_mean"] < before["different_task_mean"]
    assert after["ranking_accuracy"] >= before["ranking_accuracy"]
    with pytest.raises(SelectionError, match="exists; pass overwrite=True"):
        align_embedder([benchmark.tasks[n] for n in train_tasks], out)


# ---------------------------------------------------------------------------------------------
# CLI


@pytest.fixture(scope="module")
def parser():
    from kpig_trainer.selection.cli import register_cli

    parser = argparse.ArgumentParser(prog="kpig")
    register_cli(parser.add_subparsers(dest="command", required=True))
    return parser


def test_select_tasks_cli(parser, capsys):
    args = parser.parse_args(["select-tasks", "--target", WINOMT[0], "--k", "3", "--json"])
    assert args.handler(args) == 0
    selected = json.loads(capsys.readouterr().out)["selected"]
    assert [row["task"] for row in selected] == [WINOMT[1], WINOMT[2], WINOMT[3]]
    args = parser.parse_args(["select-tasks", "--target", WINOMT[0], "--benchmark", "demo", "--k", "2"])
    assert args.handler(args) == 0
    out = capsys.readouterr().out
    assert "Top 2 of seen tasks" in out and WINOMT[1] in out
    args = parser.parse_args(["select-tasks", "--target", WINOMT[0], "--benchmark", "demo", "--k", "13"])
    with pytest.raises(SelectionError, match="k=13 exceeds the 12 candidate tasks"):
        args.handler(args)
    args = parser.parse_args(["select-tasks", "--target", "nope", "--k", "1"])
    with pytest.raises(SelectionError, match="unknown target task 'nope'"):
        args.handler(args)


def test_align_embedder_cli_refuses_to_overwrite(parser, tmp_path):
    (tmp_path / "out").mkdir()
    args = parser.parse_args(
        ["align-embedder", "--benchmark", "demo", "--out", str(tmp_path / "out"), "--epochs", "2"]
    )
    assert args.epochs == 2.0 and args.negative_threshold == 0.3 and not args.overwrite
    with pytest.raises(SelectionError, match="exists"):
        args.handler(args)
