"""Information and information gain of an instance and its key-part-masked twin.

Paper: arXiv 2403.10056, section 3.3.

* ``Info(y|x) = sum_{k=1..K} alpha**k * p(t_k)`` (equation 2), where ``y = t_1 .. t_K`` is the
  tokenized response and ``p(t_k) = softmax(LLM(x; t_<k))[t_k]`` (equation 3).
* ``IG = Info(y|x) - Info(y|mask(x))`` (equation 1): how much the key parts of the
  instruction help the model produce the response. Low IG means the model "half-listens".
* ``T = 2 - min(IG, 1)`` (equation 5): the per-instance temperature of the JSD term.

The twins differ in prompt length, so their response tokens sit at different positions. All
comparisons here are made on the response: the ``k``-th response token of one twin with the
``k``-th of the other (left-aligned), never by position.

The batch is the collator's paired batch (:class:`~kpig_trainer.kpig.batch.KPIGBatch`).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from kpig_trainer.kpig.losses import IGNORE_INDEX, _check_shapes, response_positions

__all__ = [
    "response_token_probs",
    "info_score",
    "information_gain_from_logits",
    "information_gain",
    "ig_temperature",
    "check_twin_labels",
]

# Rows of [N, V] upcast to float32 at a time: bounds the transient memory of the logsumexp
# (2**24 floats = 64 MiB) without a Python loop per token.
_CHUNK_ELEMENTS = 1 << 24


def _response_logprobs(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Packed log-probabilities ``[N]`` of the response tokens, with their rows and ranks.

    Only the ``N`` positions that predict a response token are upcast (in chunks), so no
    float32 ``[B, T, V]`` softmax is ever materialised.
    """
    _check_shapes(logits, labels)
    rows, positions, targets = response_positions(labels, ignore_index)
    dtype = torch.promote_types(logits.dtype, torch.float32)
    chunk = max(1, _CHUNK_ELEMENTS // max(logits.shape[-1], 1))
    pieces = []
    for start in range(0, rows.numel(), chunk):
        part = slice(start, start + chunk)
        selected = logits[rows[part], positions[part]].to(dtype)  # [n, V]
        target_logit = selected.gather(-1, targets[part].unsqueeze(-1)).squeeze(-1)
        pieces.append(target_logit - torch.logsumexp(selected, dim=-1))
    logp = torch.cat(pieces) if pieces else logits.new_zeros(0, dtype=dtype)
    # Rank of each response token within its row (0-based): the left-aligned column.
    is_response = labels[:, 1:] != ignore_index
    ranks = (is_response.cumsum(dim=1) - 1)[rows, positions]
    return logp, rows, ranks


def response_token_probs(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> tuple[torch.Tensor, torch.Tensor]:
    """Probability of each response token, left-aligned on the response (equation 3).

    Args:
        logits: ``[B, T, V]`` causal-LM logits (any float dtype; softmax runs in float32, or
            float64 for float64 inputs). Position ``t - 1`` predicts label ``t``.
        labels: ``[B, T]`` response token ids, ``ignore_index`` elsewhere (padding may be on
            either side).
        ignore_index: label value that marks non-response positions.

    Returns:
        ``(probs, mask)``, both ``[B, K_max]`` where ``K_max`` is the longest response in the
        batch: ``probs[b, k]`` is ``p(t_{k+1})`` of row ``b``'s ``(k+1)``-th response token
        whatever its position (float32, or float64 for float64 logits); ``mask`` is ``True``
        on real columns. Padded columns hold 0.
    """
    logp, rows, ranks = _response_logprobs(logits, labels, ignore_index)
    batch_size = labels.shape[0]
    k_max = int(ranks.max().item()) + 1 if ranks.numel() else 0
    probs = logp.new_zeros(batch_size, k_max)
    mask = torch.zeros(batch_size, k_max, dtype=torch.bool, device=labels.device)
    probs[rows, ranks] = logp.exp()
    mask[rows, ranks] = True
    return probs, mask


def info_score(
    logits: torch.Tensor, labels: torch.Tensor, alpha: float, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """``Info(y|x) = sum_{k=1..K} alpha**k * p(t_k)`` for every row (equation 2).

    Args:
        logits: ``[B, T, V]`` causal-LM logits of the instances.
        labels: ``[B, T]`` response token ids, ``ignore_index`` elsewhere.
        alpha: exponential decay (the paper searches {0.05, 0.1, 0.3, 0.6, 1.0}); the first
            response token gets weight ``alpha``.
        ignore_index: label value that marks non-response positions.

    Returns:
        ``[B]`` float32 scores (float64 for float64 logits); 0 for a row without response.
    """
    if not alpha >= 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    logp, rows, ranks = _response_logprobs(logits, labels, ignore_index)
    # alpha**(k+1) computed in float64 then cast: underflows cleanly to 0 for long responses.
    base = torch.tensor(float(alpha), dtype=torch.float64, device=logp.device)
    weights = (base ** (ranks + 1)).to(logp.dtype)
    scores = logp.new_zeros(labels.shape[0])
    return scores.index_add(0, rows, weights * logp.exp())


def _response_targets(labels: torch.Tensor, ignore_index: int) -> list[list[int]]:
    rows, _, targets = response_positions(labels, ignore_index)
    per_row: list[list[int]] = [[] for _ in range(labels.shape[0])]
    for r, t in zip(rows.tolist(), targets.tolist()):
        per_row[r].append(t)
    return per_row


def check_twin_labels(
    full_labels: torch.Tensor, masked_labels: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> None:
    """Raise if a row's twins do not mark the same response tokens (collator contract)."""
    if full_labels.shape[0] != masked_labels.shape[0]:
        raise ValueError(f"twins differ in batch size: {full_labels.shape[0]} vs {masked_labels.shape[0]}")
    full = _response_targets(full_labels, ignore_index)
    masked = _response_targets(masked_labels, ignore_index)
    bad = [b for b, (f, m) in enumerate(zip(full, masked)) if f != m]
    if bad:
        b = bad[0]
        raise ValueError(
            f"twins must mark the same response tokens; rows {bad} differ (row {b}: "
            f"{len(full[b])} tokens in labels, {len(masked[b])} in masked_labels). Was one twin "
            "truncated differently?"
        )


def information_gain_from_logits(
    full_logits: torch.Tensor,
    full_labels: torch.Tensor,
    masked_logits: torch.Tensor,
    masked_labels: torch.Tensor,
    alpha: float,
    *,
    ignore_index: int = IGNORE_INDEX,
    check_twins: bool = True,
) -> torch.Tensor:
    """``IG = Info(y|x) - Info(y|mask(x))`` from the logits of both twins (equation 1).

    The twins may have different lengths and response offsets; each Info sums over its own
    response tokens with weights ``alpha**k`` by rank ``k`` in the response, so the two sums
    align token for token.

    Args:
        full_logits: ``[B, T1, V]`` logits on the full instances.
        full_labels: ``[B, T1]`` their labels.
        masked_logits: ``[B, T2, V]`` logits on the masked twins.
        masked_labels: ``[B, T2]`` their labels (same response tokens as ``full_labels``).
        alpha: exponential decay of equation 2.
        ignore_index: label value that marks non-response positions.
        check_twins: verify that each row's twins mark the same response token ids (one
            host sync); raise ``ValueError`` otherwise.

    Returns:
        ``[B]`` float32 information gains (can be negative).
    """
    if check_twins:
        check_twin_labels(full_labels, masked_labels, ignore_index)
    full = info_score(full_logits, full_labels, alpha, ignore_index)
    masked = info_score(masked_logits, masked_labels, alpha, ignore_index)
    return full - masked


def _to(tensor: torch.Tensor, device: torch.device | None) -> torch.Tensor:
    return tensor if device is None else tensor.to(device)


def _model_device(model: torch.nn.Module) -> torch.device | None:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return None


@torch.no_grad()
def information_gain(
    model: torch.nn.Module,
    batch: Mapping[str, torch.Tensor],
    alpha: float,
    *,
    fuse_twins: bool = True,
    share_prefix: bool = True,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Information gain of each instance of a collated batch under ``model`` (equation 1).

    Runs without gradients and in eval mode (dropout off; the previous mode is restored).

    Args:
        model: a causal LM called as ``model(input_ids=..., attention_mask=...)`` whose output
            has ``.logits`` (or is a tuple with logits first).
        batch: the collator's dict, keys as in the module docstring.
        alpha: exponential decay of equation 2.
        fuse_twins: run both twins in one forward: the shorter side is right-padded to the
            common length (attention mask 0, label -100) and the halves are concatenated.
            Right padding after the last real token cannot change a causal model's logits at
            earlier positions. ``False`` runs two forwards (half the peak memory).
        share_prefix: run the prompt tokens that all rows of a twin share (the instruction of
            a batch of one task's instances) once, and the rest of each row on its key/value
            cache (:func:`kpig_trainer.kpig.twins.forward_shared_prefix`); equal up to float
            rounding, about half the work on SuperNI tasks. Models without a cache ignore it.
        ignore_index: label value that marks non-response positions.

    Returns:
        ``[B]`` float32 information gains, on the model's device.
    """
    device = _model_device(model)
    keys = ("input_ids", "attention_mask", "labels")
    full = [_to(batch[k], device) for k in keys]
    masked = [_to(batch[f"masked_{k}"], device) for k in keys]
    check_twin_labels(full[2], masked[2], ignore_index)

    # Logits only where the IG reads them (the response frame), as the trainer's passes do.
    from kpig_trainer.kpig.twins import Twin, accepts_logits_to_keep, forward_shared_prefix, forward_twins

    frame = ignore_index == IGNORE_INDEX  # Twin finds the response frame by IGNORE_INDEX
    twins = [Twin.from_tensors(*side, response_only=frame) for side in (full, masked)]
    keep = accepts_logits_to_keep(model)
    was_training = model.training
    model.eval()
    try:
        logits = [forward_shared_prefix(model, t, keep) if share_prefix else None for t in twins]
        if all(side is None for side in logits):
            logits = forward_twins(model, twins, fuse=fuse_twins, logits_to_keep=keep)
        else:
            logits = [
                side if side is not None else forward_twins(model, [t], logits_to_keep=keep)[0]
                for side, t in zip(logits, twins)
            ]
    finally:
        model.train(was_training)
    return information_gain_from_logits(
        logits[0],
        twins[0].frame_labels,
        logits[1],
        twins[1].frame_labels,
        alpha,
        ignore_index=ignore_index,
        check_twins=False,
    )


def ig_temperature(
    ig: torch.Tensor | float,
    max_ig: float = 1.0,
    *,
    min_temperature: float | None = None,
    max_temperature: float | None = None,
) -> torch.Tensor:
    """Dynamic JSD temperature ``T = 2 - min(IG, max_ig)`` (equation 5, ``max_ig = 1``).

    With the paper's formula ``T >= 1``, and ``T > 2`` when the IG is negative (masking the key
    parts *helped* the model); nothing bounds it from above. The formula is kept as is by
    default; ``max_temperature`` optionally caps it (e.g. 2.0 to treat negative IG as zero)
    and ``min_temperature`` floors it.

    Args:
        ig: information gains ``[B]`` (or a float).
        max_ig: upper clip of the IG (1 in the paper); must be < 2 unless ``min_temperature``
            keeps ``T`` positive.
        min_temperature: optional lower clamp of ``T`` (default: none).
        max_temperature: optional upper clamp of ``T`` (default: none).

    Returns:
        Temperatures with the shape of ``ig``, float32 for non-float64 input, detached.
    """
    if None not in (min_temperature, max_temperature) and min_temperature > max_temperature:
        raise ValueError(f"min_temperature {min_temperature} > max_temperature {max_temperature}")
    if max_ig >= 2 and not (min_temperature is not None and min_temperature > 0):
        raise ValueError(f"max_ig={max_ig} allows T <= 0; use max_ig < 2 or a positive min_temperature")
    ig = torch.as_tensor(ig).detach()
    ig = ig.to(torch.promote_types(ig.dtype, torch.float32))
    temperature = 2.0 - ig.clamp(max=max_ig)
    if min_temperature is not None or max_temperature is not None:
        temperature = temperature.clamp(min=min_temperature, max=max_temperature)
    return temperature
