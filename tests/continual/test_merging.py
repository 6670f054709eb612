"""Task arithmetic, DARE and LM-Cocktail merging against hand computation and DARE's definition."""

from __future__ import annotations

import math
from collections.abc import Mapping

import pytest
import torch

from kpig_trainer.continual.merging import (
    example_losses,
    lm_cocktail_weights,
    merge_models,
    merge_state_dicts,
    uniform_weights,
)
from kpig_trainer.testing import tiny_llama


def random_states(n_models: int, seed: int = 0) -> tuple[dict, list[dict]]:
    g = torch.Generator().manual_seed(seed)
    shapes = {"a.weight": (6, 5), "a.bias": (6,), "b.weight": (3, 6)}
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    finetuned = [{k: v + torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(n_models)]
    return base, finetuned


class LoggedState(Mapping):
    """A state dict that records every tensor read, like one loading lazily from disk."""

    def __init__(self, tag, state, log):
        self.tag, self.state, self.log = tag, state, log

    def __getitem__(self, name):
        self.log.append((self.tag, name))
        return self.state[name]

    def __iter__(self):
        return iter(self.state)

    def __len__(self):
        return len(self.state)


# --- task arithmetic ---------------------------------------------------------------------------


def test_task_arithmetic_on_a_hand_computed_2x2_example():
    base = {"w": torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "ids": torch.tensor([0, 1, 2])}
    ft0 = {"w": torch.tensor([[2.0, 2.0], [3.0, 0.0]]), "ids": torch.tensor([5, 6, 7])}  # delta [[1,0],[0,-4]]
    ft1 = {"w": torch.tensor([[1.0, 4.0], [0.0, 4.0]]), "ids": torch.tensor([8, 9, 9])}  # delta [[0,2],[-3,0]]
    merged = merge_state_dicts(base, [ft0, ft1], [0.5, 0.25])
    # [[1,2],[3,4]] + 0.5 * [[1,0],[0,-4]] + 0.25 * [[0,2],[-3,0]]
    assert merged["w"].tolist() == [[1.5, 2.5], [2.25, 2.0]]
    assert merged["ids"].tolist() == [0, 1, 2]  # integer buffers come from the base
    assert list(merged) == ["w", "ids"]


def test_low_precision_weights_are_merged_in_float32_and_keep_their_dtype():
    base = {"w": torch.tensor([1.0], dtype=torch.bfloat16)}
    ft = {"w": torch.tensor([1.0 + 2**-7], dtype=torch.bfloat16)}  # the next bfloat16 after 1
    merged = merge_state_dicts(base, [ft, ft], [0.5, 0.5])
    assert merged["w"].dtype == torch.bfloat16
    # 1 + 2^-8 + 2^-8: each half step would round back to 1 in bfloat16, not in float32
    assert merged["w"].item() == 1.0 + 2**-7


def test_merge_streams_one_parameter_at_a_time():
    base, finetuned = random_states(2)
    log = []
    merged = merge_state_dicts(
        LoggedState("base", base, log), [LoggedState(i, s, log) for i, s in enumerate(finetuned)], [0.3, 0.7]
    )
    assert log == [(tag, name) for name in base for tag in ("base", 0, 1)]
    expected = merge_state_dicts(base, finetuned, [0.3, 0.7])
    assert all(torch.equal(merged[k], expected[k]) for k in base)


# --- DARE --------------------------------------------------------------------------------------


def test_dare_with_density_one_is_task_arithmetic():
    base, finetuned = random_states(3)
    weights = [0.2, -0.5, 1.3]
    plain = merge_state_dicts(base, finetuned, weights)
    dare = merge_state_dicts(base, finetuned, weights, method="dare", density=1.0, seed=7)
    assert all(torch.equal(plain[k], dare[k]) for k in base)


def test_dare_drops_the_expected_share_and_keeps_the_delta_in_expectation():
    g = torch.Generator().manual_seed(1)
    base = {"w": torch.randn(200, 500, generator=g)}
    delta = torch.randn(200, 500, generator=g)
    ft = {"w": base["w"] + delta}
    delta = ft["w"] - base["w"]  # the delta as the merge sees it (after float32 rounding)
    density = 0.3

    merged = merge_state_dicts(base, [ft], [1.0], method="dare", density=density, seed=3)["w"] - base["w"]
    dropped = merged == 0
    assert dropped.float().mean().item() == pytest.approx(1 - density, abs=0.02)
    # kept entries are rescaled by 1 / density, so the expected merged delta is the delta itself
    torch.testing.assert_close(merged[~dropped], delta[~dropped] / density, rtol=1e-4, atol=1e-4)
    assert (merged / delta).mean().item() == pytest.approx(1.0, abs=0.03)
    assert merged.sum().item() == pytest.approx(delta.sum().item(), abs=0.05 * delta.abs().sum().item())

    # without rescaling, the same mask keeps the entries as they are
    unscaled = merge_state_dicts(base, [ft], [1.0], method="dare", density=density, rescale=False, seed=3)["w"]
    unscaled = unscaled - base["w"]
    assert torch.equal(unscaled == 0, dropped)
    torch.testing.assert_close(unscaled[~dropped], delta[~dropped], rtol=1e-5, atol=1e-5)


def test_dare_masks_depend_only_on_seed_parameter_and_model():
    base, finetuned = random_states(2)
    options = {"method": "dare", "density": 0.5}

    torch.manual_seed(1)
    state = torch.get_rng_state()
    first = merge_state_dicts(base, finetuned, [0.5, 0.5], seed=11, **options)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is neither used nor advanced
    torch.manual_seed(2)
    again = merge_state_dicts(base, finetuned, [0.5, 0.5], seed=11, **options)
    assert all(torch.equal(first[k], again[k]) for k in base)

    other = merge_state_dicts(base, finetuned, [0.5, 0.5], seed=12, **options)
    assert not torch.equal(first["a.weight"], other["a.weight"])

    # the order of the parameters, or which other parameters there are, does not matter
    reverse = lambda state: dict(reversed(list(state.items())))  # noqa: E731
    reordered = merge_state_dicts(reverse(base), [reverse(s) for s in finetuned], [0.5, 0.5], seed=11, **options)
    assert list(reordered) == list(reverse(base))
    assert all(torch.equal(first[k], reordered[k]) for k in base)
    only = lambda state: {"b.weight": state["b.weight"]}  # noqa: E731
    alone = merge_state_dicts(only(base), [only(s) for s in finetuned], [0.5, 0.5], seed=11, **options)
    assert torch.equal(alone["b.weight"], first["b.weight"])

    # each model gets its own mask, even for the same delta
    ft = finetuned[0]
    as_first = merge_state_dicts(base, [ft, ft], [1.0, 0.0], seed=11, **options)["a.weight"] - base["a.weight"]
    as_second = merge_state_dicts(base, [ft, ft], [0.0, 1.0], seed=11, **options)["a.weight"] - base["a.weight"]
    assert not torch.equal(as_first == 0, as_second == 0)


# --- errors ------------------------------------------------------------------------------------


def test_mismatched_shapes_and_names_are_named():
    base, (ft,) = random_states(1)
    bad = dict(ft, **{"b.weight": torch.zeros(6, 3)})
    with pytest.raises(ValueError, match=r"'b\.weight'.*\(6, 3\).*model 0.*\(3, 6\)"):
        merge_state_dicts(base, [bad], [1.0])
    with pytest.raises(ValueError, match=r"'b\.weight'"):  # lazily loaded: found when read
        merge_state_dicts(LoggedState("base", base, []), [LoggedState(0, bad, [])], [1.0])
    missing = {k: v for k, v in ft.items() if k != "a.bias"}
    with pytest.raises(ValueError, match=r"model 1 .*missing \['a\.bias'\]"):
        merge_state_dicts(base, [ft, missing], [0.5, 0.5])


@pytest.mark.parametrize(
    "weights, options, message",
    [
        ([1.0, 1.0], {}, "2 weight.*1 fine-tuned model"),
        ([], {}, "0 weight.*1 fine-tuned model"),
        ([math.nan], {}, "finite"),
        ([1.0], {"method": "dare", "density": 0.0}, r"density .*\(0, 1\], got 0\.0"),
        ([1.0], {"method": "dare", "density": 1.5}, r"density .*\(0, 1\], got 1\.5"),
        ([1.0], {"method": "dare", "density": -0.2}, r"density .*\(0, 1\]"),
        ([1.0], {"method": "dare", "density": math.nan}, r"density .*\(0, 1\]"),
        ([1.0], {"density": 0.5}, "only with method='dare'"),
        ([1.0], {"method": "ties"}, "merge method must be one of"),
    ],
)
def test_bad_options_are_refused(weights, options, message):
    base, finetuned = random_states(1)
    with pytest.raises(ValueError, match=message):
        merge_state_dicts(base, finetuned, weights, **options)


def test_no_finetuned_model_is_refused():
    base, _ = random_states(0)
    with pytest.raises(ValueError, match="at least one fine-tuned model"):
        merge_state_dicts(base, [], [])


# --- LM-Cocktail weights -----------------------------------------------------------------------


def test_lm_cocktail_weights_are_a_softmax_of_negative_losses():
    w = lm_cocktail_weights([1.0, 2.0], temperature=5.0)
    # softmax([-0.2, -0.4]) = [1, e^-0.2] / (1 + e^-0.2)
    assert w == pytest.approx([1 / (1 + math.exp(-0.2)), math.exp(-0.2) / (1 + math.exp(-0.2))])
    assert lm_cocktail_weights([1.0, 2.0]) == pytest.approx(w)  # the default temperature is 5

    three = lm_cocktail_weights([2.5, 0.5, 1.5], temperature=1.0)
    assert sum(three) == pytest.approx(1.0)
    assert three[1] > three[2] > three[0]  # lower loss, larger weight
    assert lm_cocktail_weights([2.5, 0.5, 1.5], temperature=1e6) == pytest.approx([1 / 3] * 3, abs=1e-5)
    assert lm_cocktail_weights([1000.0, 1001.0], temperature=0.01) == pytest.approx([1.0, 0.0])  # no overflow


@pytest.mark.parametrize("temperature", [0.0, -1.0, math.inf])
def test_lm_cocktail_temperature_must_be_positive(temperature):
    with pytest.raises(ValueError, match="temperature"):
        lm_cocktail_weights([1.0, 2.0], temperature=temperature)


def test_lm_cocktail_weights_refuse_no_or_bad_losses():
    with pytest.raises(ValueError, match="at least one loss"):
        lm_cocktail_weights([])
    with pytest.raises(ValueError, match="loss 1 is not finite"):
        lm_cocktail_weights([1.0, math.nan])


def test_uniform_weights():
    assert uniform_weights(4) == [0.25] * 4
    with pytest.raises(ValueError, match="at least one model"):
        uniform_weights(0)


# --- models ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def three_models():
    return [tiny_llama(seed=s)[0] for s in range(3)]


def test_merge_models_equals_the_per_parameter_computation(three_models):
    base, ft1, ft2 = three_models
    before = {k: v.clone() for k, v in base.state_dict().items()}
    merged = merge_models(base, [ft1, ft2], [0.6, 0.4])
    assert merged is not base
    s1, s2 = ft1.state_dict(), ft2.state_dict()
    for name, b in before.items():
        expected = b + 0.6 * (s1[name] - b) + 0.4 * (s2[name] - b)
        torch.testing.assert_close(merged.state_dict()[name], expected, rtol=0, atol=1e-6, msg=name)
        assert torch.equal(base.state_dict()[name], b)  # the base is untouched
    assert merged.lm_head.weight is merged.model.embed_tokens.weight  # still tied

    in_place = merge_models(base, [ft1.state_dict(), ft2], [0.6, 0.4], inplace=True)
    assert in_place is base
    assert all(torch.equal(base.state_dict()[k], v) for k, v in merged.state_dict().items())


def test_merge_models_with_dare_keeps_tied_weights_tied(three_models):
    base, ft1, _ = three_models
    merged = merge_models(base, [ft1], [1.0], method="dare", density=0.5, seed=0)
    assert merged.lm_head.weight is merged.model.embed_tokens.weight
    state = merge_state_dicts(base.state_dict(), [ft1.state_dict()], [1.0], method="dare", density=0.5, seed=0)
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(merged.state_dict()[name], state[name])  # the same masks as merge_state_dicts


def test_merge_models_refuses_before_writing(three_models):
    base, ft1, _ = three_models
    before = {k: v.clone() for k, v in base.state_dict().items()}
    bad = dict(ft1.state_dict(), **{"model.norm.weight": torch.zeros(3)})
    with pytest.raises(ValueError, match=r"'model\.norm\.weight'"):
        merge_models(base, [ft1, bad], [0.5, 0.5], inplace=True)
    assert all(torch.equal(base.state_dict()[k], v) for k, v in before.items())


def example_batch(tokenizer, texts):
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    labels[:, :2] = -100  # a prompt part that is not scored
    return {**batch, "labels": labels}


def test_example_losses_is_the_mean_of_the_batch_losses():
    model, tokenizer = tiny_llama(seed=0)
    batches = [
        example_batch(tokenizer, ["The cat sleeps on the mat.", "Paris is the capital of France."]),
        example_batch(tokenizer, ["Answer the question with yes or no."]),
    ]
    with torch.no_grad():
        direct = [model(**b).loss.item() for b in batches]
    model.train()
    assert example_losses(model, batches[:1]) == pytest.approx(direct[0], rel=1e-5)
    assert example_losses(model, batches) == pytest.approx(sum(direct) / 2, rel=1e-5)
    assert example_losses(model, batches, max_batches=1) == pytest.approx(direct[0], rel=1e-5)
    assert model.training  # the mode is restored
    with pytest.raises(ValueError, match="no batch"):
        example_losses(model, [])
    with pytest.raises(ValueError, match="labels"):
        example_losses(model, [{"input_ids": batches[0]["input_ids"]}])
    assert model.training
