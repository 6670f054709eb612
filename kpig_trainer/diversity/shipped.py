"""The instruction pools shipped with the benchmark, and how a run's ``instruction_pools``
option picks its pools: none, the shipped ones (``"benchmark"``) or a folder of its own.

The shipped pools (``kpig_trainer/benchmark/superni_kpig/pools/``, one per task of
``superni-kpig``, which the ``demo`` benchmark is a subset of) are offline-heuristic pools,
not the paper's GPT-4 ones; their README says how they were built and what they lack.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

from kpig_trainer.data.benchmark import BENCHMARK_DIR, BENCHMARKS
from kpig_trainer.data.records import DataError
from kpig_trainer.diversity.cache import load_pools

logger = logging.getLogger(__name__)

__all__ = ["SHIPPED_POOLS", "SHIPPED_POOLS_DIR", "check_pools_option", "load_run_pools"]

SHIPPED_POOLS = "benchmark"
SHIPPED_POOLS_DIR = BENCHMARK_DIR / "pools"
_REBUILD = "python -m kpig_trainer.benchmark.superni_kpig.build_pools"


def check_pools_option(option: str | None, custom_tasks: str | None) -> None:
    """Refuse ``instruction_pools="benchmark"`` for a run on its own tasks (``--tasks``),
    before anything is loaded."""
    if option == SHIPPED_POOLS and custom_tasks:
        raise DataError(
            f"instruction_pools={SHIPPED_POOLS!r} selects the pools shipped with the benchmarks {BENCHMARKS}, "
            f"but this run reads its own tasks (tasks={custom_tasks!r}); build pools for them with "
            f"`kpig diversify --tasks {custom_tasks} --out DIR` and set instruction_pools to DIR"
        )


def load_run_pools(
    option: str | None,
    tasks: Sequence[str],
    *,
    custom_tasks: str | None = None,
) -> dict[str, list[dict[str, Any]]] | None:
    """The pools of a run (:attr:`ContinualArguments.instruction_pools`), read once.

    Args:
        option: ``None`` or ``""``: no pools (every instance keeps its own instruction);
            ``"benchmark"``: the shipped pools; anything else: a folder of ``kpig diversify``.
        tasks: the tasks the run trains on. Each must have a shipped pool with ``"benchmark"``;
            with a folder of one's own, tasks without a pool keep their instruction (warned).
        custom_tasks: the run's ``tasks`` option (its own tasks instead of a shipped benchmark).

    Raises:
        DataError: naming the option, for ``"benchmark"`` with ``custom_tasks`` or with a task
            that has no shipped pool, or for a folder that does not exist.
    """
    if not option:
        return None
    if option != SHIPPED_POOLS:
        if not Path(option).is_dir():
            raise DataError(
                f"instruction_pools={option!r}: folder not found; grow pools into it with "
                f"`kpig diversify --out {option} ...`, or use {SHIPPED_POOLS!r} for the shipped ones"
            )
        pools = load_pools(option)
        missing = [t for t in tasks if t not in pools]
        if missing:
            logger.warning(
                "instruction_pools=%r has no pool for %d task(s) (e.g. %s); they train on their own instruction",
                option,
                len(missing),
                missing[:3],
            )
        return pools
    check_pools_option(option, custom_tasks)
    pools = load_pools(SHIPPED_POOLS_DIR) if SHIPPED_POOLS_DIR.is_dir() else {}
    missing = [t for t in tasks if t not in pools]
    if missing:
        raise DataError(
            f"instruction_pools={SHIPPED_POOLS!r}: {Path(SHIPPED_POOLS_DIR)} has no pool for {len(missing)} "
            f"task(s) of this run: {missing[:5]}{' ...' if len(missing) > 5 else ''}; rebuild them with "
            f"`{_REBUILD}`"
        )
    return pools
