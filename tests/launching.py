"""Launching `accelerate launch` subprocesses from tests (several CPU processes, gloo)."""

import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port nobody listens on now (for the rendezvous of launched processes)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def accelerate_launch(args, tmp_path, timeout=600, env=None) -> subprocess.CompletedProcess:
    """Run ``accelerate launch ARGS`` from the repository root with one thread per process and a
    private model cache under ``tmp_path`` (``env``: more variables); fail with the output's tail
    unless it exits 0, which it does only when every launched process exited 0."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "OMP_WAIT_POLICY": "PASSIVE",
        "KPIG_CACHE": str(tmp_path / "cache"),
        "TOKENIZERS_PARALLELISM": "false",
        **(env or {}),
    }
    result = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


def exit_probe_env(folder: Path) -> dict[str, str]:
    """Variables that load ``tests/exit_probe`` into launched processes, recording into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [str(ROOT / "tests" / "exit_probe"), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {"PYTHONPATH": os.pathsep.join(paths), "KPIG_EXIT_PROBE": str(folder)}


def two_processes() -> list[str]:
    """``accelerate launch`` flags for two gloo processes on this machine (``--cpu --num_processes 2``
    would run one), on a free port."""
    return ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--main_process_port", str(free_port())]
