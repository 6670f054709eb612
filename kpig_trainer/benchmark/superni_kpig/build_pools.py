"""Build the shipped instruction pools (pools/) with the offline heuristic of kpig_trainer.diversity.

Usage (from the repository, with kpig-trainer installed):

    python -m kpig_trainer.benchmark.superni_kpig.build_pools [--out DIR] [--task NAME ...] [--check]

One JSONL pool per task of the superni-kpig benchmark (all 101 tasks, held-out ones too),
31 entries each: the seed instruction (the task's definition with its hand-written key parts)
and 30 rewrites, the pool size of the paper's appendix A. Grown by `diversify(client=None)`
(no network) with seed 0, so a rerun gives byte-identical files: every random choice comes
from the seed and the task name, and the entries' timestamps, the only field that changes
from run to run, are left out. Each file is written atomically (temporary file, then rename).
`--check` rebuilds into a temporary folder and compares with the files in --out instead of
writing them (exit status 1 on a difference). See pools/README.md.
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from kpig_trainer.data import load_benchmark
from kpig_trainer.diversity import diversify, pool_path, read_pool
from kpig_trainer.fileio import atomic_write_text

HERE = Path(__file__).resolve().parent
POOLS_DIR = HERE / "pools"
BENCHMARK = "superni-kpig"
POOL_SIZE = 31  # the seed and 30 evolutions (paper, section 4.1 and appendix A)
SEED = 0
VOLATILE = ("timestamp",)  # differs on every run; load_pools never reads it


def pool_text(entries):
    """A pool file's content: one JSON object per line, without the volatile fields."""
    lines = [
        json.dumps({k: v for k, v in entry.items() if k not in VOLATILE}, ensure_ascii=False) for entry in entries
    ]
    return "".join(line + "\n" for line in lines)


def build_pools(out=POOLS_DIR, tasks=None, *, pool_size=POOL_SIZE, seed=SEED, benchmark_dir=None):
    """Grow the offline pools of ``tasks`` (default: every task of the benchmark) into ``out``.

    Returns ``{task: path}`` of the files written. Raises ``RuntimeError`` when a pool cannot
    reach ``pool_size`` (the heuristic ran out of distinct rewrites), so no short pool ships.
    """
    all_tasks = load_benchmark(BENCHMARK, directory=benchmark_dir).tasks
    names = sorted(all_tasks) if tasks is None else list(tasks)
    unknown = [name for name in names if name not in all_tasks]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown} for the {BENCHMARK} benchmark")
    written = {}
    # Grown from scratch every time: diversify resumes existing files, which would make the
    # result depend on what was in the folder before.
    with tempfile.TemporaryDirectory(prefix="kpig-pools-") as scratch:
        summary = diversify(
            {name: all_tasks[name] for name in names},
            pool_size=pool_size,
            client=None,
            cache_dir=scratch,
            concurrency=1,
            seed=seed,
            progress=False,
        )
        short = {
            name: result.message or result.status
            for name, result in summary.tasks.items()
            if result.status != "complete"
        }
        if short:
            raise RuntimeError(f"pools that did not reach {pool_size} entries: {short}")
        for name in names:
            written[name] = atomic_write_text(pool_path(out, name), pool_text(read_pool(pool_path(scratch, name))))
    return written


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=POOLS_DIR, help=f"pool folder (default: {POOLS_DIR})")
    parser.add_argument("--task", action="append", metavar="NAME", help="only this task (repeatable)")
    parser.add_argument(
        "--check", action="store_true", help="rebuild into a temporary folder and compare with --out; write nothing"
    )
    args = parser.parse_args(argv)
    start = time.monotonic()
    if not args.check:
        written = build_pools(args.out, args.task)
        size = sum(path.stat().st_size for path in written.values())
        print(
            f"wrote {len(written)} pools of {POOL_SIZE} entries to {args.out}: {size} bytes, "
            f"{time.monotonic() - start:.1f}s"
        )
        return 0
    with tempfile.TemporaryDirectory() as fresh:
        rebuilt = build_pools(fresh, args.task)
        shipped = {name: pool_path(args.out, name) for name in rebuilt}
        differ = [
            name
            for name, path in rebuilt.items()
            if not shipped[name].exists() or shipped[name].read_bytes() != path.read_bytes()
        ]
    print(
        f"checked {len(rebuilt)} pools in {time.monotonic() - start:.1f}s: "
        + (f"{len(differ)} differ: {differ}" if differ else "all identical")
    )
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
