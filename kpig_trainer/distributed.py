"""Distributed runs: full weights under DeepSpeed ZeRO-3 (:func:`full_weights`), and ending a
run cleanly (:func:`end_distributed`).

A process that leaves the interpreter with its default process group alive can die at exit:
gloo's worker threads may drop the last reference to a finished collective (and so to a
tensor that has a Python object) while the interpreter is being finalized; the decref then
needs the GIL, the thread is told to exit instead, and the forced unwind through a C++
destructor calls ``std::terminate`` (SIGABRT, "terminate called without an active
exception"). Destroying the group first joins those threads while the interpreter is alive.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)


def end_distributed() -> bool:
    """Wait for every process, then destroy the default process group (all backends, DeepSpeed's
    included: it runs on ``torch.distributed``). Call it once per process after the last
    collective, at the end of a successful run; without a process group it does nothing.

    Returns whether a process group was destroyed.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return False
    dist.barrier()
    dist.destroy_process_group()
    logger.debug("process group destroyed")
    return True


def is_zero3_partitioned(module) -> bool:
    """Whether DeepSpeed ZeRO-3 holds ``module``'s parameters as shards (empty local tensors)."""
    return any(hasattr(p, "ds_id") for p in module.parameters())


def full_weights(module):
    """A context in which ``module`` has its full weights on every process.

    Under DeepSpeed ZeRO-3 the shards are gathered (a full copy of the weights on each rank
    until the context exits; every rank must enter it); otherwise it does nothing. For work
    outside the DeepSpeed engine: evaluation, scoring, saving.
    """
    import contextlib

    if not is_zero3_partitioned(module):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)
