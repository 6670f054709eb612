"""``kpig diversify``: grow instruction pools, or measure the offline key-part extractor.

Examples::

    kpig diversify --benchmark demo --out pools/ --offline
    OPENAI_API_KEY=... kpig diversify --benchmark superni-kpig --out pools/ \\
        --base-url https://api.openai.com/v1 --model gpt-4o-mini --concurrency 8
    kpig diversify --tasks my_tasks.jsonl --task qa --out pools/ --base-url http://localhost:8000/v1 \\
        --model Qwen/Qwen2.5-7B-Instruct --api-key-env VLLM_KEY
    kpig diversify --benchmark superni-kpig --evaluate-heuristic
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from kpig_trainer.data.benchmark import BENCHMARKS, load_annotations, load_benchmark
from kpig_trainer.data.loaders import load_tasks
from kpig_trainer.data.records import DataError
from kpig_trainer.diversity.client import DiversityClient, DiversityError

__all__ = ["add_arguments", "register_cli", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``kpig diversify``."""
    source = parser.add_argument_group("tasks (default: the shipped demo benchmark)")
    choice = source.add_mutually_exclusive_group()
    choice.add_argument("--benchmark", choices=BENCHMARKS, help="shipped benchmark")
    choice.add_argument("--tasks", help="SuperNI task folder, SuperNI .json or .jsonl file")
    source.add_argument("--annotations", help="annotations JSON for --tasks (hand-written key parts)")
    source.add_argument("--task", action="append", default=[], metavar="NAME", help="only this task (repeatable)")
    pools = parser.add_argument_group("pools")
    pools.add_argument(
        "--out", help="folder of the JSONL pools (one file per task); required unless --evaluate-heuristic"
    )
    pools.add_argument("--pool-size", type=int, default=31, help="entries per task, seed included (default: 31)")
    pools.add_argument("--strategies", help="comma-separated subset of the strategies (default: all)")
    pools.add_argument("--seed", type=int, default=0, help="seed of the random choices")
    pools.add_argument(
        "--max-attempts-per-entry",
        type=int,
        default=5,
        help="attempts per missing entry before a task is given up (default: 5)",
    )
    endpoint = parser.add_argument_group("LLM endpoint (without --base-url the offline heuristic is used)")
    endpoint.add_argument("--base-url", help="OpenAI-compatible root, e.g. https://api.openai.com/v1")
    endpoint.add_argument("--model", help="model name")
    endpoint.add_argument(
        "--api-key-env", default="OPENAI_API_KEY", help="variable holding the key (default: OPENAI_API_KEY)"
    )
    endpoint.add_argument("--temperature", type=float, default=0.7)
    endpoint.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    endpoint.add_argument(
        "--max-attempts", type=int, default=6, help="tries per request (retries on 429/5xx/timeouts)"
    )
    endpoint.add_argument("--concurrency", type=int, default=4, help="tasks processed at once (default: 4)")
    endpoint.add_argument("--templates", help="folder of prompt-template overrides (extract.txt, breadth.txt, ...)")
    endpoint.add_argument("--offline", action="store_true", help="use the offline heuristic (no network)")
    output = parser.add_argument_group("output")
    output.add_argument("--json", action="store_true", help="print the summary as JSON")
    output.add_argument("--no-progress", action="store_true", help="no progress bar")
    output.add_argument(
        "--evaluate-heuristic",
        action="store_true",
        help="instead of growing pools: compare the offline key-part extractor with the tasks' "
        "hand-written key parts (character-level span precision/recall) and exit",
    )


def register_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``diversify`` subcommand to a ``kpig`` subparsers object."""
    parser = subparsers.add_parser(
        "diversify",
        help="grow instruction pools with key parts (LLM endpoint or offline heuristic)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    parser.set_defaults(handler=run)
    return parser


def _select_tasks(args: argparse.Namespace) -> dict:
    if args.tasks:
        annotations = load_annotations(args.annotations) if args.annotations else None
        tasks = load_tasks(args.tasks, annotations=annotations)
    else:
        tasks = load_benchmark(args.benchmark or "demo").tasks
    if args.task:
        unknown = [name for name in args.task if name not in tasks]
        if unknown:
            more = " ..." if len(tasks) > 10 else ""
            raise DataError(f"unknown task(s) {unknown}; known: {sorted(tasks)[:10]}{more}")
        tasks = {name: tasks[name] for name in args.task}
    return tasks


def run(args: argparse.Namespace) -> int:
    """Run ``kpig diversify``; exit 0 when every pool is complete, 1 when some are not, 2 on errors."""
    from kpig_trainer.diversity.heuristic import evaluate_heuristic, format_evaluation
    from kpig_trainer.diversity.pool import diversify

    # One INFO line per HTTP request from the openai client's transport drowns the progress bar.
    for name in ("httpx", "httpx2", "openai"):
        logging.getLogger(name).setLevel(logging.WARNING)
    tasks = _select_tasks(args)
    if args.evaluate_heuristic:
        result = evaluate_heuristic(tasks)
        print(json.dumps(result, indent=2) if args.json else format_evaluation(result))
        return 0
    if not args.out:
        print("error: --out is required", file=sys.stderr)
        return 2
    if args.offline and args.base_url:
        print("error: --offline and --base-url exclude each other", file=sys.stderr)
        return 2
    try:
        client = None
        if args.base_url:
            if not args.model:
                print("error: --base-url needs --model", file=sys.stderr)
                return 2
            client = DiversityClient(
                args.base_url,
                args.model,
                api_key_env=args.api_key_env,
                temperature=args.temperature,
                timeout=args.timeout,
                max_attempts=args.max_attempts,
            )
        strategies = [s.strip() for s in args.strategies.split(",") if s.strip()] if args.strategies else None
        summary = diversify(
            tasks,
            pool_size=args.pool_size,
            client=client,
            cache_dir=args.out,
            concurrency=args.concurrency,
            seed=args.seed,
            strategies=strategies,
            templates=args.templates,
            max_attempts_per_entry=args.max_attempts_per_entry,
            progress=not args.no_progress,
        )
    except DiversityError as error:
        if error.summary is not None:
            print(json.dumps(error.summary.to_dict(), indent=2) if args.json else error.summary.format_table())
        print(f"error: {error}", file=sys.stderr)
        return 2
    except ValueError as error:  # bad --strategies and the like (DataError is a ValueError too)
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"interrupted: accepted entries are saved in {args.out}; rerun the same command to resume", file=sys.stderr
        )
        return 130
    print(json.dumps(summary.to_dict(), indent=2) if args.json else summary.format_table())
    return 0 if summary.complete else 1
