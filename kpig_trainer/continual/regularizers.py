"""Parameter regularisers of the continual baselines: L2 and EWC.

Both anchor the trainable parameters to their values at the end of the previous stage:

* L2: ``weight * sum_i (theta_i - theta*_i)^2``.
* EWC (Kirkpatrick et al., 2017): ``weight / 2 * sum_i F_i (theta_i - theta*_i)^2`` with ``F`` the
  diagonal empirical Fisher information of the previous stage's data, estimated from squared
  gradients of the loss. Across several stages the Fisher is accumulated online:
  ``F <- decay * F + F_new`` (``decay=1`` sums the stages, as separate EWC penalties would).

Only parameters that require gradients are anchored (with LoRA: the adapter weights).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn

REGULARIZERS = ("l2", "ewc")


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Named parameters that require gradients."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


class ParameterAnchor:
    """A snapshot of the trainable parameters and a quadratic penalty around it.

    Args:
        model: the model whose trainable parameters are anchored now.
        weight: penalty weight.
        importance: per-parameter weights ``F_i`` (EWC); ``None`` gives plain L2.
    """

    def __init__(self, model: nn.Module, weight: float, importance: Mapping[str, torch.Tensor] | None = None) -> None:
        if weight < 0:
            raise ValueError(f"regularisation weight must be >= 0, got {weight}")
        self.weight = weight
        self.anchor = {n: p.detach().clone() for n, p in trainable_parameters(model).items()}
        self.importance = dict(importance) if importance is not None else None
        if self.importance is not None:
            missing = sorted(set(self.anchor) - set(self.importance))
            if missing:
                raise ValueError(f"importance lacks trainable parameter(s): {missing[:5]}")

    def penalty(self, model: nn.Module) -> torch.Tensor:
        """The penalty for the model's current parameters (differentiable)."""
        params = trainable_parameters(model)
        unknown = sorted(set(params) - set(self.anchor))
        if unknown:
            raise ValueError(f"parameters not in the anchor (was the model changed?): {unknown[:5]}")
        total = None
        for name, param in params.items():
            diff = (param - self.anchor[name].to(param.device)).pow(2)
            if self.importance is not None:
                diff = diff * self.importance[name].to(param.device)
            term = diff.sum()
            total = term if total is None else total + term
        if total is None:
            return torch.zeros(())
        scale = self.weight / 2 if self.importance is not None else self.weight
        return scale * total

    def state_dict(self) -> dict[str, Any]:
        return {"weight": self.weight, "anchor": self.anchor, "importance": self.importance}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> "ParameterAnchor":
        anchor = cls.__new__(cls)
        anchor.weight = state["weight"]
        anchor.anchor = dict(state["anchor"])
        anchor.importance = dict(state["importance"]) if state["importance"] is not None else None
        return anchor


def estimate_fisher(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    loss_fn: Callable[[nn.Module, Mapping[str, torch.Tensor]], torch.Tensor] | None = None,
    max_batches: int | None = None,
) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher: the mean over batches of the squared loss gradients.

    Args:
        model: the model at the end of a stage.
        batches: batches with ``input_ids``, ``attention_mask``, ``labels`` (extra keys ignored).
        loss_fn: ``(model, batch) -> loss``; default: the model's own causal-LM loss.
        max_batches: stop after this many batches.
    """
    params = trainable_parameters(model)
    fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()  # no dropout noise in the gradients
    count = 0
    try:
        for batch in batches:
            if max_batches is not None and count >= max_batches:
                break
            model.zero_grad(set_to_none=True)
            inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "labels")}
            loss = loss_fn(model, inputs) if loss_fn else model(**inputs, use_cache=False).loss
            loss.backward()
            for name, param in params.items():
                if param.grad is not None:
                    fisher[name] += param.grad.detach().float().pow(2)
            count += 1
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    if count == 0:
        raise ValueError("estimate_fisher got no batch")
    return {n: f / count for n, f in fisher.items()}


def merge_fisher(
    old: Mapping[str, torch.Tensor] | None, new: Mapping[str, torch.Tensor], decay: float = 1.0
) -> dict[str, torch.Tensor]:
    """Online EWC: ``decay * old + new`` (``old=None`` returns ``new``)."""
    if old is None:
        return dict(new)
    return {n: decay * old[n].to(new[n].device) + new[n] for n in new}
