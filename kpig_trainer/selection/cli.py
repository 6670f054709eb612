"""``kpig select-tasks`` and ``kpig align-embedder``.

Wire into ``kpig_trainer.cli.build_parser`` with ``selection_cli.register_cli(commands)``.
Both raise :class:`~kpig_trainer.selection.selector.SelectionError` (a ``DataError``) on bad input.
"""

from __future__ import annotations

import argparse
import json
import time

from kpig_trainer.data.benchmark import BENCHMARKS, load_benchmark
from kpig_trainer.data.summary import format_table
from kpig_trainer.selection.selector import AGGREGATES, SelectionError


def register_cli(subparsers) -> None:
    """Add the ``select-tasks`` and ``align-embedder`` subcommands to ``subparsers``."""
    select = subparsers.add_parser(
        "select-tasks",
        help="rank tasks by instruction similarity to a target task (INSTA)",
        description="Print the k tasks whose instructions are most similar to the target's.",
    )
    select.add_argument("--target", required=True, help="target task name")
    select.add_argument("--k", type=int, default=10, help="how many tasks to select (error if more than candidates)")
    select.add_argument("--benchmark", choices=BENCHMARKS, default="superni-kpig", help="shipped benchmark")
    select.add_argument(
        "--candidates",
        choices=("seen", "all"),
        default="seen",
        help="seen: the benchmark's seen (training) tasks; all: every other task",
    )
    _embedder_arguments(select)
    select.add_argument("--json", action="store_true", help="print JSON instead of a table")
    select.set_defaults(handler=run_select_tasks)

    align = subparsers.add_parser(
        "align-embedder",
        help="fine-tune the instruction embedder on the benchmark's instruction style",
        description="Align the sentence embedder on instruction pairs of the benchmark's seen tasks and save it; "
        "the separation before/after is reported on held-out tasks' pairs.",
    )
    align.add_argument("--benchmark", choices=BENCHMARKS, default="superni-kpig", help="shipped benchmark")
    align.add_argument("--out", required=True, help="folder for the aligned model (appears only when complete)")
    align.add_argument("--embedder", default=None, help="base model folder (default: embedded all-MiniLM-L6-v2)")
    align.add_argument("--pools", default=None, help="folder of <task>.jsonl instruction pools")
    align.add_argument("--epochs", type=float, default=1.0)
    align.add_argument("--max-steps", type=int, default=-1, help="overrides --epochs when > 0")
    align.add_argument(
        "--negative-threshold", type=float, default=0.3, help="base similarity below which tasks are negatives"
    )
    align.add_argument("--loss", choices=("cosine", "cosent"), default="cosine")
    align.add_argument("--batch-size", type=int, default=16)
    align.add_argument("--learning-rate", type=float, default=2e-5)
    align.add_argument("--max-seq-length", type=int, default=128, help="token limit while training (CPU cost)")
    align.add_argument("--positives-per-task", type=int, default=2)
    align.add_argument("--seed", type=int, default=0)
    align.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    align.add_argument("--no-report", action="store_true", help="skip the held-out separation report")
    align.set_defaults(handler=run_align_embedder)


def _embedder_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--embedder", default=None, help="model folder, e.g. from align-embedder (default: all-MiniLM-L6-v2)"
    )
    parser.add_argument("--aggregate", choices=AGGREGATES, default="mean", help="over instruction-variant pairs")
    parser.add_argument("--pools", default=None, help="folder of <task>.jsonl instruction pools")


def _pools(path):
    from kpig_trainer.selection.selector import load_pools

    return load_pools(path) if path else None


def run_select_tasks(args: argparse.Namespace) -> int:
    from kpig_trainer.selection.selector import InstructionSelector

    benchmark = load_benchmark(args.benchmark)
    if args.target not in benchmark.tasks:
        raise SelectionError(f"unknown target task {args.target!r} in benchmark {args.benchmark!r}")
    pool = benchmark.seen if args.candidates == "seen" else list(benchmark.tasks)
    selector = InstructionSelector(
        args.embedder,
        aggregate=args.aggregate,
        tasks=benchmark.tasks,
        pools=_pools(args.pools),
        show_progress=False,
    )
    ranking = selector.select_tasks(args.target, pool, args.k)
    rows = [
        {"rank": rank, "task": name, "score": round(score, 4), "category": benchmark.tasks[name].category}
        for rank, (name, score) in enumerate(ranking, 1)
    ]
    if args.json:
        print(json.dumps({"target": args.target, "k": args.k, "selected": rows}, indent=2))
    else:
        print(f"Top {args.k} of {args.candidates} tasks for {args.target} ({benchmark.tasks[args.target].category})")
        print(format_table(rows, ["rank", "score", "task", "category"]))
    return 0


def run_align_embedder(args: argparse.Namespace) -> int:
    from kpig_trainer.selection.align import align_embedder, build_alignment_pairs, separation_report
    from kpig_trainer.selection.selector import InstructionSelector

    benchmark = load_benchmark(args.benchmark)
    pools = _pools(args.pools)
    started = time.perf_counter()
    result = align_embedder(
        [benchmark.tasks[name] for name in benchmark.seen],
        args.out,
        pools,
        args.negative_threshold,
        args.epochs,
        embedder=args.embedder,
        loss=args.loss,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        max_seq_length=args.max_seq_length,
        positives_per_task=args.positives_per_task,
        max_steps=args.max_steps,
        seed=args.seed,
        overwrite=args.overwrite,
    )
    meta = result.metadata
    print(
        f"Aligned on {len(benchmark.seen)} seen tasks: {meta['positive_pairs']} positive + "
        f"{meta['negative_pairs']} negative pairs, {result.train_seconds:.1f} s training, "
        f"{time.perf_counter() - started:.1f} s in all; saved to {result.path}"
    )
    if args.no_report or len(benchmark.held_out) < 2:
        return 0
    before = InstructionSelector(args.embedder, tasks=benchmark.tasks, pools=pools, show_progress=False)
    pairs = build_alignment_pairs(
        benchmark.held_out, before, negative_threshold=None, negatives_per_positive=3, seed=args.seed + 1
    )
    after = InstructionSelector(result.path, tasks=benchmark.tasks, pools=pools, show_progress=False)
    rows = [
        {
            "embedder": label,
            **{k: round(v, 4) if isinstance(v, float) else v for k, v in separation_report(s, pairs).items()},
        }
        for label, s in (("base", before), ("aligned", after))
    ]
    print(f"Separation on {len(benchmark.held_out)} held-out tasks' instruction pairs (not trained on)")
    print(
        format_table(
            rows,
            [
                "embedder",
                "same_task_mean",
                "different_task_mean",
                "gap",
                "ranking_accuracy",
                "same_task_pairs",
                "different_task_pairs",
            ],
        )
    )
    return 0
