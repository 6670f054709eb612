"""Model merging of the DARE and LM-Cocktail baselines, for fully fine-tuned models.

Every merge here is task arithmetic around a base model::

    merged[p] = base[p] + sum_i w_i * delta_i[p],    delta_i = finetuned_i[p] - base[p]

* Task arithmetic (Ilharco et al., 2023): the deltas as they are.
* DARE (Yu et al., 2024, "Language Models are Super Mario"): each delta entry is dropped with
  probability ``1 - density`` and, with ``rescale``, the kept ones are divided by ``density``, so
  the expected delta is unchanged. PEFT's ``dare_linear`` does the same for LoRA adapters (with
  the global RNG); here the mask of each (seed, parameter, model) has its own seeded generator.
* LM-Cocktail (Xiao et al., 2023): the weighted average ``sum_i w_i * M_i`` of candidate models,
  ``w = softmax(-loss / temperature)`` of each candidate's loss on a few examples of the target
  task (:func:`example_losses`, :func:`lm_cocktail_weights`). With weights summing to 1 that is the
  task arithmetic above for any base, and the base may itself be a candidate (its delta is zero).

The merge streams: it reads one parameter of every model at a time, so inputs may be lazy
mappings (e.g. over safetensors files) and the only full-size allocation is the output. PEFT
adapters are merged with PEFT's own utilities, not here.
"""

from __future__ import annotations

import copy
import hashlib
import math
from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn

__all__ = [
    "MERGE_METHODS",
    "dare_prune",
    "example_losses",
    "lm_cocktail_weights",
    "merge_models",
    "merge_state_dicts",
    "uniform_weights",
]

MERGE_METHODS = ("task_arithmetic", "dare")


def _mask_seed(seed: int, name: str, index: int) -> int:
    # A stable hash (Python's hash() of a str is salted per process): the mask of a parameter
    # depends on nothing but (seed, name, model index), not on iteration order or the global RNG.
    digest = hashlib.blake2b(f"{seed}\0{index}\0{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def dare_prune(
    delta: torch.Tensor, density: float, *, rescale: bool = True, generator: torch.Generator | None = None
) -> torch.Tensor:
    """DARE's random drop: keep each entry of ``delta`` with probability ``density``, zero the rest.

    Args:
        delta: the task vector of one parameter (a floating tensor).
        density: the fraction of entries kept, in (0, 1]; 1 returns ``delta`` unchanged.
        rescale: divide the kept entries by ``density`` so that the expected result is ``delta``.
        generator: a CPU ``torch.Generator`` that draws the mask (None: the global RNG). The mask is
            drawn on the CPU whatever the device of ``delta``, so one seed gives one mask everywhere.

    Returns:
        A new tensor like ``delta`` (``delta`` itself when ``density`` is 1).
    """
    _check_density(density)
    if density == 1.0:
        return delta
    keep = torch.rand(delta.shape, generator=generator, dtype=torch.float32) < density
    pruned = delta * keep.to(delta.device)
    return pruned / density if rescale else pruned


def merge_state_dicts(
    base: Mapping[str, torch.Tensor],
    finetuned: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float],
    *,
    method: str = "task_arithmetic",
    density: float = 1.0,
    rescale: bool = True,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Task arithmetic or DARE: ``base[p] + sum_i weights[i] * delta_i[p]`` for every parameter ``p``.

    Parameters are merged one at a time: ``base[p]`` and each ``finetuned[i][p]`` are read once per
    parameter, so a mapping that loads its tensors lazily keeps peak memory near one model (the
    output) plus one parameter of each input. Floating tensors are merged in float32 (or float64
    when the base is) and cast back to the base's dtype and device; other tensors (integer buffers
    such as position ids) are copied from ``base`` unchanged.

    Args:
        base: the base model's state dict (parameter name to tensor); the deltas are taken from it.
        finetuned: the fine-tuned models' state dicts, with the same names and shapes as ``base``.
        weights: one weight per fine-tuned model (task arithmetic's scaling; for LM-Cocktail's
            weighted average, weights that sum to 1, e.g. from :func:`lm_cocktail_weights`).
        method: ``"task_arithmetic"`` (the deltas as they are) or ``"dare"`` (randomly pruned
            deltas, see :func:`dare_prune`).
        density: with ``"dare"``, the fraction of each delta's entries kept (drop rate
            ``1 - density``), in (0, 1]. Must stay 1 with ``"task_arithmetic"``.
        rescale: with ``"dare"``, divide the kept entries by ``density`` (DARE's rescaling).
        seed: with ``"dare"``, the seed of the masks; each (seed, parameter name, model index) has
            its own generator, so the result depends neither on the order of the parameters nor on
            the global RNG (which is left untouched).

    Returns:
        The merged state dict, in ``base``'s key order.

    Raises:
        ValueError: an unknown ``method``, ``density`` outside (0, 1], a number of weights other
            than the number of fine-tuned models, a non-finite weight, or a fine-tuned model whose
            names or shapes differ from the base's (the message names them).
    """
    items = _merged_items(base, finetuned, weights, method=method, density=density, rescale=rescale, seed=seed)
    return dict(items)


def merge_models(
    base_model: nn.Module,
    finetuned_models: Sequence[nn.Module | Mapping[str, torch.Tensor]],
    weights: Sequence[float],
    *,
    method: str = "task_arithmetic",
    density: float = 1.0,
    rescale: bool = True,
    seed: int = 0,
    inplace: bool = False,
) -> nn.Module:
    """:func:`merge_state_dicts` of models: the merged weights loaded into a model like ``base_model``.

    Each merged parameter is written into the target as soon as it is computed, so no second full
    state dict is held. Tied parameters (one tensor under several names, e.g. tied embeddings) are
    merged once, under their first name in ``base_model.state_dict()``, so they stay tied. Names,
    options and the shapes of models and plain dicts are checked before anything is written (a lazy
    mapping's shapes are checked as its tensors are read).

    Args:
        base_model: the model the deltas are taken from.
        finetuned_models: the fine-tuned models, or their state dicts (e.g. lazily loaded), with the
            same parameter names and shapes as ``base_model``.
        weights: one weight per fine-tuned model (see :func:`merge_state_dicts`).
        method: ``"task_arithmetic"`` or ``"dare"`` (see :func:`merge_state_dicts`).
        density: DARE's kept fraction, in (0, 1] (see :func:`merge_state_dicts`).
        rescale: DARE's rescaling of the kept entries by ``1 / density``.
        seed: the seed of DARE's masks.
        inplace: write into ``base_model`` itself instead of a deep copy of it.

    Returns:
        The merged model: ``base_model`` when ``inplace``, else a new copy (``base_model`` untouched).

    Raises:
        ValueError: as :func:`merge_state_dicts`.
    """
    base_state = base_model.state_dict()
    states = [m.state_dict() if isinstance(m, nn.Module) else m for m in finetuned_models]
    names = _untied_names(base_state)
    # Validate everything first, so a bad input cannot leave an in-place target half merged.
    items = _merged_items(
        base_state, states, weights, method=method, density=density, rescale=rescale, seed=seed, names=names
    )
    target = base_model if inplace else copy.deepcopy(base_model)
    target_state = target.state_dict()  # shares storage with the target's parameters and buffers
    with torch.no_grad():
        for name, tensor in items:
            target_state[name].copy_(tensor)
    return target


def uniform_weights(n: int) -> list[float]:
    """Equal weights ``1 / n`` for ``n`` models (plain model averaging).

    Args:
        n: the number of models, at least 1.
    """
    if n < 1:
        raise ValueError(f"uniform_weights needs at least one model, got n={n}")
    return [1.0 / n] * n


def lm_cocktail_weights(losses: Sequence[float], temperature: float = 5.0) -> list[float]:
    """LM-Cocktail's merging weights: ``softmax(-losses / temperature)``.

    The lower a candidate's loss on the target task's examples, the larger its weight; the weights
    sum to 1. A large temperature tends to uniform weights, a small one to the best candidate alone.

    Args:
        losses: each candidate model's loss on the examples (e.g. :func:`example_losses`).
        temperature: the softmax temperature, > 0 (LM-Cocktail's default: 5).

    Raises:
        ValueError: no losses, a non-finite loss, or a temperature that is not > 0.
    """
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    if len(losses) == 0:
        raise ValueError("lm_cocktail_weights needs at least one loss")
    scores = []
    for i, loss in enumerate(losses):
        if not math.isfinite(loss):
            raise ValueError(f"loss {i} is not finite: {loss}")
        scores.append(-float(loss) / temperature)
    top = max(scores)  # shifted by the max: exp never overflows
    exps = [math.exp(s - top) for s in scores]
    total = sum(exps)
    return [e / total for e in exps]


def example_losses(
    model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], *, max_batches: int | None = None
) -> float:
    """The mean causal-LM cross-entropy of ``model`` over a few batches, as LM-Cocktail scores a candidate.

    Each batch's loss is the model's own mean over its labelled tokens (labels ``-100`` are
    ignored); the result is the mean of the batch losses, as in LM-Cocktail. Runs without gradients
    and in eval mode (no dropout); the model's training mode is restored afterwards.

    Args:
        model: a causal LM that returns ``.loss`` when given ``labels``.
        batches: collated batches with ``input_ids``, ``labels`` and optionally ``attention_mask``
            (other keys are ignored); moved to the model's device.
        max_batches: stop after this many batches (None: all of them).

    Raises:
        ValueError: no batch, or a batch without ``labels``.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        with torch.no_grad():
            for batch in batches:
                if max_batches is not None and count >= max_batches:
                    break
                if "labels" not in batch:
                    raise ValueError(f"example_losses needs batches with labels, got keys {sorted(batch)}")
                inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "labels") if k in batch}
                total += float(model(**inputs, use_cache=False).loss)
                count += 1
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("example_losses got no batch")
    return total / count


def _check_density(density: float) -> None:
    if not 0.0 < density <= 1.0:  # also refuses NaN
        raise ValueError(f"density (the fraction of delta entries kept) must be in (0, 1], got {density}")


def _check_options(n_models: int, weights: Sequence[float], method: str, density: float) -> list[float]:
    if method not in MERGE_METHODS:
        raise ValueError(f"merge method must be one of {MERGE_METHODS}, got {method!r}")
    _check_density(density)
    if method == "task_arithmetic" and density != 1.0:
        raise ValueError(f"density={density} drops delta entries only with method='dare'")
    if n_models == 0:
        raise ValueError("merging needs at least one fine-tuned model")
    weights = [float(w) for w in weights]
    if len(weights) != n_models:
        raise ValueError(f"got {len(weights)} weight(s) for {n_models} fine-tuned model(s)")
    bad = [i for i, w in enumerate(weights) if not math.isfinite(w)]
    if bad:
        raise ValueError(f"weights must be finite, got {[weights[i] for i in bad]} at index {bad}")
    return weights


def _check_keys(base: Mapping[str, Any], finetuned: Sequence[Mapping[str, Any]]) -> None:
    names = set(base.keys())
    for i, state in enumerate(finetuned):
        other = set(state.keys())
        missing, extra = sorted(names - other), sorted(other - names)
        if missing or extra:
            raise ValueError(
                f"fine-tuned model {i} does not match the base's parameters: "
                f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
                f"unexpected {extra[:5]}{' ...' if len(extra) > 5 else ''}"
            )


def _check_shape(name: str, index: int, base: torch.Tensor, other: torch.Tensor) -> None:
    if tuple(other.shape) != tuple(base.shape):
        raise ValueError(
            f"parameter {name!r} has shape {tuple(other.shape)} in fine-tuned model {index} "
            f"but {tuple(base.shape)} in the base"
        )


def _untied_names(state: Mapping[str, torch.Tensor]) -> list[str]:
    """The names of ``state`` minus later aliases of one tensor (tied weights)."""
    seen, names = set(), []
    for name, tensor in state.items():
        if tensor.numel() == 0 or tensor.device.type == "meta":  # no storage to compare
            names.append(name)
            continue
        key = (
            tensor.device,
            tensor.untyped_storage().data_ptr(),
            tensor.storage_offset(),
            tensor.shape,
            tensor.stride(),
        )
        if key not in seen:
            seen.add(key)
            names.append(name)
    return names


def _merged_items(
    base: Mapping[str, torch.Tensor],
    finetuned: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float],
    *,
    method: str,
    density: float,
    rescale: bool,
    seed: int,
    names: Sequence[str] | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Check the inputs now, then return an iterator of the merged ``(name, tensor)`` pairs."""
    finetuned = list(finetuned)
    weights = _check_options(len(finetuned), weights, method, density)
    _check_keys(base, finetuned)
    names = list(base.keys()) if names is None else list(names)
    # Shapes of in-memory state dicts cost nothing to check up front; lazy ones are checked as read.
    if isinstance(base, dict):
        for i, state in enumerate(finetuned):
            if isinstance(state, dict):
                for name in names:
                    _check_shape(name, i, base[name], state[name])
    return _stream(base, finetuned, weights, method, density, rescale, seed, names)


def _stream(base, finetuned, weights, method, density, rescale, seed, names) -> Iterator[tuple[str, torch.Tensor]]:
    for name in names:
        base_tensor = base[name]
        if not base_tensor.is_floating_point():
            yield name, base_tensor.clone()
            continue
        # bf16/fp16 deltas lose most of their bits; accumulate in float32 at least.
        dtype = torch.promote_types(base_tensor.dtype, torch.float32)
        reference = base_tensor.to(dtype)
        merged = reference.clone()
        for index, (state, weight) in enumerate(zip(finetuned, weights)):
            tensor = state[name]
            _check_shape(name, index, base_tensor, tensor)
            delta = tensor.to(device=reference.device, dtype=dtype) - reference
            if method == "dare":
                generator = torch.Generator().manual_seed(_mask_seed(seed, name, index))
                delta = dare_prune(delta, density, rescale=rescale, generator=generator)
            merged += weight * delta
            del tensor, delta  # one fine-tuned parameter alive at a time
        yield name, merged.to(base_tensor.dtype)
