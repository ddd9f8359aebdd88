"""A small conv net trained with normkit modules follows its torch.nn twin step by step (float64), under both policies."""

from __future__ import annotations

import torch
from torch import nn

import normkit_torch as nkt
from conftest import F64, assert_state_equal


def conv_net(lib) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), lib.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 8, 3, padding=1), lib.BatchNorm2d(8), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 6 * 6, 5),
    ).to(F64)


def _train(model: nn.Module, batches) -> list[float]:
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for x, y in batches:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_sgd_loss_curve_follows_torch(policy):
    torch.manual_seed(0)
    theirs = conv_net(nn)
    ours = conv_net(nkt)
    ours.load_state_dict(theirs.state_dict(), strict=True)  # the same initialization
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 3, 6, 6, generator=gen, dtype=F64), torch.randint(0, 5, (8,), generator=gen))
               for _ in range(30)]
    ours_losses, their_losses = _train(ours, batches), _train(theirs, batches)
    assert their_losses[-1] < their_losses[0]  # it learns something: the comparison is not vacuous
    torch.testing.assert_close(torch.tensor(ours_losses), torch.tensor(their_losses), rtol=1e-9, atol=0)
    assert_state_equal(ours, theirs, rtol=1e-8, atol=1e-10)
    ours.eval(), theirs.eval()
    x = batches[0][0]
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-8, atol=1e-10)
