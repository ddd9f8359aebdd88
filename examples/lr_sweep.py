"""Learning-rate sweep: a small CNN on scikit-learn's 8x8 digits, with and without batch norm.

The seed article claims batch normalization between layers speeds training up and allows higher
learning rates. The same CNN (same initial weights for every run) is trained with plain SGD at
several learning rates, once with normkit_torch.BatchNorm2d after each convolution and once with
no normalization at all. Printed and plotted: test accuracy against the learning rate, and the
training-loss curves.

    python examples/lr_sweep.py [--fast] [--out DIR] [--lrs 0.01,0.1,0.5,1.0]
"""

from __future__ import annotations

import math

import numpy as np

import _common


def build_cnn(torch, batch_norm: bool):
    """conv(1->16) [BN] relu, conv(16->32) [BN] relu, maxpool 2, linear(32*4*4 -> 10)."""
    from normkit_torch import BatchNorm2d

    nn = torch.nn

    def norm(c):
        return BatchNorm2d(c) if batch_norm else nn.Identity()

    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), norm(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), norm(32), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 4 * 4, 10),
    )


def accuracy(torch, model, x, y) -> float:
    model.eval()
    with torch.no_grad():
        acc = float((model(x).argmax(1) == y).float().mean())
    model.train()
    return acc


def train(torch, model, data, lr: float, epochs: int, batch: int, seed: int, bar) -> dict:
    x_train, y_train, x_test, y_test = data
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    losses, test_accs = [], []
    diverged = False
    for _ in range(epochs):
        order = torch.randperm(len(x_train), generator=gen)
        total, count = 0.0, 0
        for i in range(0, len(order), batch):
            idx = order[i:i + batch]
            loss = torch.nn.functional.cross_entropy(model(x_train[idx]), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
            count += len(idx)
        epoch_loss = total / count
        diverged = diverged or not math.isfinite(epoch_loss)
        losses.append(epoch_loss)
        test_accs.append(accuracy(torch, model, x_test, y_test))
        bar.update(1)
    return {"loss": losses, "test_acc": test_accs, "train_acc": accuracy(torch, model, x_train, y_train),
            "final_test_acc": test_accs[-1], "diverged": diverged}


def add_arguments(parser) -> None:
    parser.add_argument("--lrs", default="0.01,0.1,0.5,1.0", help="comma-separated learning rates")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per run (default 15, --fast 2)")


def main(argv=None) -> dict:
    args = _common.parse_args(argv, __doc__.splitlines()[0], add_arguments)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    import torch
    from tqdm.auto import tqdm

    _common.torch_threads()
    lrs = [float(v) for v in args.lrs.split(",")]
    epochs = args.epochs or (2 if args.fast else 15)
    batch = 64

    images, labels = _common.load_digits_arrays()
    train_idx, test_idx = _common.split(len(images))
    x = torch.from_numpy(images[:, None])  # (N, 1, 8, 8)
    y = torch.from_numpy(labels)
    data = (x[train_idx], y[train_idx], x[test_idx], y[test_idx])

    _common.heading("Small CNN on scikit-learn digits (10 classes): normkit_torch.BatchNorm2d vs no normalization")
    print(f"{len(train_idx)} training / {len(test_idx)} test images, 8x8; plain SGD, batch {batch}, "
          f"{epochs} epochs, learning rates {lrs}; the same initial weights in every run")

    torch.manual_seed(0)
    initial = {bn: build_cnn(torch, bn).state_dict() for bn in (True, False)}
    runs: dict = {}
    with tqdm(total=2 * len(lrs) * epochs, desc="training", unit="epoch", ncols=80) as bar:
        for lr in lrs:
            for bn in (True, False):
                bar.set_postfix_str(f"lr {lr} {'BN' if bn else 'plain'}")
                model = build_cnn(torch, bn)
                model.load_state_dict(initial[bn])
                runs[(lr, bn)] = train(torch, model, data, lr, epochs, batch, seed=1, bar=bar)

    _common.heading("Test accuracy after the last epoch (train accuracy in brackets)")
    print(f"{'lr':>6}  {'BatchNorm2d':>16}  {'no normalization':>18}")
    results: dict = {"epochs": epochs, "lrs": lrs, "bn": {}, "plain": {}}
    for lr in lrs:
        b, p = runs[(lr, True)], runs[(lr, False)]
        def cell(r):
            return "diverged" if r["diverged"] else f"{r['final_test_acc']:.3f} ({r['train_acc']:.3f})"
        print(f"{lr:>6}  {cell(b):>16}  {cell(p):>18}")
        for key, r in (("bn", b), ("plain", p)):
            results[key][lr] = {"test_acc": r["final_test_acc"], "train_acc": r["train_acc"],
                                "final_loss": r["loss"][-1], "diverged": r["diverged"], "loss": r["loss"],
                                "test_acc_per_epoch": r["test_acc"]}

    def first_epoch(r, level=0.95):
        return next((i + 1 for i, a in enumerate(r["test_acc"]) if a >= level), None)

    results["epochs_to_95"] = {key: {lr: first_epoch(runs[(lr, key == "bn")]) for lr in lrs} for key in ("bn", "plain")}
    best = {key: max(lrs, key=lambda lr: results[key][lr]["test_acc"]) for key in ("bn", "plain")}
    results["best_lr"] = best
    print("epochs until test accuracy >= 0.95: "
          + "; ".join(f"lr {lr}: BN {results['epochs_to_95']['bn'][lr]}, plain {results['epochs_to_95']['plain'][lr]}"
                      for lr in lrs))
    print(f"best learning rate: with BN {best['bn']} ({results['bn'][best['bn']]['test_acc']:.3f}), "
          f"without {best['plain']} ({results['plain'][best['plain']]['test_acc']:.3f})")

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.5))
    for key, label, marker in (("bn", "normkit BatchNorm2d", "o"), ("plain", "no normalization", "s")):
        ax.plot(lrs, [results[key][lr]["test_acc"] for lr in lrs], marker=marker, label=label)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (plain SGD)")
    ax.set_ylabel(f"test accuracy after {epochs} epochs")
    ax.set_ylim(0, 1.02)
    ax.axhline(0.1, color="gray", ls=":", lw=1, label="chance")
    ax.set_title("Digits CNN: accuracy vs learning rate")
    ax.legend()
    for i, lr in enumerate(lrs):
        for key, ls in (("bn", "-"), ("plain", "--")):
            loss = np.array(results[key][lr]["loss"], dtype=float)
            loss[~np.isfinite(loss)] = np.nan
            bx.plot(range(1, epochs + 1), loss, ls=ls, color=f"C{i}",
                    label=f"lr {lr} {'BN' if key == 'bn' else 'plain'}")
    bx.set_yscale("log")
    bx.set_xlabel("epoch")
    bx.xaxis.set_major_locator(MaxNLocator(integer=True))
    bx.set_ylabel("training loss (cross-entropy)")
    bx.set_title("solid: BatchNorm2d, dashed: no normalization")
    bx.legend(fontsize=7, ncol=2)
    results["figures"] = [_common.save(fig, args.out, "lr_sweep.png")]
    return results


if __name__ == "__main__":
    main()
