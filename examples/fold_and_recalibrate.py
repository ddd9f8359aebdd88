"""Two batch-norm tools for deployment: fold BN into the convolutions, recalibrate stale statistics.

1. Fold. normkit_torch.fold_batch_norm folds every inference-mode batch norm into the convolution
   or linear layer before it (w' = w * gamma / sqrt(var + eps), b' = (b - mean) * scale + beta).
   A small CNN is timed in eval mode before and after (median of repeated timings, one thread), and
   its outputs compared (float32, and float64 where folding must be exact to round-off).
2. Recalibrate. A BN CNN trained on scikit-learn's 8x8 digits meets dimmer, washed-out images at
   test time (x -> 0.4 x + 0.5). Its running statistics describe the old inputs, so accuracy drops;
   normkit_torch.recalibrate replaces them by the exact statistics of a few unlabeled batches of
   shifted training images, and accuracy comes back. No weight changes, no labels.

    python examples/fold_and_recalibrate.py [--fast] [--out DIR]
"""

from __future__ import annotations

import copy
import statistics
import time
import warnings

import _common

SHIFT = (0.4, 0.5)  # deployment images: scale, offset


def build_cnn(torch, width: int = 16):
    """conv-BN-relu x3 (the last after a 2x2 max-pool), then linear-BN1d-relu-linear."""
    from normkit_torch import BatchNorm1d, BatchNorm2d

    nn = torch.nn
    w = width
    return nn.Sequential(
        nn.Conv2d(1, w, 3, padding=1, bias=False), BatchNorm2d(w), nn.ReLU(),
        nn.Conv2d(w, 2 * w, 3, padding=1, bias=False), BatchNorm2d(2 * w), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(2 * w, 2 * w, 3, padding=1, groups=2 * w, bias=False), BatchNorm2d(2 * w), nn.ReLU(),
        nn.Flatten(), nn.Linear(2 * w * 16, 64), BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 10),
    )


def accuracy(torch, model, x, y) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def train(torch, model, x, y, epochs: int, batch: int = 64, lr: float = 0.05, seed: int = 0) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(order), batch):
            idx = order[i:i + batch]
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()


def median_ms(torch, models, x, repeats: int) -> list[float]:
    """Median wall time (ms) of one eval forward pass of each model, timed in turn (A, B, A, B, ...) so that
    a shared machine's load drifts over both alike; two warm-up calls each."""
    times: list[list[float]] = [[] for _ in models]
    with torch.no_grad():
        for model in models:
            for _ in range(2):
                model(x)
        for _ in range(repeats):
            for model, t in zip(models, times):
                t0 = time.perf_counter()
                model(x)
                t.append(time.perf_counter() - t0)
    return [1e3 * statistics.median(t) for t in times]


def count_bn(torch, model) -> int:
    return sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


def fold_part(torch, nkt, x_eval, repeats: int) -> dict:
    _common.heading("1. Fold batch norm into the convolutions (eval mode, one thread)")
    torch.manual_seed(0)
    model = build_cnn(torch)
    model.train()
    with torch.no_grad():  # running statistics from a few training-mode passes, so that folding has work to do
        for chunk in x_eval.split(64):
            model(chunk)
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", nkt.UnfoldedBatchNormWarning)  # every BN here must fold
        folded = nkt.fold_batch_norm(model)
        exact = nkt.fold_batch_norm(copy.deepcopy(model).double())
    with torch.no_grad():
        diff32 = float((folded(x_eval) - model(x_eval)).abs().max())
        scale32 = float(model(x_eval).abs().max())
        ref64 = copy.deepcopy(model).double()(x_eval.double())
        rel64 = float((exact(x_eval.double()) - ref64).abs().max() / ref64.abs().max())
    before, after = median_ms(torch, [model, folded], x_eval, repeats)
    out = {"bn_layers_before": count_bn(torch, model), "bn_layers_after": count_bn(torch, folded),
           "eval_ms_bn": before, "eval_ms_folded": after, "speedup": before / after,
           "max_abs_diff_float32": diff32, "output_scale": scale32, "max_rel_diff_float64": rel64,
           "batch": len(x_eval), "repeats": repeats}
    print(f"{out['bn_layers_before']} batch norms -> {out['bn_layers_after']}; eval of {len(x_eval)} images: "
          f"{before:.2f} ms -> {after:.2f} ms (median of {repeats}): speed-up {out['speedup']:.2f}x")
    print(f"outputs: float32 max |diff| {diff32:.2e} (outputs up to {scale32:.1f}); "
          f"float64 max relative diff {rel64:.1e}")
    return out


def recalibration_part(torch, nkt, data, epochs: int) -> dict:
    x_train, y_train, x_test, y_test = data
    a, b = SHIFT
    _common.heading(f"2. Recalibrate after an input shift (x -> {a} x + {b})")
    torch.manual_seed(1)
    model = build_cnn(torch)
    train(torch, model, x_train, y_train, epochs)
    clean = accuracy(torch, model, x_test, y_test)
    stale = accuracy(torch, model, a * x_test + b, y_test)
    calibration = (a * x_train[:512] + b).split(64)  # unlabeled shifted images, not the test set
    nkt.recalibrate(model, calibration)
    recalibrated = accuracy(torch, model, a * x_test + b, y_test)
    out = {"epochs": epochs, "clean_acc": clean, "shifted_acc_stale": stale, "shifted_acc_recalibrated": recalibrated,
           "calibration_batches": len(calibration), "calibration_images": 512, "shift": SHIFT}
    print(f"test accuracy: clean {clean:.3f}; shifted with the training statistics {stale:.3f}; "
          f"shifted after recalibrate() on {len(calibration)} unlabeled batches {recalibrated:.3f}")
    return out


def main(argv=None) -> dict:
    args = _common.parse_args(argv, __doc__.splitlines()[0])
    import matplotlib.pyplot as plt
    import torch

    import normkit_torch as nkt

    _common.torch_threads()
    images, labels = _common.load_digits_arrays()
    train_idx, test_idx = _common.split(len(images))
    x, y = torch.from_numpy(images[:, None]), torch.from_numpy(labels)
    data = (x[train_idx], y[train_idx], x[test_idx], y[test_idx])
    results = {"fold": fold_part(torch, nkt, x[:256], repeats=20 if args.fast else 100),
               "recalibration": recalibration_part(torch, nkt, data, epochs=3 if args.fast else 10)}

    fold, rec = results["fold"], results["recalibration"]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
    ax.bar(["with BN", "folded"], [fold["eval_ms_bn"], fold["eval_ms_folded"]], color=["C0", "C2"])
    ax.set_ylabel(f"eval time of {fold['batch']} images, ms (median)")
    ax.set_title(f"fold_batch_norm: {fold['speedup']:.2f}x faster, same outputs")
    labels_ = ["clean", "shifted,\nstale stats", "shifted,\nrecalibrated"]
    values = [rec["clean_acc"], rec["shifted_acc_stale"], rec["shifted_acc_recalibrated"]]
    bx.bar(labels_, values, color=["C0", "C3", "C2"])
    for i, v in enumerate(values):
        bx.text(i, v + 0.01, f"{v:.3f}", ha="center")
    bx.set_ylim(0, 1.08)
    bx.set_ylabel("test accuracy")
    bx.set_title(f"recalibrate: inputs x -> {SHIFT[0]} x + {SHIFT[1]}")
    results["figures"] = [_common.save(fig, args.out, "fold_and_recalibrate.png")]
    return results


if __name__ == "__main__":
    main()
