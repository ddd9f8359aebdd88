"""Port a trained PyTorch conv net to Flax NNX: conv and linear weights by hand, batch norms with normkit.

A small CNN (conv -> BatchNorm2d -> relu, twice, global average pool, linear) is trained for a few SGD
steps on random data in PyTorch (CPU), then rebuilt in Flax NNX, channels-last, with
``normkit_flax.BatchNorm``. The conv kernels and the linear matrix are transposed by hand below (the
part every port writes itself); the batch norms, whose conventions differ (momentum 0.1 = weight of
the new batch in torch, 0.9 = weight of the old value in Flax; unbiased vs biased variance update;
feature axis 1 vs -1), are copied by ``normkit_flax.copy_norm_states``. Printed: the largest difference
of the Flax logits from torch's (float32), the argmax agreement, the translated momentum, and whether
Flax -> torch gives the normalization states back bit for bit.

    python examples/port_torch_to_flax.py [--json]
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np


def build_torch(torch):
    """conv(3->8) BN relu, conv(8->16) BN relu, global average pool, linear(16->4): torch.nn's own layers."""
    nn = torch.nn
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4),
    )


def build_flax(nnx, normkit_flax):
    """The same network, channels-last (NHWC), with normkit_flax.BatchNorm at Flax's default arguments."""
    rngs = nnx.Rngs(0)
    pad = ((1, 1), (1, 1))
    return nnx.Sequential(
        nnx.Conv(3, 8, (3, 3), padding=pad, rngs=rngs), normkit_flax.BatchNorm(8, rngs=rngs), nnx.relu,
        nnx.Conv(8, 16, (3, 3), padding=pad, rngs=rngs), normkit_flax.BatchNorm(16, rngs=rngs), nnx.relu,
        lambda h: h.mean(axis=(1, 2)), nnx.Linear(16, 4, rngs=rngs),
    )


def train_torch(torch, model, steps: int = 10):
    """A few SGD steps on random images (offset from 0, so the running means matter) and random labels."""
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.train()
    for _ in range(steps):
        x = torch.randn(16, 3, 8, 8, generator=g) * 2 + 1
        y = torch.randint(0, 4, (16,), generator=g)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


def port_weights(torch_model, flax_model) -> None:
    """Conv and linear weights, transposed by hand: the layers normkit does not know about."""
    import jax.numpy as jnp

    t = {name: p.detach().numpy() for name, p in torch_model.named_parameters()}
    conv1, conv2, linear = flax_model.layers[0], flax_model.layers[3], flax_model.layers[7]
    for conv, i in ((conv1, 0), (conv2, 3)):  # Conv2d weight (out, in, kh, kw) -> nnx.Conv kernel (kh, kw, in, out)
        conv.kernel[...] = jnp.asarray(t[f"{i}.weight"].transpose(2, 3, 1, 0))
        conv.bias[...] = jnp.asarray(t[f"{i}.bias"])
    linear.kernel[...] = jnp.asarray(t["8.weight"].T)  # Linear weight (out, in) -> nnx.Linear kernel (in, out)
    linear.bias[...] = jnp.asarray(t["8.bias"])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the results as one JSON object")
    args = parser.parse_args(argv)

    import jax.numpy as jnp
    import torch
    from flax import nnx

    import normkit_flax
    import normkit_torch

    torch.manual_seed(0)
    torch_model = train_torch(torch, build_torch(torch))
    flax_model = build_flax(nnx, normkit_flax)
    port_weights(torch_model, flax_model)
    report = normkit_flax.copy_norm_states(torch_model, flax_model)  # BatchNorm2d -> BatchNorm, in order
    flax_model.eval()

    x = torch.randn(32, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 + 1
    with torch.no_grad():
        want = torch_model(x).numpy()
    got = np.asarray(flax_model(jnp.asarray(x.numpy().transpose(0, 2, 3, 1))))

    back = build_torch(torch)  # Flax -> torch: the states come back bit for bit
    normkit_torch.copy_norm_states(flax_model, back)
    pairs = [(a, b) for a, b in zip(torch_model.modules(), back.modules()) if isinstance(a, torch.nn.BatchNorm2d)]
    exact = all(torch.equal(getattr(a, k), getattr(b, k)) for a, b in pairs
                for k in ("weight", "bias", "running_mean", "running_var"))
    result = {
        "copied": [list(p) for p in report.copied],
        "max_abs_diff": float(np.max(np.abs(got - want))),
        "argmax_agreement": float(np.mean(got.argmax(1) == want.argmax(1))),
        "flax_momentum": [float(flax_model.layers[i].momentum) for i in (1, 4)],
        "torch_momentum": [float(m.momentum) for m, _ in pairs],
        "round_trip_exact": bool(exact),
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(f"copied {len(report.copied)} batch norms: {report.copied}")
        print(f"Flax vs torch logits: max abs difference {result['max_abs_diff']:.2e}, "
              f"argmax agreement {result['argmax_agreement']:.0%}")
        print(f"momentum: torch {result['torch_momentum']} -> Flax {result['flax_momentum']} (weight of the old value)")
        print(f"Flax -> torch gives the states back bit for bit: {result['round_trip_exact']}")
    return result


if __name__ == "__main__":
    r = main()
    sys.exit(0 if r["max_abs_diff"] < 1e-5 and r["round_trip_exact"] else 1)
