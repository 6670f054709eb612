"""Tests for kpig_trainer.kpig.losses (the CE and JSD terms of equation 4 of arXiv 2403.10056)."""

from __future__ import annotations

import math

import pytest
import torch

from kpig_trainer.kpig.info_gain import response_token_probs
from kpig_trainer.kpig.losses import (
    cross_entropy_loss,
    gather_response_positions,
    kpig_jsd,
    kpig_jsd_topk,
    topk_teacher_cache,
)

IGNORE = -100
VOCAB = 7


# ---------------------------------------------------------------------------------------------
# Naive reference: plain Python floats, one token at a time, 0 * log 0 = 0.
# ---------------------------------------------------------------------------------------------


def _softmax(values: list[float]) -> list[float]:
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    total = sum(exps)
    return [e / total for e in exps]


def ref_jsd_tokens(student, teacher, labels, temperatures, base) -> list[list[float]]:
    """Per row, the JSD of each response token (logits at t-1 for the label at t)."""
    s_rows, t_rows, l_rows = student.double().tolist(), teacher.double().tolist(), labels.tolist()
    out = []
    for s_row, t_row, l_row, temp in zip(s_rows, t_rows, l_rows, temperatures):
        values = []
        for t in range(1, len(l_row)):
            if l_row[t] == IGNORE:
                continue
            p = _softmax([x / temp for x in s_row[t - 1]])
            q = _softmax([x / temp for x in t_row[t - 1]])
            jsd = 0.0
            for pi, qi in zip(p, q):
                mi = 0.5 * (pi + qi)
                if pi > 0:
                    jsd += 0.5 * pi * math.log(pi / mi)
                if qi > 0:
                    jsd += 0.5 * qi * math.log(qi / mi)
            values.append(jsd / math.log(base))
        out.append(values)
    return out


def make_labels(lengths, prompt_lens, total, left_pad, gen):
    labels = torch.full((len(lengths), total), IGNORE)
    for b, (n, p) in enumerate(zip(lengths, prompt_lens)):
        start = (total - n - p if left_pad else 0) + p
        labels[b, start : start + n] = torch.randint(0, VOCAB, (n,), generator=gen)
    return labels


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


TEMPERATURES = [1.0, 1.5, 2.0, 2.7, "per_row"]
PER_ROW = [1.0, 2.7, 1.5, 2.0]


def _temperature_args(temperature):
    if temperature == "per_row":
        return torch.tensor(PER_ROW), PER_ROW
    return temperature, [temperature] * 4


# ---------------------------------------------------------------------------------------------
# kpig_jsd against the reference
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("base", [2.0, math.e])
@pytest.mark.parametrize("left_pad", [False, True])
def test_kpig_jsd_matches_reference(gen, temperature, base, left_pad):
    labels = make_labels([3, 0, 5, 1], [2, 3, 1, 4], 10, left_pad, gen)
    student = torch.randn(4, 10, VOCAB, generator=gen) * 3
    teacher = torch.randn(4, 10, VOCAB, generator=gen) * 3
    temp_arg, temps = _temperature_args(temperature)
    ref = ref_jsd_tokens(student, teacher, labels, temps, base)
    flat = [v for row in ref for v in row]

    total = kpig_jsd(student, teacher, labels, temp_arg, log_base=base, reduction="sum")
    mean = kpig_jsd(student, teacher, labels, temp_arg, log_base=base)
    per_token = kpig_jsd(student, teacher, labels, temp_arg, log_base=base, reduction="none")
    by_count = kpig_jsd(student, teacher, labels, temp_arg, log_base=base, num_items_in_batch=20)

    assert mean.dtype == torch.float32
    assert total.item() == pytest.approx(sum(flat), rel=1e-5)
    assert mean.item() == pytest.approx(sum(flat) / len(flat), rel=1e-5)
    assert by_count.item() == pytest.approx(sum(flat) / 20, rel=1e-5)
    assert per_token.shape == (4, 9)
    # "none": values sit at the shifted label positions, zeros elsewhere.
    is_response = labels[:, 1:] != IGNORE
    assert (per_token[~is_response] == 0).all()
    for b in range(4):
        assert per_token[b][is_response[b]].tolist() == pytest.approx(ref[b], rel=1e-5, abs=1e-7)


def test_kpig_jsd_half_precision(gen):
    labels = make_labels([3, 2], [2, 1], 8, False, gen)
    student = (torch.randn(2, 8, VOCAB, generator=gen) * 3).bfloat16()
    teacher = (torch.randn(2, 8, VOCAB, generator=gen) * 3).half()
    out = kpig_jsd(student, teacher, labels, 1.5)
    assert out.dtype == torch.float32
    ref = [v for row in ref_jsd_tokens(student, teacher, labels, [1.5, 1.5], 2.0) for v in row]
    assert out.item() == pytest.approx(sum(ref) / len(ref), rel=1e-5)


# ---------------------------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------------------------


def test_jsd_zero_for_identical_and_symmetric(gen):
    labels = make_labels([4, 2, 6], [1, 2, 1], 9, False, gen)
    a = torch.randn(3, 9, VOCAB, generator=gen) * 5
    b = torch.randn(3, 9, VOCAB, generator=gen) * 5
    temps = torch.tensor([1.0, 1.7, 2.4])
    assert kpig_jsd(a, a.clone(), labels, temps, reduction="sum").item() == pytest.approx(0.0, abs=1e-6)
    ab = kpig_jsd(a, b, labels, temps, reduction="none")
    ba = kpig_jsd(b, a, labels, temps, reduction="none")
    assert torch.allclose(ab, ba, atol=1e-6)
    assert (ab >= 0).all() and (ab <= 1).all()
    assert ab.sum() > 0


def test_jsd_bounds_and_extreme_logits():
    labels = torch.tensor([[IGNORE, 1, 2, 3], [IGNORE, IGNORE, IGNORE, IGNORE]])
    student = torch.full((2, 4, VOCAB), -1e4)
    teacher = torch.full((2, 4, VOCAB), -1e4)
    student[..., 0] = 1e4  # disjoint one-hot distributions: the JSD maximum, 1 bit
    teacher[..., 1] = 1e4
    student[..., 5:] = float("-inf")  # banned vocabulary entries
    teacher[..., 6] = float("-inf")
    student.requires_grad_(True)
    bits = kpig_jsd(student, teacher, labels, torch.tensor([1.0, 2.0]), reduction="none")
    assert torch.isfinite(bits).all()
    assert bits[0, :3].tolist() == pytest.approx([1.0] * 3, abs=1e-6)
    assert (bits[1] == 0).all()  # no response in row 1
    nats = kpig_jsd(student, teacher, labels, 1.0, log_base=math.e)
    assert nats.item() == pytest.approx(math.log(2), abs=1e-6)
    nats.backward()
    assert torch.isfinite(student.grad).all()


def test_jsd_partial_overlap_with_inf_entries_is_finite(gen):
    labels = make_labels([3, 3], [1, 1], 6, False, gen)
    student = torch.randn(2, 6, VOCAB, generator=gen) * 1e3
    teacher = torch.randn(2, 6, VOCAB, generator=gen) * 1e3
    student[..., :2] = float("-inf")
    teacher[..., 1:3] = float("-inf")  # entry 1 is -inf in both, 0 and 2 in one only
    student.requires_grad_(True)
    loss = kpig_jsd(student, teacher, labels, torch.tensor([1.0, 2.7]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()
    ref = [v for row in ref_jsd_tokens(student.detach(), teacher, labels, [1.0, 2.7], 2.0) for v in row]
    assert loss.item() == pytest.approx(sum(ref) / len(ref), rel=1e-5, abs=1e-6)


def test_batch_without_response_gives_zero(gen):
    labels = torch.full((2, 5), IGNORE)
    student = torch.randn(2, 5, VOCAB, generator=gen, requires_grad=True)
    teacher = torch.randn(2, 5, VOCAB, generator=gen)
    for loss in (kpig_jsd(student, teacher, labels, 2.0), cross_entropy_loss(student, labels)):
        assert loss.item() == 0.0
        (grad,) = torch.autograd.grad(loss, student)
        assert (grad == 0).all()


# ---------------------------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------------------------


def test_gradient_flows_only_into_student(gen):
    labels = make_labels([3, 2], [1, 2], 7, True, gen)
    student = torch.randn(2, 7, VOCAB, generator=gen, requires_grad=True)
    teacher = torch.randn(2, 7, VOCAB, generator=gen, requires_grad=True)
    temperature = torch.tensor([1.0, 2.0], requires_grad=True)
    kpig_jsd(student, teacher, labels, temperature).backward()
    assert teacher.grad is None and temperature.grad is None
    assert student.grad is not None and student.grad.abs().sum() > 0
    # Only the positions that predict response tokens receive gradient.
    predicting = torch.zeros(2, 7, dtype=torch.bool)
    predicting[:, :-1] = labels[:, 1:] != IGNORE
    assert (student.grad[~predicting] == 0).all()


def test_gradcheck_float64(gen):
    labels = make_labels([2, 1], [1, 1], 4, False, gen)
    student = torch.randn(2, 4, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(2, 4, 5, generator=gen, dtype=torch.float64)
    temps = torch.tensor([1.3, 2.2], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda s: kpig_jsd(s, teacher, labels, temps, log_base=math.e), (student,))
    assert torch.autograd.gradcheck(
        lambda s: kpig_jsd(s, teacher, labels, temps, reduction="none"), (student,), fast_mode=True
    )
    assert torch.autograd.gradcheck(lambda s: cross_entropy_loss(s, labels), (student,), fast_mode=True)


# ---------------------------------------------------------------------------------------------
# Gradient accumulation: two micro-batches == one batch, with num_items_in_batch
# ---------------------------------------------------------------------------------------------


def _ga_inputs(gen):
    # Halves with different response counts: rows 0-1 have 2 tokens, rows 2-3 have 11.
    labels = make_labels([1, 1, 5, 6], [2, 3, 1, 2], 10, False, gen)
    student = torch.randn(4, 10, VOCAB, generator=gen, requires_grad=True)
    teacher = torch.randn(4, 10, VOCAB, generator=gen)
    temps = torch.tensor([1.0, 1.5, 2.0, 2.7])
    return labels, student, teacher, temps


LOSSES = {
    "ce": lambda s, t, labels, temp, **kw: cross_entropy_loss(s, labels, **kw),
    "jsd": lambda s, t, labels, temp, **kw: kpig_jsd(s, t, labels, temp, **kw),
}


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_gradient_accumulation_equivalence(gen, name):
    loss_fn = LOSSES[name]
    labels, student, teacher, temps = _ga_inputs(gen)
    num_items = int((labels[:, 1:] != IGNORE).sum())  # what transformers counts
    assert num_items == 13

    full = loss_fn(student, teacher, labels, temps, num_items_in_batch=num_items)
    (full_grad,) = torch.autograd.grad(full, student)
    halves = [slice(0, 2), slice(2, 4)]
    micro = sum(
        loss_fn(student[h], teacher[h], labels[h], temps[h], num_items_in_batch=torch.tensor(num_items))
        for h in halves
    )
    (micro_grad,) = torch.autograd.grad(micro, student)
    assert micro.item() == pytest.approx(full.item(), rel=1e-6)
    assert torch.allclose(micro_grad, full_grad, rtol=1e-5, atol=1e-8)
    # Without num_items_in_batch, the full batch's mean matches its num_items normalisation ...
    assert loss_fn(student, teacher, labels, temps).item() == pytest.approx(full.item(), rel=1e-6)
    # ... but averaging per-micro-batch means (what the Trainer does then) is wrong here.
    naive = sum(loss_fn(student[h], teacher[h], labels[h], temps[h]) for h in halves) / len(halves)
    (naive_grad,) = torch.autograd.grad(naive, student)
    assert abs(naive.item() - full.item()) > 1e-2 * full.item()
    assert not torch.allclose(naive_grad, full_grad, rtol=1e-3, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Cached top-k teacher
# ---------------------------------------------------------------------------------------------


def test_gather_order_matches_response_token_probs(gen):
    labels = make_labels([3, 0, 5], [1, 2, 1], 9, True, gen)
    logits = torch.randn(3, 9, VOCAB, generator=gen)
    packed = gather_response_positions(logits, labels)
    targets = torch.cat([row[row != IGNORE] for row in labels[:, 1:]])  # row by row, left to right
    from_packed = torch.softmax(packed, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    probs, mask = response_token_probs(logits, labels)
    assert packed.shape == (8, VOCAB)
    assert torch.allclose(from_packed, probs[mask], atol=1e-6)  # probs[mask] is row-major too


def test_topk_with_full_support_is_exact(gen):
    labels = make_labels([3, 2], [1, 3], 8, False, gen)
    student = torch.randn(2, 8, VOCAB, generator=gen) * 2
    teacher = torch.randn(2, 8, VOCAB, generator=gen) * 2
    temps = torch.tensor([1.0, 2.7])
    logprobs, indices = topk_teacher_cache(teacher, labels, VOCAB)
    for reduction in ("sum", "none"):
        exact = kpig_jsd(student, teacher, labels, temps, reduction=reduction)
        approx = kpig_jsd_topk(student, logprobs, indices, labels, temps, reduction=reduction)
        assert torch.allclose(approx, exact, atol=1e-6)


def test_topk_rejects_misaligned_cache(gen):
    labels = make_labels([3, 2], [1, 3], 8, False, gen)
    logits = torch.randn(2, 8, VOCAB, generator=gen)
    logprobs, indices = topk_teacher_cache(logits, labels, 4)
    with pytest.raises(ValueError, match="N = 5"):
        kpig_jsd_topk(logits, logprobs[:-1], indices[:-1], labels, 1.0)


# Measured on this setting (seed 0): |relative error of the batch-mean JSD| and mean
# per-token absolute error (bits), at T = 1.0 / T = 2.0:
#   k = 8:  relative 0.196 / 0.222, per token 0.028 / 0.017 (max per token 0.10 / 0.05)
#   k = 64: relative 0.055 / 0.077, per token 0.0079 / 0.0067 (max per token 0.028 / 0.021)
# Seeds 1-4 stay within relative 0.21 (k=8) / 0.062 (k=64) and per token 0.031 / 0.008.
# The approximation underestimates: mass outside the teacher's top-k is ignored.
TOPK_TOLERANCE = {8: (0.30, 0.045), 64: (0.10, 0.012)}


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_topk_approximation_error(temperature):
    """Random peaked teacher: Zipf-like logits (-1.5 * log rank, random ranks) plus noise,
    V = 4096; student = teacher + N(0, 1) noise on every logit."""
    gen = torch.Generator().manual_seed(0)
    batch, length, vocab = 4, 33, 4096
    labels = torch.randint(0, vocab, (batch, length), generator=gen)
    labels[:, :5] = IGNORE
    ranks = torch.argsort(torch.rand(batch, length, vocab, generator=gen), -1).float() + 1
    teacher = -1.5 * torch.log(ranks) + 0.5 * torch.randn(batch, length, vocab, generator=gen)
    student = teacher + torch.randn(batch, length, vocab, generator=gen)
    exact = kpig_jsd(student, teacher, labels, temperature, reduction="none")
    is_response = labels[:, 1:] != IGNORE
    errors = {}
    for k, (rel_tol, token_tol) in TOPK_TOLERANCE.items():
        logprobs, indices = topk_teacher_cache(teacher, labels, k)
        approx = kpig_jsd_topk(student, logprobs, indices, labels, temperature, reduction="none")
        mean_exact, mean_approx = exact[is_response].mean(), approx[is_response].mean()
        relative = ((mean_approx - mean_exact).abs() / mean_exact).item()
        per_token = (approx - exact)[is_response].abs().mean().item()
        errors[k] = per_token
        assert relative <= rel_tol, (k, relative)
        assert per_token <= token_tol, (k, per_token)
        # The mean reduction agrees with the per-token values.
        assert kpig_jsd_topk(student, logprobs, indices, labels, temperature).item() == pytest.approx(
            mean_approx.item(), rel=1e-5
        )
    assert errors[64] < errors[8]


# ---------------------------------------------------------------------------------------------
# Cross entropy == transformers' ForCausalLMLoss
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_items", [None, 13, "tensor"])
def test_cross_entropy_matches_transformers(gen, dtype, num_items):
    loss_utils = pytest.importorskip("transformers.loss.loss_utils")
    labels = make_labels([1, 1, 5, 6], [2, 3, 1, 2], 10, True, gen)
    logits = (torch.randn(4, 10, VOCAB, generator=gen) * 3).to(dtype)
    if num_items == "tensor":
        num_items = torch.tensor(29)
    ours = cross_entropy_loss(logits, labels, num_items_in_batch=num_items)
    theirs = loss_utils.ForCausalLMLoss(logits, labels, vocab_size=VOCAB, num_items_in_batch=num_items)
    assert ours.dtype == theirs.dtype == torch.float32
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-6)


# ---------------------------------------------------------------------------------------------
# Argument validation
# ---------------------------------------------------------------------------------------------


def test_argument_errors(gen):
    labels = make_labels([2, 2], [1, 1], 5, False, gen)
    logits = torch.randn(2, 5, VOCAB, generator=gen)
    with pytest.raises(ValueError, match="reduction"):
        kpig_jsd(logits, logits, labels, 1.0, reduction="avg")
    with pytest.raises(ValueError, match="num_items_in_batch"):
        kpig_jsd(logits, logits, labels, 1.0, reduction="none", num_items_in_batch=4)
    with pytest.raises(ValueError, match="temperature"):
        kpig_jsd(logits, logits, labels, torch.ones(3))
    with pytest.raises(ValueError, match="temperature"):
        kpig_jsd(logits, logits, labels, 0.0)
    with pytest.raises(ValueError, match="log_base"):
        kpig_jsd(logits, logits, labels, 1.0, log_base=1.0)
    with pytest.raises(ValueError, match="shape"):
        kpig_jsd(logits, logits[:, :4], labels, 1.0)
    with pytest.raises(ValueError, match="labels"):
        cross_entropy_loss(logits, labels[:, :4])
