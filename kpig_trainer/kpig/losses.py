"""Losses of KPIG: masked Jensen-Shannon divergence and response-token cross entropy.

The training objective is equation 4 of the paper (arXiv 2403.10056, section 3.3)::

    L = L_CE(d) + lambda * L_JSD( p_t(d^m) / T  ||  p_{t-1}(d^m) / T )

where ``d`` is the full instance, ``d^m`` its masked twin, ``p_t`` the model being trained
(the *student*), ``p_{t-1}`` the frozen previous-stage model (the *teacher*), and ``T`` the
per-instance temperature of equation 5 (see :func:`kpig_trainer.kpig.info_gain.ig_temperature`).

Conventions (Hugging Face causal LM):

* ``logits`` are ``[B, T, V]``; ``labels`` are ``[B, T]`` with ``-100`` everywhere except on
  the response tokens. The logits at position ``t - 1`` predict the label at ``t``; every
  function here shifts internally, as ``transformers``' ``ForCausalLMLoss`` does.
* **Packed response layout.** Several functions work on the response positions only, packed
  into ``[N, ...]`` where ``N`` is the number of response tokens of the whole batch, in
  row-major order: all response tokens of row 0 left to right, then row 1, and so on
  (:func:`gather_response_positions`). A teacher top-k cache must use this order.

Reduction rule, shared by :func:`kpig_jsd`, :func:`kpig_jsd_topk` and
:func:`cross_entropy_loss`: token losses are summed over the response tokens and divided by
``num_items_in_batch`` when it is given (the number of response tokens of the whole
accumulated batch, which ``transformers.Trainer`` passes to ``compute_loss``), otherwise by
the number of response tokens in this batch. Dividing every micro-batch by the *global* count
makes gradient accumulation exact (TRL's GKD does the same since its issue #4719); a mean
per micro-batch does not. A batch with no response token gives a loss of 0, not NaN.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100

# Stands in for log(0): finite, so that 0 * (log 0 - log 0) is 0 rather than NaN, and so that
# logaddexp's backward never sees (-inf) - (-inf). exp(-1e30) is exactly 0 in float32/64.
_LOG_ZERO = -1e30

_REDUCTIONS = ("mean", "sum", "none")

__all__ = [
    "IGNORE_INDEX",
    "response_positions",
    "gather_response_positions",
    "topk_teacher_cache",
    "kpig_jsd",
    "kpig_jsd_topk",
    "cross_entropy_loss",
]


# --------------------------------------------------------------------------------------------
# Response positions
# --------------------------------------------------------------------------------------------


def _check_shapes(logits: torch.Tensor, labels: torch.Tensor) -> None:
    if logits.dim() != 3 or labels.dim() != 2 or logits.shape[:2] != labels.shape:
        raise ValueError(
            f"expected logits [B, T, V] and labels [B, T], got {tuple(logits.shape)} and {tuple(labels.shape)}"
        )


def response_positions(
    labels: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Indices of the response tokens, in packed (row-major) order.

    Args:
        labels: ``[B, T]`` labels, ``ignore_index`` outside the response.
        ignore_index: label value that marks non-response positions.

    Returns:
        ``(rows, logit_positions, targets)``, each ``[N]``: the row of each response token, the
        position of the logits that predict it (its own position minus one) and its token id.
        Row 0's tokens come first, left to right, then row 1's, and so on.
    """
    shifted = labels[:, 1:]
    rows, positions = (shifted != ignore_index).nonzero(as_tuple=True)
    return rows, positions, shifted[rows, positions]


def gather_response_positions(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Pack the logits that predict response tokens into ``[N, V]``.

    Row ``n`` holds the logits (position ``t - 1``) predicting the ``n``-th response token of
    the batch in the packed order of :func:`response_positions` (row by row, left to right).
    This is the layout of a teacher top-k cache consumed by :func:`kpig_jsd_topk`.

    Args:
        logits: ``[B, T, V]``, any dtype (returned unchanged in dtype).
        labels: ``[B, T]``.
        ignore_index: label value that marks non-response positions.

    Returns:
        ``[N, V]`` tensor; ``N`` may be 0.
    """
    _check_shapes(logits, labels)
    rows, positions, _ = response_positions(labels, ignore_index)
    return logits[rows, positions]


@torch.no_grad()
def topk_teacher_cache(
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    k: int,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k log-probs of a teacher at the response positions, for :func:`kpig_jsd_topk`.

    The cache producer (appendix B of the paper: store the previous model's outputs on the
    masked twins before a stage) calls this on the teacher's logits of the masked twins.

    Args:
        teacher_logits: ``[B, T, V]`` teacher logits.
        labels: ``[B, T]`` labels of the same (masked) sequences.
        k: number of vocabulary entries to keep per response token.
        ignore_index: label value that marks non-response positions.

    Returns:
        ``(logprobs, indices)``, both ``[N, k]`` in the packed order of
        :func:`gather_response_positions`: float32 ``log_softmax`` values at temperature 1
        and the int64 vocabulary ids, largest first.
    """
    packed = gather_response_positions(teacher_logits, labels, ignore_index)
    logprobs = torch.log_softmax(packed.float(), dim=-1)
    values, indices = logprobs.topk(min(k, logprobs.shape[-1]), dim=-1)
    return values, indices


# --------------------------------------------------------------------------------------------
# Jensen-Shannon divergence
# --------------------------------------------------------------------------------------------


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """At least float32 (half inputs are upcast); float64 stays float64 (for gradcheck)."""
    return torch.promote_types(dtype, torch.float32)


def _per_token_temperature(
    temperature: torch.Tensor | float, rows: torch.Tensor, batch_size: int, dtype: torch.dtype
) -> torch.Tensor | float:
    """Broadcast a per-instance temperature ``[B]`` (or a float) to packed tokens ``[N, 1]``."""
    if not torch.is_tensor(temperature):
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        return float(temperature)
    # The temperature comes from the IG (equation 5), a constant for the loss: no gradient.
    temperature = temperature.detach().to(device=rows.device, dtype=dtype)
    if temperature.dim() == 0:
        return temperature
    if temperature.shape != (batch_size,):
        raise ValueError(
            f"temperature must be a float or a tensor of shape [{batch_size}], got {tuple(temperature.shape)}"
        )
    return temperature[rows].unsqueeze(-1)


def _jsd_from_logprobs(log_p: torch.Tensor, log_q: torch.Tensor, log_base: float) -> torch.Tensor:
    """Per-row JSD ``0.5 KL(P||M) + 0.5 KL(Q||M)`` of two log-distributions ``[N, S]``."""
    log_p = log_p.clamp(min=_LOG_ZERO)
    log_q = log_q.clamp(min=_LOG_ZERO)
    # Mixture in log space: log M = logaddexp(log P, log Q) - log 2 (no exp/log round trip).
    log_m = torch.logaddexp(log_p, log_q) - math.log(2.0)
    kl_pm = (log_p.exp() * (log_p - log_m)).sum(-1)
    kl_qm = (log_q.exp() * (log_q - log_m)).sum(-1)
    # Each KL term is >= 0 in exact arithmetic; clamp away rounding below zero.
    return (0.5 * (kl_pm + kl_qm)).clamp(min=0.0) / math.log(log_base)


def _reduce(
    token_losses: torch.Tensor,
    rows: torch.Tensor,
    positions: torch.Tensor,
    labels: torch.Tensor,
    reduction: str,
    num_items_in_batch: torch.Tensor | int | None,
) -> torch.Tensor:
    """Apply the module's reduction rule to packed per-token losses ``[N]``."""
    if reduction == "none":
        if num_items_in_batch is not None:
            raise ValueError("num_items_in_batch cannot be combined with reduction='none'")
        batch_size, length = labels.shape
        out = token_losses.new_zeros(batch_size, max(length - 1, 0))
        return out.index_put((rows, positions), token_losses)
    total = token_losses.sum()
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(total.device)
        return total / num_items_in_batch
    if reduction == "sum":
        return total
    # "mean" over the response tokens of this batch; an empty batch gives 0, not 0/0.
    return total / max(token_losses.numel(), 1)


def _check_options(reduction: str, log_base: float | None = None) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if log_base is not None and not (log_base > 0 and log_base != 1):
        raise ValueError(f"log_base must be > 0 and != 1, got {log_base}")


def kpig_jsd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: torch.Tensor | float,
    *,
    log_base: float = 2.0,
    reduction: str = "mean",
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Temperature-scaled Jensen-Shannon divergence on the response tokens (equation 4).

    ``JSD = 0.5 KL(P||M) + 0.5 KL(Q||M)``, ``M = (P + Q) / 2``, with ``P = softmax(student / T)``
    and ``Q = softmax(teacher / T)`` at every position that predicts a response token. Both
    models see the same (masked) sequence, so positions align. Computed in float32 (float64
    inputs stay float64) in log space; ``-inf`` logits (banned vocabulary entries) and
    extreme values are safe. The teacher is detached: only the student gets gradients.

    Args:
        student_logits: ``[B, T, V]`` logits of the model being trained on the masked twins.
        teacher_logits: ``[B, T, V]`` logits of the previous-stage model on the same inputs.
        labels: ``[B, T]`` labels of the masked twins (``ignore_index`` outside the response).
        temperature: per-instance temperature ``[B]`` (equation 5) or one float; a row's value
            applies to all its tokens. Must be > 0 (a tensor is not checked, to avoid a sync).
        log_base: base of the logarithm; 2 bounds the JSD in ``[0, 1]`` (the paper's
            statement), ``math.e`` gives nats.
        reduction: ``"mean"`` (sum / response tokens in this batch), ``"sum"``, or ``"none"``
            (per-token values ``[B, T - 1]`` aligned with the shifted labels, 0 elsewhere).
        num_items_in_batch: if given, return sum / ``num_items_in_batch`` (takes precedence
            over ``"mean"``/``"sum"``; not allowed with ``"none"``). Pass the Trainer's value
            for exact gradient accumulation.
        ignore_index: label value that marks non-response positions.

    Returns:
        A scalar tensor (or ``[B, T - 1]`` for ``reduction="none"``).
    """
    _check_shapes(student_logits, labels)
    _check_options(reduction, log_base)
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"student and teacher logits differ in shape: {tuple(student_logits.shape)} vs "
            f"{tuple(teacher_logits.shape)}"
        )
    rows, positions, _ = response_positions(labels, ignore_index)
    dtype = _compute_dtype(student_logits.dtype)
    temp = _per_token_temperature(temperature, rows, labels.shape[0], dtype)
    student = student_logits[rows, positions].to(dtype) / temp
    teacher = teacher_logits.detach()[rows, positions].to(dtype) / temp
    token_jsd = _jsd_from_logprobs(torch.log_softmax(student, dim=-1), torch.log_softmax(teacher, dim=-1), log_base)
    return _reduce(token_jsd, rows, positions, labels, reduction, num_items_in_batch)


def kpig_jsd_topk(
    student_logits: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    teacher_topk_indices: torch.Tensor,
    labels: torch.Tensor,
    temperature: torch.Tensor | float,
    *,
    log_base: float = 2.0,
    reduction: str = "mean",
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """:func:`kpig_jsd` against a cached teacher given only as top-k log-probs.

    Approximation: both distributions are restricted to the teacher's top-k support ``S`` of
    each token, tempered and renormalised there -- ``P_S = softmax(student[S] / T)``,
    ``Q_S = softmax(teacher_logprobs[S] / T)`` -- and the JSD is taken on ``S``. Because the
    cached values are log-probs (logits minus a per-token constant), ``Q_S`` is exactly the
    tempered teacher renormalised on ``S``. The error vs :func:`kpig_jsd` grows with the mass
    outside ``S`` (larger ``T`` flattens the tails; the error at several k is measured in
    ``benchmarks/README.md``). The student's mass outside ``S`` is not penalised.

    Args:
        student_logits: ``[B, T, V]`` student logits on the masked twins.
        teacher_topk_logprobs: ``[N, k]`` teacher log-probs (any per-token shift is fine) in the
            packed order of :func:`gather_response_positions` (row by row, left to right).
            ``-inf`` entries (padding) are allowed.
        teacher_topk_indices: ``[N, k]`` int64 vocabulary ids of those entries.
        labels: ``[B, T]`` labels of the masked twins; must mark exactly ``N`` response tokens.
        temperature, log_base, reduction, num_items_in_batch, ignore_index: as in
            :func:`kpig_jsd`.

    Returns:
        A scalar tensor (or ``[B, T - 1]`` for ``reduction="none"``).
    """
    _check_shapes(student_logits, labels)
    _check_options(reduction, log_base)
    rows, positions, _ = response_positions(labels, ignore_index)
    if teacher_topk_logprobs.shape != teacher_topk_indices.shape or (
        teacher_topk_logprobs.dim() != 2 or teacher_topk_logprobs.shape[0] != rows.numel()
    ):
        raise ValueError(
            f"teacher top-k cache must be [N, k] with N = {rows.numel()} response tokens; got "
            f"log-probs {tuple(teacher_topk_logprobs.shape)} and indices "
            f"{tuple(teacher_topk_indices.shape)}"
        )
    dtype = _compute_dtype(student_logits.dtype)
    temp = _per_token_temperature(temperature, rows, labels.shape[0], dtype)
    student = student_logits[rows, positions]
    student = student.gather(-1, teacher_topk_indices.to(student.device).long()).to(dtype) / temp
    teacher = teacher_topk_logprobs.detach().to(device=student.device, dtype=dtype) / temp
    token_jsd = _jsd_from_logprobs(torch.log_softmax(student, dim=-1), torch.log_softmax(teacher, dim=-1), log_base)
    return _reduce(token_jsd, rows, positions, labels, reduction, num_items_in_batch)


# --------------------------------------------------------------------------------------------
# Cross entropy
# --------------------------------------------------------------------------------------------


def cross_entropy_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    num_items_in_batch: torch.Tensor | int | None = None,
    *,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Causal-LM cross entropy on the response tokens (the ``L_CE`` term of equation 4).

    Equals ``transformers.loss.loss_utils.ForCausalLMLoss`` on the same inputs (sum /
    ``num_items_in_batch`` when given, else mean over label tokens), except that a batch with
    no label token gives 0 instead of NaN. Only the response positions are upcast to float32,
    not the whole ``[B, T, V]`` tensor.

    Args:
        logits: ``[B, T, V]`` logits.
        labels: ``[B, T]`` labels, ``ignore_index`` outside the response.
        num_items_in_batch: number of response tokens in the whole accumulated batch.
        ignore_index: label value that marks non-response positions.

    Returns:
        Scalar loss tensor.
    """
    _check_shapes(logits, labels)
    rows, positions, targets = response_positions(labels, ignore_index)
    packed = logits[rows, positions].to(_compute_dtype(logits.dtype))
    token_losses = F.cross_entropy(packed, targets, reduction="none")
    return _reduce(token_losses, rows, positions, labels, "mean", num_items_in_batch)
