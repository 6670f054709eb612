"""``kpig data summary``: tasks, categories, stage plan and instance counts of a stream."""

from __future__ import annotations

import argparse
import json
from collections import Counter
from typing import Any, Sequence

from kpig_trainer.data.benchmark import BENCHMARKS, load_annotations, load_benchmark
from kpig_trainer.data.loaders import load_splits, load_tasks
from kpig_trainer.data.stream import ORDERS, STAGE_ORDERS, TEST_SAMPLINGS, Stream, build_stream


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """Plain-text table with a header row; numbers right-aligned."""
    if not rows:
        return "(empty)"
    columns = list(columns or rows[0].keys())
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[k]) for row in cells)) for k, c in enumerate(columns)]
    numeric = [all(isinstance(r.get(c), (int, float)) for r in rows) for c in columns]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)).rstrip()

    return "\n".join([line(columns), line(["-" * w for w in widths]), *(line(r) for r in cells)])


def stream_summary(stream: Stream) -> dict[str, Any]:
    """Everything the summary prints, as plain data."""
    rows = stream.summary_rows()
    checks = {name: stream.tasks[name].key_part_check() for name in stream.seen + stream.held_out}
    categories = Counter((r["category"], r["role"]) for r in rows)
    names = sorted({r["category"] for r in rows})
    return {
        "order": stream.order,
        "seed": stream.seed,
        "test_sampling": stream.settings.get("test_sampling", "balanced"),
        "tasks": rows,
        "categories": [
            {"category": c, "seen": categories[(c, "seen")], "held-out": categories[(c, "held-out")]} for c in names
        ],
        "stages": [
            {
                "stage": s.index + 1,
                "name": s.name,
                "tasks": list(s.tasks),
                "train": sum(len(stream.train[t]) for t in s.tasks),
            }
            for s in stream.stages
        ],
        "totals": {
            "seen_tasks": len(stream.seen),
            "held_out_tasks": len(stream.held_out),
            "categories": len(names),
            "stages": len(stream.stages),
            "train_instances": sum(len(v) for v in stream.train.values()),
            "test_instances_seen": sum(len(stream.test[t]) for t in stream.seen),
            "test_instances_held_out": sum(len(stream.test[t]) for t in stream.held_out),
            "tasks_with_unmatched_key_parts": sum(bool(c.unmatched) for c in checks.values()),
            "unmaskable_tasks": sum(not c.maskable for c in checks.values()),
        },
        "unmatched_key_parts": {name: c.unmatched for name, c in checks.items() if c.unmatched},
    }


def render_summary(summary: dict[str, Any], title: str) -> str:
    stages = [{**s, "tasks": ", ".join(s["tasks"])} for s in summary["stages"]]
    totals = summary["totals"]
    return "\n\n".join(
        [
            f"{title}: {totals['seen_tasks']} seen + {totals['held_out_tasks']} held-out tasks, "
            f"{totals['categories']} categories, {totals['stages']} stages ({summary['order']}, seed {summary['seed']}, "
            f"{summary['test_sampling']} test sampling)",
            "Tasks\n" + format_table(summary["tasks"]),
            "Categories\n" + format_table(summary["categories"]),
            "Stage plan\n" + format_table(stages, ["stage", "name", "train", "tasks"]),
            "Instances: {train_instances} train, {test_instances_seen} test (seen), "
            "{test_instances_held_out} test (held-out)".format(**totals),
            "Key parts: {tasks_with_unmatched_key_parts} task(s) name key parts not found in their instruction; "
            "{unmaskable_tasks} task(s) have nothing to mask (masked twin = instance, IG 0)".format(**totals)
            + "".join(f"\n  {name}: {parts}" for name, parts in summary["unmatched_key_parts"].items()),
        ]
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_argument_group("data source (default: the shipped demo benchmark)")
    source.add_argument("--benchmark", choices=BENCHMARKS, default="demo", help="shipped benchmark")
    source.add_argument("--tasks", help="SuperNI task folder, SuperNI .json or .jsonl file (instead of --benchmark)")
    source.add_argument("--annotations", help="annotations JSON for --tasks (metric, scope, format, key parts)")
    source.add_argument(
        "--splits", help="splits JSON for --tasks ({'seen': [...], 'held_out': [...]}); default: all seen"
    )
    stream = parser.add_argument_group("stream")
    stream.add_argument(
        "--order", choices=ORDERS, default="ST", help="ST: one task per stage; SC: one category per stage"
    )
    stream.add_argument(
        "--stage-order", choices=STAGE_ORDERS, default="given", help="keep the given order or shuffle (seeded)"
    )
    stream.add_argument("--seed", type=int, default=42)
    stream.add_argument(
        "--test-size",
        type=float,
        default=0.2,
        help="fraction (<1) or count (>=1, the paper: 100) of test instances per seen task; "
        "a task too small for the count gives half its instances",
    )
    stream.add_argument(
        "--test-sampling",
        choices=TEST_SAMPLINGS,
        default="balanced",
        help="balanced: seeded draw spread over labels; self_bleu: spread over labels and "
        "diverse (low Self-BLEU), as the KPIG paper",
    )
    stream.add_argument("--max-train", type=int, default=None, help="cap of train instances per task")
    stream.add_argument("--max-test", type=int, default=None, help="cap of test instances per task")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")


def run(args: argparse.Namespace) -> int:
    test_size: int | float = int(args.test_size) if args.test_size >= 1 else args.test_size
    options = {
        "order": args.order,
        "stage_order": args.stage_order,
        "seed": args.seed,
        "test_size": test_size,
        "test_sampling": args.test_sampling,
    }
    if args.tasks:
        annotations = load_annotations(args.annotations) if args.annotations else None
        tasks = load_tasks(args.tasks, annotations=annotations)
        split = load_splits(args.splits, known_tasks=tasks) if args.splits else None
        seen, held_out = (split.seen, split.held_out) if split else (list(tasks), [])
        stream = build_stream(
            tasks,
            seen,
            held_out,
            max_train_instances=args.max_train,
            max_test_instances=args.max_test or 100,
            **options,
        )
        title = str(args.tasks)
    else:
        benchmark = load_benchmark(args.benchmark)
        caps = {k: v for k, v in (("max_train_instances", args.max_train), ("max_test_instances", args.max_test)) if v}
        stream = benchmark.stream(**options, **caps)
        title = f"benchmark {benchmark.name}"
    summary = stream_summary(stream)
    print(json.dumps(summary, indent=2) if args.json else render_summary(summary, title))
    return 0
