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
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from study_report import write_study_report  # noqa: E402

from kpig_trainer.fileio import atomic_write_text  # noqa: E402

BASE_RECIPE = ROOT / "recipes" / "study" / "base.yaml"
KPIG = ["--method", "kpig", "--replay_strategy", "kpig"]

#: Method name -> options on top of the base recipe (the paper's Tables 1 and 2).
METHODS: dict[str, list[str]] = {
    # The base model is scored once per seed, with IG; the other runs skip that row (eval_init false).
    "init": ["--method", "init", "--eval_init", "true", "--eval_ig", "true"],
    "sft": ["--method", "sft", "--eval_ig", "true"],
    "lora": ["--method", "lora"],
    "replay_random": ["--method", "sft", "--replay_strategy", "random"],
    "entropy": ["--method", "sft", "--replay_strategy", "entropy"],
    "kpig": [*KPIG, "--ig_source", "previous", "--eval_ig", "true"],  # IG over stages: sft vs kpig
    "kpig_ig_current": [*KPIG, "--ig_source", "current"],
    "kpig_wo_div": [*KPIG, "--ig_source", "previous"],
    "kpig_wo_mask": [
        "--method",
        "kpig",
        "--replay_strategy",
        "entropy",
        "--jsd_on",
        "full",
        "--ig_source",
        "previous",
    ],
    "kpig_wo_jsd": [*KPIG, "--jsd_weight", "0", "--ig_source", "previous"],
    "kpig_wo_temp": [*KPIG, "--use_temperature", "false", "--ig_source", "previous"],
    "multi": ["--method", "multi"],
}
#: The order runs go in: the headline comparison first, so that a study cut short still has it.
RUN_ORDER = (
    "sft",
    "kpig",
    "replay_random",
    "init",
    "multi",
    "entropy",
    "lora",
    "kpig_wo_div",
    "kpig_ig_current",
    "kpig_wo_mask",
    "kpig_wo_jsd",
    "kpig_wo_temp",
)
assert sorted(RUN_ORDER) == sorted(METHODS)
#: Methods run with every seed of ``--seeds``; the others with the first seed only.
SEEDED = ("sft", "replay_random", "kpig")

#: ``tune``: KPIG settings tried one at a time around the paper's SuperNI values (alpha 0.3,
#: lambda 0.02) and the study's replay budget, each scored on validation instances carved from the
#: seen tasks' training pools (never a test set).
TUNE_BASE = {"--alpha": "0.3", "--jsd_weight": "0.02", "--replay_tasks": "2", "--replay_instances": "4"}
TUNE_GRID: dict[str, list[str]] = {
    name: [item for key, value in {**TUNE_BASE, **change}.items() for item in (key, value)]
    for name, change in {
        "base": {},
        "alpha_0.6": {"--alpha": "0.6"},
        "jsd_weight_0.1": {"--jsd_weight": "0.1"},
        "replay_instances_8": {"--replay_instances": "8"},
    }.items()
}
TUNE_VALIDATION_SIZE = 10  # instances per seen task
TUNE_EVAL = [
    "--eval_split",
    "validation",
    "--validation_size",
    str(TUNE_VALIDATION_SIZE),
    "--eval_tasks",
    "final",
    "--eval_init",
    "false",
    "--eval_ig",
    "false",
]

#: ``--quick``: the tiny model, 2 stages, 2 methods: a test of the script, not a result.
QUICK = [
    "--model_name_or_path",
    "tiny-llama",
    "--max_stages",
    "2",
    "--max_held_out_tasks",
    "1",
    "--max_train_instances",
    "4",
    "--max_test_instances",
    "2",
    "--test_size",
    "2",
    "--replay_instances",
    "2",
    "--eval_batch_size",
    "4",
    "--max_length",
    "256",
    "--learning_rate",
    "1e-3",
]


def run_dir(out: Path, method: str, seed: int) -> Path:
    return out / method / f"seed{seed}"


def plan(methods: list[str], seeds: list[int]) -> list[tuple[str, int]]:
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; known: {', '.join(METHODS)}")
    # The first seed of every method before any second seed: a study cut short still covers all.
    return [(m, s) for s in seeds for m in methods if s == seeds[0] or m in SEEDED]


def command(method: str, seed: int, args: argparse.Namespace, output_dir: Path | None = None) -> list[str]:
    cmd = [
        sys.executable,
        str(ROOT / "examples" / "cit.py"),
        "--recipe",
        str(BASE_RECIPE),
        "--output_dir",
        str(output_dir or run_dir(args.out, method, seed)),
        "--seed",
        str(seed),
        *METHODS[method],
    ]
    if args.pools and method.startswith("kpig") and method != "kpig_wo_div":
        cmd += ["--instruction_pools", args.pools]
    if seed != args.seeds[0]:
        cmd += ["--eval_ig", "false"]  # the IG-over-stages plot is of the first seed
    if args.quick:
        cmd += QUICK
    if args.model:
        cmd += ["--model_name_or_path", args.model]
    if args.device == "cpu":
        cmd += ["--use_cpu", "true"]
    return cmd + list(args.extra)


def run(args: argparse.Namespace) -> int:
    jobs = [(f"{m}/seed{s}", run_dir(args.out, m, s), command(m, s, args)) for m, s in plan(args.methods, args.seeds)]
    return _run_jobs(jobs, args.out / "timings.json")


def _run_jobs(jobs: list[tuple[str, Path, list[str]]], timings_path: Path) -> int:
    """Run each ``(name, run directory, command)`` not finished yet; record wall times by name."""
    timings_path.parent.mkdir(parents=True, exist_ok=True)
    timings = json.loads(timings_path.read_text()) if timings_path.exists() else {}
    environment = {"command": " ".join(["benchmarks/study.py", *sys.argv[1:]]), **hardware()}
    atomic_write_text(timings_path.with_name("environment.json"), json.dumps(environment, indent=2) + "\n")
    for n, (name, directory, cmd) in enumerate(jobs, start=1):
        if _finished(directory):
            print(f"[{n}/{len(jobs)}] {name}: done", flush=True)
            continue
        print(f"[{n}/{len(jobs)}] {name} ...", flush=True)
        began = time.perf_counter()
        directory.mkdir(parents=True, exist_ok=True)
        log_path = directory.parent / f"{directory.name}.log"
        try:
            with open(log_path, "a", encoding="utf-8") as log:
                code = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT).returncode
        finally:  # a stopped run resumes later: its time so far counts too
            timings[name] = round(timings.get(name, 0.0) + time.perf_counter() - began, 1)
            atomic_write_text(timings_path, json.dumps(timings, indent=2) + "\n")
        if code != 0:
            print(f"    failed (exit {code}); see {log_path}", flush=True)
            return code
        print(f"    {time.perf_counter() - began:.0f} s", flush=True)
    return 0


def hardware() -> dict[str, object]:
    """Where the runs ran: CPU, cores, torch threads and accelerator."""
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "gpu": gpu,
        "python": platform.python_version(),
    }


def tune_dir(args: argparse.Namespace, setting: str) -> Path:
    return args.out.with_name(args.out.name + "-tune") / setting / f"seed{args.seeds[0]}"


def tune(args: argparse.Namespace) -> int:
    """KPIG under each setting of :data:`TUNE_GRID`, scored on validation data; writes
    ``tuning.json`` / ``tuning.md`` with the setting of the best validation P-score."""
    seed = args.seeds[0]
    jobs = [
        (
            f"tune/{name}",
            tune_dir(args, name),
            command("kpig", seed, args, output_dir=tune_dir(args, name)) + TUNE_EVAL + options,
        )
        for name, options in TUNE_GRID.items()
    ]
    code = _run_jobs(jobs, args.out.with_name(args.out.name + "-tune") / "timings.json")
    if code:
        return code
    from kpig_trainer.evaluation.report import read_report

    results, n_tasks = {}, 0
    for name, options in TUNE_GRID.items():
        report = read_report(tune_dir(args, name))
        n_tasks = report["summary"]["seen"]["n_tasks"]
        training = json.loads((tune_dir(args, name) / "config.json").read_text())["training"]
        results[name] = {
            "options": options,
            "p_score": report["summary"]["seen"]["p_score"],
            "v_score": report["summary"]["seen"]["v_score"],
            "values": {k: training[k] for k in ("alpha", "jsd_weight", "replay_tasks", "replay_instances")},
        }
    best = max(results, key=lambda n: (results[n]["p_score"], n == "base"))  # a tie keeps the base setting
    summary = {
        "seed": seed,
        "validation_size": TUNE_VALIDATION_SIZE,
        "objective": "P-score of the seen tasks' validation instances after the last stage",
        "settings": results,
        "chosen": best,
    }
    args.results.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.results / "tuning.json", json.dumps(summary, indent=2) + "\n")
    lines = [
        "# KPIG tuning on validation data",
        "",
        f"Each setting is one KPIG run of the study recipe (seed {seed}) that changes one value of the base "
        f"setting; it is scored on {TUNE_VALIDATION_SIZE} validation instances per seen task, carved from the "
        "training pool beyond the training cap (`eval_split: validation`), after the last stage. No test instance is used.",
        "",
        "| Setting | alpha | jsd_weight | M | N | Validation P | Validation V |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        v = r["values"]
        v_score = "-" if r["v_score"] is None else f"{r['v_score']:.1f}"
        lines.append(
            f"| {name}{' (chosen)' if name == best else ''} | {v['alpha']} | {v['jsd_weight']} | "
            f"{v['replay_tasks']} | {v['replay_instances']} | {r['p_score']:.1f} | {v_score} |"
        )
    instances = TUNE_VALIDATION_SIZE * n_tasks
    lines += [
        "",
        f"The validation P-score is a mean over {instances} instances ({TUNE_VALIDATION_SIZE} per task, "
        "each scored 0-1 or by overlap), so one instance answered differently moves it by up to "
        f"{100 / instances:.1f} points on a task-weighted mean; differences of that size are noise. A tie keeps the base setting.",
    ]
    atomic_write_text(args.results / "tuning.md", "\n".join(lines) + "\n")
    print(f"chosen: {best}; see {args.results / 'tuning.md'}")
    return 0


def _finished(directory: Path) -> bool:
    state = directory / "state.json"
    if not state.exists():
        return False
    data = json.loads(state.read_text())
    config = directory / "config.json"
    if config.exists() and json.loads(config.read_text())["continual"]["method"] == "init":
        return "init" in data["evaluation"]  # evaluation only: no stage to complete
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
    environment_path = args.out / "environment.json"
    environment = json.loads(environment_path.read_text()) if environment_path.exists() else {}
    written = write_study_report(
        runs,
        args.results,
        timings=timings,
        probe=not args.no_probe,
        replicates=args.replicates,
        environment=environment,
    )
    if args.readme:
        written.append(update_readme(args.readme, args.results / "study.json"))
    print("\n".join(str(p) for p in written))
    return 0


README_BEGIN = "<!-- study results: written by benchmarks/study.py report --readme; do not edit -->"
README_END = "<!-- end of study results -->"


def update_readme(readme: Path, study_json: Path) -> Path:
    """Replace the block between the study markers of ``readme`` with the headline tables."""
    from study_report import readme_block

    text = readme.read_text(encoding="utf-8")
    if README_BEGIN not in text or README_END not in text:
        raise SystemExit(f"{readme}: no study block (the lines {README_BEGIN!r} and {README_END!r})")
    head, rest = text.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    block = readme_block(json.loads(study_json.read_text(encoding="utf-8")))
    return atomic_write_text(readme, f"{head}{README_BEGIN}\n{block}\n{README_END}{tail}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="KPIG vs the baselines on one stream.")
    parser.add_argument(
        "action",
        choices=("tune", "run", "report", "all"),
        help="tune: KPIG settings on validation data; run: every method and seed; report: "
        "the tables from the run directories; all: run, then report",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "study", help="run directories")
    parser.add_argument(
        "--results",
        type=Path,
        default=ROOT / "benchmarks" / "results" / "study",
        help="where report writes study.json, study.md and the plot",
    )
    parser.add_argument("--methods", nargs="+", default=list(RUN_ORDER), help=f"of: {', '.join(RUN_ORDER)}")
    parser.add_argument(
        "--seeds",
        nargs="+",
        type=int,
        default=[0, 1, 2],
        help=f"seeds of {', '.join(SEEDED)}; the other methods run with the first",
    )
    parser.add_argument("--model", help="model of every run (default: the recipe's, SmolLM2-135M-Instruct)")
    parser.add_argument(
        "--device",
        choices=("auto", "cpu"),
        default="auto",
        help="auto: the accelerator when there is one; cpu: force the CPU",
    )
    parser.add_argument(
        "--pools",
        default="benchmark",
        help="instruction pools of the KPIG runs (not of kpig_wo_div): a folder, or "
        "'benchmark' for the shipped ones (default); '' for none",
    )
    parser.add_argument("--quick", action="store_true", help="tiny model, 2 stages: checks the script only")
    parser.add_argument("--replicates", type=int, default=2000, help="bootstrap replicates")
    parser.add_argument("--no-probe", action="store_true", help="skip the misleading-constraint probe")
    parser.add_argument("--readme", type=Path, help="also write the headline tables into this README's study block")
    parser.add_argument("extra", nargs="*", help="more options for every run, after --")
    args = parser.parse_args(argv)
    if args.action == "tune":
        return tune(args)
    if args.action in ("run", "all"):
        code = run(args)
        if code:
            return code
    return report(args) if args.action in ("report", "all") else 0


if __name__ == "__main__":
    sys.exit(main())
