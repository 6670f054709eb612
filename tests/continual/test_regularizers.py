"""L2 and EWC penalties against hand computation; the Fisher against per-batch gradients."""

import copy

import pytest
import torch
from torch import nn

from kpig_trainer.continual.regularizers import ParameterAnchor, estimate_fisher, merge_fisher


def tiny_net():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 1))
    net[1].bias.requires_grad_(False)  # frozen parameters are not anchored
    return net


def test_l2_penalty_is_weight_times_squared_distance():
    net = tiny_net()
    anchor = ParameterAnchor(net, weight=0.5)
    assert anchor.penalty(net).item() == 0.0
    with torch.no_grad():
        net[0].weight.add_(0.1)  # 6 entries moved by 0.1
        net[1].bias.add_(5.0)  # frozen: ignored
    assert anchor.penalty(net).item() == pytest.approx(0.5 * 6 * 0.01)


def test_ewc_penalty_weighs_by_importance_and_has_the_right_gradient():
    net = tiny_net()
    importance = {n: torch.full_like(p, 2.0) for n, p in net.named_parameters() if p.requires_grad}
    importance["0.bias"] = torch.tensor([0.0, 4.0])
    anchor = ParameterAnchor(net, weight=3.0, importance=importance)
    with torch.no_grad():
        net[0].bias.add_(torch.tensor([1.0, 0.5]))
    penalty = anchor.penalty(net)
    assert penalty.item() == pytest.approx(3.0 / 2 * (0.0 * 1.0 + 4.0 * 0.25))
    penalty.backward()
    # d/dθ [w/2 F (θ-θ*)^2] = w F (θ-θ*)
    assert net[0].bias.grad.tolist() == pytest.approx([0.0, 3.0 * 4.0 * 0.5])


def test_anchor_rejects_bad_input_and_round_trips():
    net = tiny_net()
    with pytest.raises(ValueError, match=">= 0"):
        ParameterAnchor(net, weight=-1)
    with pytest.raises(ValueError, match="importance lacks"):
        ParameterAnchor(net, weight=1, importance={})
    anchor = ParameterAnchor(net, weight=1.0)
    moved = copy.deepcopy(net)
    with torch.no_grad():
        moved[0].weight.mul_(2)
    restored = ParameterAnchor.from_state_dict(anchor.state_dict())
    assert restored.penalty(moved).item() == pytest.approx(anchor.penalty(moved).item())


class Regressor(nn.Module):
    """A 'model' with the causal-LM call signature: its loss is a squared error."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([1.0, -2.0]))

    def forward(self, input_ids, attention_mask, labels, use_cache=False):
        loss = ((input_ids.float() @ self.w - labels.float()) ** 2).mean()
        return type("Out", (), {"loss": loss})()


def test_fisher_is_the_mean_squared_gradient():
    model = Regressor()
    batches = [
        {"input_ids": torch.tensor([[1, 0]]), "attention_mask": torch.ones(1, 2), "labels": torch.tensor([0])},
        {"input_ids": torch.tensor([[0, 2]]), "attention_mask": torch.ones(1, 2), "labels": torch.tensor([1])},
    ]
    fisher = estimate_fisher(model, batches)
    # batch 1: r = 1 - 0 = 1, grad = 2 r x = [2, 0]; batch 2: r = -4 - 1 = -5, grad = [0, -20]
    assert fisher["w"].tolist() == pytest.approx([(4 + 0) / 2, (0 + 400) / 2])
    assert model.w.grad is None
    assert estimate_fisher(model, batches, max_batches=1)["w"].tolist() == pytest.approx([4.0, 0.0])
    with pytest.raises(ValueError, match="no batch"):
        estimate_fisher(model, [])


def test_online_fisher_merge():
    old = {"w": torch.tensor([1.0, 2.0])}
    new = {"w": torch.tensor([0.5, 0.5])}
    assert merge_fisher(None, new)["w"].tolist() == [0.5, 0.5]
    assert merge_fisher(old, new, decay=0.5)["w"].tolist() == [1.0, 1.5]
