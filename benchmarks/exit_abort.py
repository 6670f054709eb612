"""How often a 2-process gloo run aborts at exit, with and without ending its process group.

    .venv/bin/python benchmarks/exit_abort.py --runs 40      # ~4 min on 2 cores

Each run launches two processes with torchrun that do one all_gather and one barrier (the shape
of the end of a training run) and then exit, either leaving the default process group alive or
calling ``kpig_trainer.distributed.end_distributed()`` first. A run counts as aborted when a rank
died with SIGABRT ("terminate called without an active exception"). Results go to
``benchmarks/results/exit_abort.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"

WORKER = """
import sys
import torch
import torch.distributed as dist

dist.init_process_group("gloo")
mine = torch.full((4,), float(dist.get_rank()))
gathered = [torch.empty(4) for _ in range(dist.get_world_size())]
dist.all_gather(gathered, mine)
dist.barrier()
if sys.argv[1] == "end":
    from kpig_trainer.distributed import end_distributed

    end_distributed()
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(script: Path, mode: str) -> tuple[int, bool]:
    """Exit code of the launcher and whether a rank aborted."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            str(free_port()),
            str(script),
            mode,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = result.stdout + result.stderr
    return result.returncode, "terminate called" in output or "SIGABRT" in output


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=40, help="launches per mode")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        script = Path(folder) / "worker.py"
        script.write_text(WORKER)
        results = {}
        for mode, label in (("leave", "group left alive"), ("end", "end_distributed() first")):
            began, failed, aborted = time.perf_counter(), 0, 0
            for _ in range(args.runs):
                code, abort = launch(script, mode)
                failed += code != 0
                aborted += abort
            results[mode] = {
                "label": label,
                "runs": args.runs,
                "failed": failed,
                "aborted": aborted,
                "seconds": round(time.perf_counter() - began, 1),
            }
            print(f"{label}: {aborted}/{args.runs} aborted, {failed}/{args.runs} non-zero exits", flush=True)
    import torch

    record = {"torch": torch.__version__, "python": sys.version.split()[0], "results": results}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "exit_abort.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = [
        "# Exit aborts of a 2-process gloo run",
        "",
        f"torch {record['torch']}, Python {record['python']}.",
        "",
        "| Exit | Runs | Aborted | Non-zero exits |",
        "| --- | ---: | ---: | ---: |",
    ]
    lines += [f"| {r['label']} | {r['runs']} | {r['aborted']} | {r['failed']} |" for r in results.values()]
    (RESULTS / "exit_abort.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
