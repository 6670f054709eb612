"""Scoring instances with a model, for replay selection and for evaluation: information gain
(equation 1 of the paper) or the predictive entropy of the response.

One pipeline serves both, so the IG that ranks replay candidates and the IG a report shows are
the same quantity: the same collator (:func:`~kpig_trainer.kpig.collator.build_collator` with
``scoring=True``), batches of one task's instances (their shared instruction runs once),
batches dealt to the processes in turns and the scores all-gathered, so every rank sees the
same numbers. Instances whose instruction has no maskable key part have no information gain:
they score None, are counted, and are logged.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from kpig_trainer.kpig.collator import batches_by_task
from kpig_trainer.kpig.info_gain import information_gain
from kpig_trainer.kpig.losses import IGNORE_INDEX, response_positions

__all__ = ["SCORE_KINDS", "ModelScorer", "response_entropy", "score_instances"]

logger = logging.getLogger(__name__)

SCORE_KINDS = ("ig", "entropy")


def response_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Mean predictive entropy (nats) per row over the positions that predict response tokens.

    Computed in float32; rows without a response token give 0.
    """
    rows, positions, _ = response_positions(labels, ignore_index)
    logp = torch.log_softmax(logits[rows, positions].float(), dim=-1)
    entropy = -(logp.exp() * logp).sum(-1)
    total = torch.zeros(labels.shape[0], device=logits.device).index_add_(0, rows, entropy)
    count = torch.zeros(labels.shape[0], device=logits.device).index_add_(0, rows, torch.ones_like(entropy))
    return total / count.clamp(min=1)


@torch.no_grad()
def _entropy(model: torch.nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
    from kpig_trainer.kpig.twins import Twin, accepts_logits_to_keep, forward_twins

    device = next(model.parameters()).device
    twin = Twin.from_tensors(
        *(batch[k].to(device) for k in ("input_ids", "attention_mask", "labels")), response_only=True
    )
    was_training = model.training
    model.eval()
    try:
        logits = forward_twins(model, [twin], logits_to_keep=accepts_logits_to_keep(model))[0]
    finally:
        model.train(was_training)
    return response_entropy(logits, twin.frame_labels)


def _distributed() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def score_instances(
    model: torch.nn.Module,
    instances: Sequence[Any],
    collator: Callable,
    *,
    kind: str = "ig",
    alpha: float = 0.3,
    batch_size: int = 8,
    show_progress: bool = False,
    desc: str | None = None,
) -> list[float | None]:
    """Score every instance with ``model``; the same list on every rank of a distributed run.

    Args:
        model: the causal LM (unwrapped; under ZeRO-3, every rank calls this).
        instances: :class:`~kpig_trainer.data.Instance` objects (or rows the collator takes).
        collator: a paired :class:`~kpig_trainer.kpig.collator.KPIGDataCollator`, normally
            ``build_collator(..., scoring=True)``.
        kind: ``"ig"``, the information gain (equation 1), or ``"entropy"``, the mean
            predictive entropy of the response (DynaInst-like).
        alpha: exponential decay of Info (equation 2).
        batch_size: instances per forward.
        show_progress: a ``tqdm`` bar on the main process.
        desc: the bar's label.

    Returns:
        One float per instance; None for an instance without a maskable key part when
        ``kind="ig"`` (its twins are identical, so its IG would be 0 by construction, not by
        the model).
    """
    if kind not in SCORE_KINDS:
        raise ValueError(f"kind must be one of {SCORE_KINDS}, got {kind!r}")
    from tqdm.auto import tqdm

    if kind == "ig":
        scored = [k for k, instance in enumerate(instances) if collator.has_key_part(instance)]
        if len(scored) < len(instances):
            tasks = sorted({getattr(instances[k], "task", "?") for k in set(range(len(instances))) - set(scored)})
            logger.info(
                "information gain: %d of %d instances have no maskable key part (tasks: %s); they get no IG",
                len(instances) - len(scored),
                len(instances),
                ", ".join(tasks),
            )

        def fn(batch):
            return information_gain(model, batch, alpha)
    else:
        scored = list(range(len(instances)))

        def fn(batch):
            return _entropy(model, batch)

    rank, world = _distributed()
    # One task per batch; the batches are dealt to the processes in turns, the same on every rank.
    batches = batches_by_task(instances, scored, batch_size)
    mine = batches[rank::world]
    # Every rank runs the same number of forwards (sharded models run collectives inside
    # forward): a rank with fewer batches repeats one and drops its result.
    steps = math.ceil(len(batches) / world)
    local: dict[int, float] = {}
    bar = tqdm(total=sum(map(len, mine)), desc=desc or kind, unit="instance", disable=not show_progress or rank != 0)
    for step in range(steps):
        rows = mine[step] if step < len(mine) else (mine or batches)[-1]
        values = fn(collator([instances[i] for i in rows])).tolist()
        if step < len(mine):
            local.update(zip(rows, values))
            bar.update(len(rows))
    bar.close()
    if world > 1:
        gathered: list[dict[int, float] | None] = [None] * world
        torch.distributed.all_gather_object(gathered, local)
        for part in gathered:
            local.update(part or {})
    return [local.get(i) for i in range(len(instances))]


class ModelScorer:
    """A model at a stage boundary, bound to its collator: what a replay strategy scores with.

    Args:
        model: the causal LM as it stands (unwrapped).
        collator: a paired collator, normally ``build_collator(..., scoring=True)``.
        alpha: exponential decay of Info (equation 2).
        batch_size: instances per forward.
        show_progress: a progress bar on the main process.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        collator: Callable,
        *,
        alpha: float = 0.3,
        batch_size: int = 8,
        show_progress: bool = True,
    ) -> None:
        self.model = model
        self.collator = collator
        self.alpha = alpha
        self.batch_size = batch_size
        self.show_progress = show_progress

    def information_gain(self, instances: Sequence[Any]) -> list[float | None]:
        """IG of every instance (None without a maskable key part), identical on every rank."""
        return self._score(instances, "ig")

    def entropy(self, instances: Sequence[Any]) -> list[float]:
        """Mean predictive entropy of every instance's response, identical on every rank."""
        return self._score(instances, "entropy")

    def _score(self, instances: Sequence[Any], kind: str) -> list:
        return score_instances(
            self.model,
            instances,
            self.collator,
            kind=kind,
            alpha=self.alpha,
            batch_size=self.batch_size,
            show_progress=self.show_progress,
            desc=f"replay: {'IG' if kind == 'ig' else kind}",
        )
