"""Port a trained PyTorch conv net to Keras: conv and dense weights by hand, normalization layers with normkit.

A small CNN on scikit-learn's 8x8 digits (conv -> BatchNorm2d -> relu, conv -> GroupNorm -> relu,
max-pool, linear -> LayerNorm -> relu, linear) is trained for a few steps in PyTorch, then rebuilt in
Keras, channels-last. The conv kernels and dense matrices are transposed by hand below (the part every
port writes itself); every normalization layer, whose conventions differ between the frameworks
(eps 1e-5 vs 1e-3, momentum 0.1 vs 0.9, unbiased vs biased running variance, feature axis 1 vs -1),
is copied by ``normkit_keras.copy_norm_states``. Printed: how far the Keras logits are from torch's,
next to torch's own float32 round-off (float32 vs float64 torch), the argmax agreement, and the same
port done the naive way (arrays copied by name, Keras's default epsilon kept).

    python examples/port_torch_to_keras.py [--fast] [--out DIR]
"""

from __future__ import annotations

import numpy as np

import _common


def build_torch(torch):
    """conv(1->16) BN relu, conv(16->32) GN(4) relu, maxpool 2, linear(512->64) LN relu, linear(64->10)."""
    import normkit_torch as nkt

    nn = torch.nn
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nkt.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nkt.GroupNorm(4, 32), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nkt.LayerNorm(64), nn.ReLU(), nn.Linear(64, 10),
    )


def build_keras(keras):
    """The same network, channels-last, with normkit_keras's layers at Keras's default arguments."""
    import normkit_keras as nkk

    L = keras.layers
    return keras.Sequential([
        keras.Input((8, 8, 1)),
        L.Conv2D(16, 3, padding="same"), nkk.BatchNormalization(), L.ReLU(),
        L.Conv2D(32, 3, padding="same"), nkk.GroupNormalization(groups=4), L.ReLU(),
        L.MaxPooling2D(2), L.Flatten(), L.Dense(64), nkk.LayerNormalization(), L.ReLU(), L.Dense(10),
    ])


def port_weights(torch_model, keras_model) -> None:
    """Conv and dense weights, transposed by hand: the layers normkit does not know about."""
    t = {name: p.detach().numpy() for name, p in torch_model.named_parameters()}
    conv1, conv2, dense1, dense2 = [layer for layer in keras_model.layers if layer.weights and not _is_norm(layer)]
    # Conv2d weight (out, in, kh, kw) -> Conv2D kernel (kh, kw, in, out)
    conv1.set_weights([t["0.weight"].transpose(2, 3, 1, 0), t["0.bias"]])
    conv2.set_weights([t["3.weight"].transpose(2, 3, 1, 0), t["3.bias"]])
    # Linear after Flatten: torch flattens (C, H, W), Keras (H, W, C): reorder the 512 inputs, then transpose
    w = t["8.weight"].reshape(64, 32, 4, 4).transpose(2, 3, 1, 0).reshape(4 * 4 * 32, 64)
    dense1.set_weights([w, t["8.bias"]])
    # Linear weight (out, in) -> Dense kernel (in, out)
    dense2.set_weights([t["11.weight"].T, t["11.bias"]])


def _is_norm(layer) -> bool:
    return type(layer).__name__.endswith("Normalization")


def naive_norm_port(torch_model, keras_model) -> None:
    """The usual hand port: weight/bias/running stats copied by name, Keras's epsilon (1e-3) and momentum left alone."""
    norms = [m for m in torch_model if type(m).__name__.endswith("Norm") or type(m).__name__.startswith("BatchNorm")]
    for module, layer in zip(norms, [layer for layer in keras_model.layers if _is_norm(layer)]):
        arrays = [module.weight, module.bias] + ([module.running_mean, module.running_var]
                                                 if getattr(module, "running_mean", None) is not None else [])
        layer.set_weights([a.detach().numpy() for a in arrays])


def train(torch, model, x, y, steps: int, batch: int = 64, lr: float = 0.1) -> list[float]:
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    losses = []
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (batch,), generator=gen)
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def compare(name: str, keras_logits: np.ndarray, torch_logits: np.ndarray) -> dict:
    diff = np.abs(keras_logits.astype(np.float64) - torch_logits)
    agree = float(np.mean(keras_logits.argmax(1) == torch_logits.argmax(1)))
    print(f"{name:<40} max |logit diff| {diff.max():.3g}   argmax agreement {agree:.4f}")
    return {"max_abs_diff": float(diff.max()), "argmax_agreement": agree, "abs_diff": diff.ravel()}


def main(argv=None) -> dict:
    args = _common.parse_args(argv, __doc__.splitlines()[0])
    import keras
    import matplotlib.pyplot as plt
    import torch

    import normkit_keras as nkk
    import normkit_torch as nkt

    _common.torch_threads()
    steps = 40 if args.fast else 400
    images, labels = _common.load_digits_arrays()
    train_idx, test_idx = _common.split(len(images))
    x = torch.from_numpy(images[:, None])  # (N, 1, 8, 8): torch is channels-first
    y = torch.from_numpy(labels)

    _common.heading(f"Train a small CNN in PyTorch ({steps} SGD steps on scikit-learn digits)")
    torch.manual_seed(0)
    model = build_torch(torch)
    losses = train(torch, model, x[train_idx], y[train_idx], steps)
    model.eval()
    with torch.no_grad():
        torch_logits = model(x[test_idx]).numpy()
        exact = build_torch(torch).double().eval()
        exact.load_state_dict(model.state_dict())
        exact_logits = exact(x[test_idx].double()).numpy()  # float64: the trained model's exact answer
    torch_acc = float(np.mean(torch_logits.argmax(1) == labels[test_idx]))
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}; test accuracy {torch_acc:.3f} ({len(test_idx)} images)")

    _common.heading("The normalization layers as normkit.NormState (torch's conventions)")
    for name, s in nkt.norm_states(model).items():
        print(f"  {name:>3} {s.kind:<6} shape {s.shape}  eps {s.eps:g}  momentum {s.momentum}  "
              f"running_var_correction {s.running_var_correction}  num_batches_tracked {s.num_batches_tracked}")

    _common.heading("Port to Keras (channels-last): weights by hand, normalization layers with normkit")
    x_keras = np.ascontiguousarray(images[test_idx][..., None])  # (N, 8, 8, 1)
    ported = build_keras(keras)
    port_weights(model, ported)
    report = nkk.copy_norm_states(model, ported)
    print(report)
    for path, s in nkk.norm_states(ported).items():
        layer = ported.get_layer(path.split("/")[-1])
        print(f"  {path:<40} epsilon {layer.epsilon:g}  momentum (Keras) {getattr(layer, 'momentum', '-')}")
    naive = build_keras(keras)
    port_weights(model, naive)
    naive_norm_port(model, naive)

    def logits(keras_model) -> np.ndarray:
        return np.asarray(keras.ops.convert_to_numpy(keras_model(x_keras, training=False)))

    _common.heading("Keras vs torch logits on the test images")
    results: dict = {"steps": steps, "torch_test_acc": torch_acc, "loss": losses}
    results["torch_float32"] = compare("torch float32 vs float64 (round-off)", torch_logits, exact_logits)
    results["port"] = compare("Keras (normkit port) vs torch", logits(ported), torch_logits)
    results["port_vs_exact"] = compare("Keras (normkit port) vs float64 torch", logits(ported), exact_logits)
    results["naive"] = compare("Keras (naive port, eps 1e-3) vs torch", logits(naive), torch_logits)
    results["keras_test_acc"] = float(np.mean(logits(ported).argmax(1) == labels[test_idx]))

    back = build_torch(torch)
    nkt.copy_norm_states(ported, back)  # and back again: the normalization states return bit for bit
    results["round_trip_exact"] = nkt.norm_states(back) == nkt.norm_states(model)
    print(f"Keras -> torch again: normalization states identical: {results['round_trip_exact']}")

    fig, ax = plt.subplots(figsize=(7, 4))
    bins = np.logspace(-10, 1, 56)
    for key, label in (("torch_float32", "torch float32 vs float64"), ("port", "Keras (normkit port) vs torch"),
                       ("naive", "Keras (naive port) vs torch")):
        ax.hist(np.maximum(results[key]["abs_diff"], 1e-10), bins=bins, histtype="step", lw=1.5, label=label)
    ax.set_xscale("log")
    ax.set_xlabel("|logit difference| per test image and class (equal logits drawn at 1e-10)")
    ax.set_ylabel("count")
    ax.set_title("Ported to Keras: float32 round-off with normkit, eps off by 100x without")
    ax.legend(fontsize=8)
    results["figures"] = [_common.save(fig, args.out, "port_torch_to_keras.png")]
    for key in ("torch_float32", "port", "port_vs_exact", "naive"):
        del results[key]["abs_diff"]
    return results


if __name__ == "__main__":
    main()
