"""Does KPIG help? Every method of the study on one stream, several seeds, and the tables.

    .venv/bin/python benchmarks/study.py run      # train and evaluate every (method, seed); resumable
    .venv/bin/python benchmarks/study.py report   # tables, intervals and plots from the run directories
    .venv/bin/python benchmarks/study.py run --model path/or/hub-id --device cuda   # the same on a GPU

Runs go to ``--out`` (default ``runs/study``), one directory per method and seed, each a plain
``examples/cit.py`` run of ``recipes/study/base.yaml`` plus the method's options; rerunning resumes
the unfinished ones. ``report`` reads only those directories and writes ``study.json``,
``study.md`` and ``ig_over_stages.png`` to ``--results`` (default ``benchmarks/results/study``).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from study_report import write_study_report  # noqa: E402

BASE_RECIPE = ROOT / "recipes" / "study" / "base.yaml"
KPIG = ["--method", "kpig", "--replay_strategy", "kpig"]

#: Method name -> options on top of the base recipe (the paper's Tables 1 and 2).
METHODS: dict[str, list[str]] = {
    "init": ["--method", "init"],
    "sft": ["--method", "sft"],
    "lora": ["--method", "lora"],
    "replay_random": ["--method", "sft", "--replay_strategy", "random"],
    "entropy": ["--method", "sft", "--replay_strategy", "entropy"],
    "kpig": [*KPIG, "--ig_source", "previous"],
    "kpig_ig_current": [*KPIG, "--ig_source", "current"],
    "kpig_wo_div": [*KPIG, "--ig_source", "previous"],
    "kpig_wo_mask": ["--method", "kpig", "--replay_strategy", "entropy", "--jsd_on", "full", "--ig_source", "previous"],
    "kpig_wo_jsd": [*KPIG, "--jsd_weight", "0", "--ig_source", "previous"],
    "kpig_wo_temp": [*KPIG, "--use_temperature", "false", "--ig_source", "previous"],
    "multi": ["--method", "multi"],
}
#: The order runs go in: the headline comparison first, so that a study cut short still has it.
RUN_ORDER = ("sft", "kpig", "replay_random", "init", "multi", "entropy", "lora", "kpig_wo_div", "kpig_ig_current",
             "kpig_wo_mask", "kpig_wo_jsd", "kpig_wo_temp")
assert sorted(RUN_ORDER) == sorted(METHODS)
#: Methods run with every seed of ``--seeds``; the others with the first seed only.
SEEDED = ("sft", "replay_random", "kpig")

#: ``--quick``: the tiny model, 2 stages, 2 methods: a test of the script, not a result.
QUICK = ["--model_name_or_path", "tiny-llama", "--max_stages", "2", "--max_held_out_tasks", "1",
         "--max_train_instances", "4", "--max_test_instances", "2", "--test_size", "2", "--replay_instances", "2",
         "--eval_batch_size", "4", "--max_length", "256", "--learning_rate", "1e-3"]


def run_dir(out: Path, method: str, seed: int) -> Path:
    return out / method / f"seed{seed}"


def plan(methods: list[str], seeds: list[int]) -> list[tuple[str, int]]:
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; known: {', '.join(METHODS)}")
    # The first seed of every method before any second seed: a study cut short still covers all.
    return [(m, s) for s in seeds for m in methods if s == seeds[0] or m in SEEDED]


def command(method: str, seed: int, args: argparse.Namespace) -> list[str]:
    cmd = [sys.executable, str(ROOT / "examples" / "cit.py"), "--recipe", str(BASE_RECIPE),
           "--output_dir", str(run_dir(args.out, method, seed)), "--seed", str(seed), *METHODS[method]]
    if args.pools and method.startswith("kpig") and method != "kpig_wo_div":
        cmd += ["--instruction_pools", args.pools]
    if args.quick:
        cmd += QUICK
    if args.model:
        cmd += ["--model_name_or_path", args.model]
    if args.device == "cpu":
        cmd += ["--use_cpu", "true"]
    return cmd + list(args.extra)


def run(args: argparse.Namespace) -> int:
    jobs = plan(args.methods, args.seeds)
    args.out.mkdir(parents=True, exist_ok=True)
    timings_path = args.out / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.exists() else {}
    for n, (method, seed) in enumerate(jobs, start=1):
        directory = run_dir(args.out, method, seed)
        if _finished(directory):
            print(f"[{n}/{len(jobs)}] {method} seed {seed}: done", flush=True)
            continue
        print(f"[{n}/{len(jobs)}] {method} seed {seed} ...", flush=True)
        began = time.perf_counter()
        directory.mkdir(parents=True, exist_ok=True)
        with open(directory.parent / f"seed{seed}.log", "a", encoding="utf-8") as log:
            code = subprocess.run(command(method, seed, args), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT).returncode
        if code != 0:
            print(f"    failed (exit {code}); see {directory.parent / f'seed{seed}.log'}", flush=True)
            return code
        timings[f"{method}/seed{seed}"] = round(time.perf_counter() - began, 1)
        timings_path.write_text(json.dumps(timings, indent=2) + "\n")
        print(f"    {timings[f'{method}/seed{seed}']:.0f} s", flush=True)
    return 0


def _finished(directory: Path) -> bool:
    state = directory / "state.json"
    if not state.exists():
        return False
    data = json.loads(state.read_text())
    return data["completed"] == len(data["stages"]) and bool(data["evaluation"])


def report(args: argparse.Namespace) -> int:
    runs = {}
    for method, seed in plan(args.methods, args.seeds):
        directory = run_dir(args.out, method, seed)
        if _finished(directory):
            runs.setdefault(method, {})[seed] = directory
        else:
            print(f"skipping {method} seed {seed}: not finished ({directory})", file=sys.stderr)
    if not runs:
        print(f"no finished run under {args.out}", file=sys.stderr)
        return 1
    timings_path = args.out / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.exists() else {}
    written = write_study_report(runs, args.results, timings=timings, probe=not args.no_probe,
                                 replicates=args.replicates)
    print("\n".join(str(p) for p in written))
    return 0


def mean_spread(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (None for fewer than two values) of the finite values."""
    finite = [v for v in values if v is not None and not math.isnan(v)]
    if not finite:
        return None, None
    return statistics.fmean(finite), statistics.stdev(finite) if len(finite) > 1 else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="KPIG vs the baselines on one stream.")
    parser.add_argument("action", choices=("run", "report", "all"))
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "study", help="run directories")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "study",
                        help="where report writes study.json, study.md and the plot")
    parser.add_argument("--methods", nargs="+", default=list(RUN_ORDER), help=f"of: {', '.join(RUN_ORDER)}")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2],
                        help=f"seeds of {', '.join(SEEDED)}; the other methods run with the first")
    parser.add_argument("--model", help="model of every run (default: the recipe's, SmolLM2-135M-Instruct)")
    parser.add_argument("--device", choices=("auto", "cpu"), default="auto",
                        help="auto: the accelerator when there is one; cpu: force the CPU")
    parser.add_argument("--pools", default="benchmark",
                        help="instruction pools of the KPIG runs (not of kpig_wo_div): a folder, or "
                             "'benchmark' for the shipped ones (default); '' for none")
    parser.add_argument("--quick", action="store_true", help="tiny model, 2 stages: checks the script only")
    parser.add_argument("--replicates", type=int, default=2000, help="bootstrap replicates")
    parser.add_argument("--no-probe", action="store_true", help="skip the misleading-constraint probe")
    parser.add_argument("extra", nargs="*", help="more options for every run, after --")
    args = parser.parse_args(argv)
    if args.action in ("run", "all"):
        code = run(args)
        if code:
            return code
    return report(args) if args.action in ("report", "all") else 0


if __name__ == "__main__":
    sys.exit(main())
