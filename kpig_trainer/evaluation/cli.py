"""``kpig eval`` and ``kpig compare``.

``kpig eval`` evaluates a model or checkpoint (optionally with a PEFT adapter) on the test
instances of a benchmark or a task file, and writes report.json, report.md and plots.
Test instances are drawn exactly as the stream does (seeded per task: ``split_task``), so a
checkpoint of a continual run is scored on the very instances the run scores.

``kpig compare RUN [RUN ...]`` prints the runs side by side in the paper's Table 1 layout.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any, Sequence

__all__ = ["add_compare_arguments", "add_eval_arguments", "main", "register_cli", "run_compare", "run_eval"]

logger = logging.getLogger(__name__)


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``kpig eval``."""
    parser.add_argument("--model", required=True, help="embedded alias (smollm2, tiny-llama), local path or Hub id")
    parser.add_argument("--adapter", help="PEFT adapter directory to load on top of --model")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--benchmark", choices=("demo", "superni-kpig"), help="shipped benchmark (default: demo)")
    source.add_argument("--tasks", type=Path, help="SuperNI task directory, .json or .jsonl file")
    parser.add_argument("--task", action="append", default=[], metavar="NAME", help="evaluate only this task (repeat)")
    parser.add_argument(
        "--held-out",
        action="append",
        default=[],
        metavar="NAME",
        help="with --tasks: treat this task as held-out (repeat); a benchmark has its own split",
    )
    parser.add_argument(
        "--max-test", type=int, help="test instances per task (default: the benchmark's cap, else 100)"
    )
    parser.add_argument("--seed", type=int, default=42, help="seed of the test split (the stream's; default 42)")
    parser.add_argument(
        "--test-size",
        type=float,
        default=0.2,
        help="test instances per seen task, as the run's test_size: a fraction (<1) or a count",
    )
    parser.add_argument(
        "--test-sampling",
        choices=("balanced", "self_bleu"),
        default="balanced",
        help="how the run drew its test instances (its test_sampling; default balanced)",
    )
    parser.add_argument(
        "--out", type=Path, default=Path("eval-report"), help="output directory (default: eval-report)"
    )
    parser.add_argument("--name", help="run name in tables (default: the model, plus the adapter)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, help="one budget for every task (default: per-task rule)")
    parser.add_argument(
        "--held-out-demonstrations",
        type=int,
        default=2,
        help="positive examples in the context of held-out tasks (default 2, the paper's protocol)",
    )
    parser.add_argument("--system-prompt", help="system turn, as used in training")
    parser.add_argument("--ig", action="store_true", help="also measure the mean information gain per task")
    parser.add_argument("--alpha", type=float, default=0.3, help="decay of Info for IG (default 0.3)")
    parser.add_argument("--judge-base-url", help="OpenAI-compatible endpoint for GPT-metric tasks")
    parser.add_argument("--judge-model", default="gpt-4o", help="judge model name (default gpt-4o)")
    parser.add_argument(
        "--judge-api-key-env",
        default="OPENAI_API_KEY",
        help="env var with the judge's key; '' for an endpoint that needs none",
    )
    parser.add_argument(
        "--probes", action="store_true", help="run the half-listening probes of the tasks that have one"
    )
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--threads", type=int, help="torch CPU threads (1 is fastest on a busy CPU)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_compare_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``kpig compare``."""
    parser.add_argument("runs", nargs="+", type=Path, help="run directories or report.json files")
    parser.add_argument("--names", nargs="+", help="row labels, one per run (default: the reports' names)")
    parser.add_argument("--out", type=Path, help="also write the markdown table to this file")


def register_cli(subparsers) -> None:
    """Add the ``eval`` and ``compare`` subcommands to a ``kpig`` subparsers object."""
    evaluate = subparsers.add_parser(
        "eval",
        help="evaluate a model or checkpoint; write report.json/.md and plots",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_eval_arguments(evaluate)
    evaluate.set_defaults(handler=run_eval)
    compare = subparsers.add_parser("compare", help="put reports side by side (the paper's Table 1 layout)")
    add_compare_arguments(compare)
    compare.set_defaults(handler=run_compare)


def _select(args: argparse.Namespace) -> tuple[dict, list[str], list[str], int | None, str]:
    """``(tasks, seen, held_out, max_test, source)`` from the command line."""
    from kpig_trainer.data import DataError, load_benchmark, load_tasks

    if args.tasks is not None:
        tasks = load_tasks(args.tasks)
        unknown = [n for n in args.held_out if n not in tasks]
        if unknown:
            raise DataError(f"--held-out names unknown task(s): {unknown}")
        held_out = [n for n in tasks if n in args.held_out]
        seen = [n for n in tasks if n not in held_out]
        max_test, source = args.max_test or 100, str(args.tasks)
    else:
        if args.held_out:
            raise DataError("--held-out applies to --tasks; a benchmark has its own split")
        benchmark = load_benchmark(args.benchmark or "demo")
        tasks, seen, held_out = benchmark.tasks, list(benchmark.seen), list(benchmark.held_out)
        max_test, source = args.max_test or benchmark.max_test_instances, benchmark.name
    if args.task:
        unknown = [n for n in args.task if n not in tasks]
        if unknown:
            raise DataError(f"--task names unknown task(s): {unknown}; known: {sorted(tasks)[:10]}...")
        seen = [n for n in seen if n in args.task]
        held_out = [n for n in held_out if n in args.task]
    return tasks, seen, held_out, max_test, source


def _load(args: argparse.Namespace):
    import torch

    from kpig_trainer.models import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(args.model)
    if args.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, args.adapter)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return model.to(device).eval(), tokenizer, device


def run_eval(args: argparse.Namespace) -> int:
    """Run ``kpig eval``; returns the exit status."""
    started = time.perf_counter()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from kpig_trainer.data.stream import split_task
    from kpig_trainer.evaluation.evaluate import evaluate_tasks
    from kpig_trainer.evaluation.judge import LLMJudge
    from kpig_trainer.evaluation.report import render_markdown, write_report

    tasks, seen, held_out, max_test, source = _select(args)
    instances = {}
    for name in seen + held_out:
        _, instances[name] = split_task(
            tasks[name],
            seed=args.seed,
            max_test_instances=max_test,
            test_only=name in held_out,
            test_size=int(args.test_size) if args.test_size >= 1 else args.test_size,
            test_sampling=args.test_sampling,
        )
    model, tokenizer, device = _load(args)
    loaded = time.perf_counter()
    judge = None
    if args.judge_base_url:
        judge = LLMJudge(
            base_url=args.judge_base_url,
            model=args.judge_model,
            api_key_env=args.judge_api_key_env or None,
            cache_path=args.out / "judge_cache.jsonl",
        )
        if not judge.available:
            logger.warning("the LLM judge is not usable: $%s is not set", args.judge_api_key_env)
    result = evaluate_tasks(
        model,
        tokenizer,
        tasks,
        instances,
        held_out=held_out,
        judge=judge,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        held_out_demonstrations=args.held_out_demonstrations,
        system_prompt=args.system_prompt,
        compute_ig=args.ig,
        alpha=args.alpha,
        show_progress=not args.no_progress,
    )
    probes = _run_probes(args, model, tokenizer, tasks, instances) if args.probes else {}
    name = args.name or (args.model + (f" + {Path(args.adapter).name}" if args.adapter else ""))
    config = {
        "name": name,
        "model": args.model,
        "adapter": args.adapter,
        "benchmark": source,
        "tasks": seen + held_out,
        "max_test": max_test,
        "seed": args.seed,
        "device": device,
        "threads": args.threads,
        "judge_base_url": args.judge_base_url,
        "judge_model": args.judge_model if args.judge_base_url else None,
        "probes": args.probes,
        "arguments": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "handler"},
    }
    notes = []
    if judge is not None and not judge.available:
        notes.append(f"--judge-base-url given but ${args.judge_api_key_env} is unset: the judge was not used")
    timings = {"model_load": loaded - started, "wall": time.perf_counter() - started}
    report = write_report(
        args.out, result, config, name=name, probes=probes, notes=notes, timings=timings, plots=not args.no_plots
    )
    summary = render_markdown(report).split("## Per-task scores")[0]
    print(summary.rstrip())
    print(f"\nreport written to {args.out}/report.json, report.md" + (" and plots" if report["plots"] else ""))
    return 0


def _run_probes(args, model, tokenizer, tasks, instances) -> dict[str, Any]:
    from kpig_trainer.evaluation.probes import PROBE_DIR, run_probe

    found = {}
    for name, task_instances in instances.items():
        if (PROBE_DIR / f"{name}.json").exists():
            logger.info("running the half-listening probes of %s", name)
            found[name] = run_probe(
                model,
                tokenizer,
                tasks[name],
                task_instances,
                batch_size=args.batch_size,
                max_new_tokens=args.max_new_tokens,
                compute_ig=True,
                alpha=args.alpha,
                system_prompt=args.system_prompt,
                show_progress=not args.no_progress,
            )
    if not found:
        logger.warning("--probes: none of the evaluated tasks has a probe in %s", PROBE_DIR)
    return found


def run_compare(args: argparse.Namespace) -> int:
    """Run ``kpig compare``; returns the exit status."""
    from kpig_trainer.evaluation.report import compare_markdown, read_report
    from kpig_trainer.fileio import atomic_write_text

    if args.names and len(args.names) != len(args.runs):
        print(f"error: {len(args.runs)} runs but {len(args.names)} --names", file=sys.stderr)
        return 2
    reports = [read_report(path) for path in args.runs]
    table = compare_markdown(reports, args.names)
    print(table, end="")
    if args.out:
        atomic_write_text(args.out, table)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m kpig_trainer.evaluation [eval|compare] ...``; without a subcommand the
    arguments are those of ``eval``."""
    from kpig_trainer.data.records import DataError

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("eval", "compare", "-h", "--help"):
        argv = ["eval", *argv]
    parser = argparse.ArgumentParser(
        prog="python -m kpig_trainer.evaluation",
        description="Evaluate models and compare reports (kpig eval / kpig compare).",
    )
    register_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.handler(args)
    except (DataError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
