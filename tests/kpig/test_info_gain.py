"""Tests for kpig_trainer.kpig.info_gain (equations 1, 2, 3 and 5 of arXiv 2403.10056)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

import kpig_trainer.kpig.info_gain as info_gain_module
from kpig_trainer.kpig.info_gain import (
    ig_temperature,
    info_score,
    information_gain,
    information_gain_from_logits,
    response_token_probs,
)

IGNORE = -100
VOCAB = 11


# ---------------------------------------------------------------------------------------------
# Naive references: plain Python floats, one token at a time. Independent of the code under
# test (no torch ops beyond .tolist()).
# ---------------------------------------------------------------------------------------------


def ref_response_probs(logits: torch.Tensor, labels: torch.Tensor) -> list[list[float]]:
    """Per row, p(t_k) of each response token in order (equation 3), in float64."""
    rows_logits, rows_labels = logits.double().tolist(), labels.tolist()
    out = []
    for row_logits, row_labels in zip(rows_logits, rows_labels):
        probs = []
        for t in range(1, len(row_labels)):
            if row_labels[t] == IGNORE:
                continue
            scores = row_logits[t - 1]  # logits at t-1 predict the label at t
            top = max(scores)
            log_z = top + math.log(sum(math.exp(s - top) for s in scores))
            probs.append(math.exp(scores[row_labels[t]] - log_z))
        out.append(probs)
    return out


def ref_info(logits: torch.Tensor, labels: torch.Tensor, alpha: float) -> list[float]:
    """Info(y|x) = sum_{k>=1} alpha**k p(t_k) (equation 2)."""
    return [sum(alpha ** (k + 1) * p for k, p in enumerate(row)) for row in ref_response_probs(logits, labels)]


# ---------------------------------------------------------------------------------------------
# Batch building: twins share response tokens but differ in prompt length and padding side.
# ---------------------------------------------------------------------------------------------


def make_rows(responses, prompt_lens, length, left_pad, gen):
    """input_ids, attention_mask, labels for rows ``prompt + response`` padded to ``length``."""
    batch = len(responses)
    input_ids = torch.zeros(batch, length, dtype=torch.long)
    attention = torch.zeros(batch, length, dtype=torch.long)
    labels = torch.full((batch, length), IGNORE)
    for b, (resp, plen) in enumerate(zip(responses, prompt_lens)):
        n = plen + len(resp)
        start = length - n if left_pad else 0
        prompt = torch.randint(1, VOCAB, (plen,), generator=gen)
        input_ids[b, start : start + n] = torch.cat([prompt, torch.tensor(resp, dtype=torch.long)])
        attention[b, start : start + n] = 1
        labels[b, start + plen : start + n] = torch.tensor(resp, dtype=torch.long)
    return input_ids, attention, labels


RESPONSES = [[3, 1, 4, 1, 5], [9, 2], [], [6, 5, 3, 5, 8, 9, 7]]


def twin_batch(gen, full_left_pad=True, masked_left_pad=False):
    full = make_rows(RESPONSES, [4, 2, 3, 1], 12, full_left_pad, gen)
    masked = make_rows(RESPONSES, [1, 3, 2, 2], 10, masked_left_pad, gen)
    return full, masked


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


# ---------------------------------------------------------------------------------------------
# response_token_probs / info_score
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("left_pad", [False, True])
def test_response_token_probs_left_aligned(gen, left_pad):
    _, _, labels = make_rows(RESPONSES, [4, 2, 3, 1], 12, left_pad, gen)
    logits = torch.randn(4, 12, VOCAB, generator=gen) * 3
    probs, mask = response_token_probs(logits, labels)
    expected = ref_response_probs(logits, labels)
    assert probs.dtype == torch.float32 and mask.dtype == torch.bool
    assert probs.shape == mask.shape == (4, max(len(r) for r in RESPONSES))
    for b, row in enumerate(expected):
        assert mask[b].tolist() == [k < len(row) for k in range(probs.shape[1])]
        assert probs[b, : len(row)].tolist() == pytest.approx(row, rel=1e-5)
        assert (probs[b, len(row) :] == 0).all()


def test_response_token_probs_no_response_at_all():
    probs, mask = response_token_probs(torch.randn(2, 5, VOCAB), torch.full((2, 5), IGNORE))
    assert probs.shape == mask.shape == (2, 0)


def test_info_score_hand_computed():
    # Uniform logits over 4 entries: p = 1/4 for every token. K = 3, alpha = 0.5:
    # 0.25 * (0.5 + 0.25 + 0.125) = 0.21875.
    logits = torch.zeros(1, 6, 4)
    labels = torch.tensor([[IGNORE, IGNORE, IGNORE, 1, 2, 3]])
    assert info_score(logits, labels, 0.5).item() == pytest.approx(0.21875, rel=1e-6)
    # First response token certain (p = 1), nothing else: Info = alpha.
    logits = torch.full((1, 3, 4), -1e4)
    logits[0, 0, 2] = 1e4
    labels = torch.tensor([[IGNORE, 2, IGNORE]])
    assert info_score(logits, labels, 0.3).item() == pytest.approx(0.3, rel=1e-6)


@pytest.mark.parametrize("alpha", [0.05, 0.3, 0.6, 1.0])
@pytest.mark.parametrize("left_pad", [False, True])
def test_info_score_matches_reference(gen, alpha, left_pad):
    _, _, labels = make_rows(RESPONSES, [4, 2, 3, 1], 12, left_pad, gen)
    logits = torch.randn(4, 12, VOCAB, generator=gen) * 2
    scores = info_score(logits, labels, alpha)
    assert scores.dtype == torch.float32 and scores.shape == (4,)
    assert scores.tolist() == pytest.approx(ref_info(logits, labels, alpha), rel=1e-5, abs=1e-7)
    assert scores[2].item() == 0.0  # row without response


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_info_score_half_precision(gen, dtype):
    _, _, labels = make_rows(RESPONSES, [4, 2, 3, 1], 12, True, gen)
    logits = (torch.randn(4, 12, VOCAB, generator=gen) * 4).to(dtype)
    scores = info_score(logits, labels, 0.6)
    assert scores.dtype == torch.float32
    # Reference from the same half logits, upcast: only the softmax precision is at stake.
    assert scores.tolist() == pytest.approx(ref_info(logits.double(), labels, 0.6), rel=1e-5, abs=1e-7)
    probs, _ = response_token_probs(logits, labels)
    assert probs.dtype == torch.float32


def test_chunked_logsumexp_matches(gen, monkeypatch):
    _, _, labels = make_rows(RESPONSES, [4, 2, 3, 1], 12, False, gen)
    logits = torch.randn(4, 12, VOCAB, generator=gen)
    whole = info_score(logits, labels, 0.6)
    monkeypatch.setattr(info_gain_module, "_CHUNK_ELEMENTS", 3 * VOCAB)  # 3 tokens per chunk
    assert torch.allclose(info_score(logits, labels, 0.6), whole, rtol=1e-6, atol=0)


def test_info_score_long_response_small_alpha_is_finite():
    labels = torch.full((1, 2001), 1)
    labels[0, 0] = IGNORE
    scores = info_score(torch.zeros(1, 2001, 3), labels, 0.05)
    # Geometric series: (1/3) * 0.05 / (1 - 0.05).
    assert scores.item() == pytest.approx(0.05 / 0.95 / 3, rel=1e-5)


# ---------------------------------------------------------------------------------------------
# Information gain from logits
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pads", [(True, False), (False, True), (False, False), (True, True)])
def test_information_gain_matches_reference(gen, pads):
    (_, _, full_labels), (_, _, masked_labels) = twin_batch(gen, *pads)
    full_logits = torch.randn(4, 12, VOCAB, generator=gen) * 2
    masked_logits = torch.randn(4, 10, VOCAB, generator=gen) * 2
    ig = information_gain_from_logits(full_logits, full_labels, masked_logits, masked_labels, 0.3)
    expected = [
        f - m for f, m in zip(ref_info(full_logits, full_labels, 0.3), ref_info(masked_logits, masked_labels, 0.3))
    ]
    assert ig.dtype == torch.float32
    assert ig.tolist() == pytest.approx(expected, rel=1e-5, abs=1e-7)


def test_information_gain_zero_when_response_predictions_agree(gen):
    """Same predictive distributions on the response, different offsets: IG must be 0."""
    (_, _, full_labels), (_, _, masked_labels) = twin_batch(gen)
    full_logits = torch.randn(4, 12, VOCAB, generator=gen)
    masked_logits = torch.randn(4, 10, VOCAB, generator=gen)
    for b in range(4):  # copy, response token by response token, the predicting logits
        f_pos = (full_labels[b, 1:] != IGNORE).nonzero().flatten()
        m_pos = (masked_labels[b, 1:] != IGNORE).nonzero().flatten()
        masked_logits[b, m_pos] = full_logits[b, f_pos]
    ig = information_gain_from_logits(full_logits, full_labels, masked_logits, masked_labels, 1.0)
    assert torch.allclose(ig, torch.zeros(4), atol=1e-7)
    # Premise: the responses sit at different positions, so reading the full twin's logits
    # at the masked twin's response positions (alignment by position) gives another Info.
    by_position = ref_info(full_logits[:, :10], masked_labels, 1.0)
    assert by_position != pytest.approx(ref_info(full_logits, full_labels, 1.0), rel=1e-3)


def test_information_gain_rejects_misaligned_twins(gen):
    (_, _, full_labels), (_, _, masked_labels) = twin_batch(gen)
    logits_f, logits_m = torch.randn(4, 12, VOCAB), torch.randn(4, 10, VOCAB)
    truncated = masked_labels.clone()
    truncated[0, (truncated[0] != IGNORE).nonzero().flatten()[-1]] = IGNORE
    with pytest.raises(ValueError, match="rows \\[0\\]"):
        information_gain_from_logits(logits_f, full_labels, logits_m, truncated, 0.5)
    swapped = masked_labels.clone()
    swapped[3, (swapped[3] != IGNORE).nonzero().flatten()[0]] = 10
    with pytest.raises(ValueError, match="rows \\[3\\]"):
        information_gain_from_logits(logits_f, full_labels, logits_m, swapped, 0.5)


# ---------------------------------------------------------------------------------------------
# Information gain of a model on a collated batch
# ---------------------------------------------------------------------------------------------


class ToyCausalLM(torch.nn.Module):
    """Causal by construction (prefix means); padding-aware; has dropout to test eval mode."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, 8)
        self.drop = torch.nn.Dropout(0.5)
        self.head = torch.nn.Linear(8, VOCAB)

    def forward(self, input_ids, attention_mask):
        h = self.embed(input_ids) * attention_mask.unsqueeze(-1)
        prefix_mean = h.cumsum(1) / attention_mask.cumsum(1).clamp(min=1).unsqueeze(-1)
        return SimpleNamespace(logits=self.head(self.drop(torch.tanh(prefix_mean))) * 3)


def collated(full, masked):
    keys = ("input_ids", "attention_mask", "labels")
    batch = dict(zip(keys, full))
    batch.update({f"masked_{k}": v for k, v in zip(keys, masked)})
    batch["unused_key"] = "ignored"
    return batch


def _reference_ig_for_model(model, full, masked, alpha):
    model.eval()
    with torch.no_grad():
        f = ref_info(model(full[0], full[1]).logits, full[2], alpha)
        m = ref_info(model(masked[0], masked[1]).logits, masked[2], alpha)
    return [a - b for a, b in zip(f, m)]


@pytest.mark.parametrize("fuse", [True, False])
@pytest.mark.parametrize("pads", [(True, False), (False, True)])
def test_information_gain_model(gen, fuse, pads):
    torch.manual_seed(0)
    model = ToyCausalLM()
    full, masked = twin_batch(gen, *pads)
    expected = _reference_ig_for_model(model, full, masked, 0.6)
    model.train()
    ig = information_gain(model, collated(full, masked), 0.6, fuse_twins=fuse)
    assert model.training  # mode restored
    assert not ig.requires_grad and ig.dtype == torch.float32
    assert ig.tolist() == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert ig[2].item() == 0.0


def test_information_gain_tiny_hf_model(gen):
    """Fusing twins (right-padding the shorter side) must not change a real HF model's IG."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = transformers.LlamaForCausalLM(config)
    full, masked = twin_batch(gen, False, False)
    batch = collated(full, masked)
    fused = information_gain(model, batch, 0.6, fuse_twins=True)
    separate = information_gain(model, batch, 0.6, fuse_twins=False)
    assert torch.allclose(fused, separate, atol=1e-6)
    assert separate.tolist() == pytest.approx(_reference_ig_for_model(model, full, masked, 0.6), rel=1e-5, abs=1e-6)


# ---------------------------------------------------------------------------------------------
# Temperature (equation 5)
# ---------------------------------------------------------------------------------------------


def test_ig_temperature_paper_formula():
    ig = torch.tensor([-0.5, 0.0, 0.3, 1.0, 2.5])
    assert ig_temperature(ig).tolist() == pytest.approx([2.5, 2.0, 1.7, 1.0, 1.0])
    assert ig_temperature(ig).dtype == torch.float32
    assert ig_temperature(0.25).item() == pytest.approx(1.75)


def test_ig_temperature_clamps():
    ig = torch.tensor([-3.0, 0.5, 1.0])
    assert ig_temperature(ig, max_temperature=2.0).tolist() == pytest.approx([2.0, 1.5, 1.0])
    assert ig_temperature(ig, min_temperature=1.2).tolist() == pytest.approx([5.0, 1.5, 1.2])
    assert ig_temperature(ig, max_ig=0.5).tolist() == pytest.approx([5.0, 1.5, 1.5])
    with pytest.raises(ValueError):
        ig_temperature(ig, max_ig=2.0)
    with pytest.raises(ValueError):
        ig_temperature(ig, min_temperature=2.0, max_temperature=1.0)


def test_ig_temperature_detached():
    ig = torch.tensor([0.2], requires_grad=True)
    assert not ig_temperature(ig).requires_grad


def test_shared_prefix_equals_full_forwards(tiny_model_and_tokenizer):
    """Instances of one task share the instruction: running it once (key/value cache repeated for
    every row) must give the IG of plain forwards, and of each instance alone."""
    from kpig_trainer.data.records import Instance
    from kpig_trainer.kpig.collator import KPIGDataCollator
    from kpig_trainer.kpig.twins import MIN_SHARED_PREFIX, Twin, common_prefix_length

    model, tokenizer = tiny_model_and_tokenizer
    instruction = (
        "Read the short review below and decide how the writer feels about the product. "
        "Answer with positive or negative only, in lower case."
    )
    inputs = [
        "great",
        "it broke after two days and support never answered",
        "fine I guess",
        "the best purchase of the year, my whole family uses it",
    ]
    instances = [
        Instance(
            id=f"i{k}",
            task="t",
            instruction=instruction,
            input=text,
            outputs=["positive" if k % 2 == 0 else "negative"],
            key_parts=["positive or negative"],
        )
        for k, text in enumerate(inputs)
    ]
    batch = KPIGDataCollator(tokenizer, max_length=256)(instances)
    twin = Twin.from_tensors(batch["input_ids"], batch["attention_mask"], batch["labels"], response_only=True)
    assert common_prefix_length(twin) >= MIN_SHARED_PREFIX  # the premise: a long shared prefix

    calls = []
    original = model.forward

    def recording(*args, **kwargs):
        calls.append(tuple(kwargs["input_ids"].shape))
        return original(*args, **kwargs)

    model.forward = recording
    try:
        shared = information_gain(model, batch, 0.3, share_prefix=True)
    finally:
        del model.forward
    assert calls[0][0] == 1 and calls[1][0] == len(instances)  # prefix once, then every row's rest
    plain = information_gain(model, batch, 0.3, share_prefix=False)
    alone = [information_gain(model, KPIGDataCollator(tokenizer, max_length=256)([i]), 0.3).item() for i in instances]
    assert shared.tolist() == pytest.approx(plain.tolist(), abs=1e-6)
    assert shared.tolist() == pytest.approx(alone, abs=1e-6)
    assert len(set(shared.tolist())) == len(instances)  # the rows really differ
