"""Batch norm after a convolution: one mean and variance per feature map, not per pixel.

The seed article says that for convolutions the statistics are shared per feature map. Here a
random Conv2d is applied to scikit-learn's 8x8 digits and its activation (N, C, H, W) is normalized
two ways with the same normkit.batch_norm call: axis=1 on the 4-D activation (C statistics, each over
N*H*W values -- what BatchNorm2d does) and axis=1 on the activation flattened to (N, C*H*W) (one
statistic per pixel of every map, each over N values). Printed and plotted: the shapes, what
per-pixel statistics do to rarely-inked border pixels (near-zero variance blows values up), to the
spatial pattern (the average map is erased), and how noisy they are on a batch of 16.

    python examples/per_feature_map.py [--fast] [--out DIR]
"""

from __future__ import annotations

import numpy as np

import _common


def main(argv=None) -> dict:
    args = _common.parse_args(argv, __doc__.splitlines()[0])
    import matplotlib.pyplot as plt
    import torch

    import normkit as nk
    from normkit_torch import BatchNorm2d

    _common.torch_threads()
    torch.manual_seed(0)
    images, labels = _common.load_digits_arrays()
    if args.fast:
        images, labels = images[:400], labels[:400]
    x = torch.from_numpy(images[:, None])  # (N, 1, 8, 8)
    conv = torch.nn.Conv2d(1, 8, 3, padding=1)
    with torch.no_grad():
        act = conv(x)  # (N, C, H, W), the input a BatchNorm2d would get
    n, c, h, w = act.shape

    _common.heading("Statistics per feature map vs per pixel, on a random Conv2d's output over the digits")
    print(f"activation: {tuple(act.shape)} = (N, C, H, W) from Conv2d(1, {c}, 3, padding=1) on {n} digits")

    # per feature map: the 4-D activation, feature axis 1
    per_map, mean_c, var_c = nk.batch_norm(act, torch.zeros(c), torch.ones(c), training=True, axis=1)
    m = nk.moments(act, axis=(0, 2, 3))
    bn = BatchNorm2d(c)
    bn(act)
    print(f"per feature map: nk.batch_norm(act, axis=1) running_mean {tuple(mean_c.shape)}, running_var "
          f"{tuple(var_c.shape)}; nk.moments(act, axis=(0, 2, 3)).mean {tuple(m.mean.shape)}; "
          f"normkit_torch.BatchNorm2d({c}).running_mean {tuple(bn.running_mean.shape)}: {c} values, "
          f"each over N*H*W = {n * h * w} numbers")

    # per pixel: the same call on the activation flattened to (N, C*H*W)
    flat = torch.reshape(act, (n, c * h * w))
    per_pixel_flat, mean_p, var_p = nk.batch_norm(flat, torch.zeros(c * h * w), torch.ones(c * h * w),
                                                  training=True, axis=1)
    per_pixel = torch.reshape(per_pixel_flat, (n, c, h, w))
    print(f"per pixel:       nk.batch_norm(act.reshape(N, C*H*W), axis=1) running_mean {tuple(mean_p.shape)}: "
          f"{c * h * w} values, each over N = {n} numbers")

    # 1. near-constant pixels blow up
    pix = nk.moments(act, axis=0)  # (C, H, W)
    pix_std = torch.sqrt(pix.var)
    chan_std = torch.sqrt(m.var)[:, None, None]
    quiet = pix_std < 0.1 * chan_std
    max_map, max_pix = float(per_map.abs().max()), float(per_pixel.abs().max())
    print(f"1. {int(quiet.sum())} of {c * h * w} pixel positions vary less than a tenth of their map's std "
          f"(digit borders, mostly blank). Per pixel, a rare stroke there is divided by that tiny "
          f"std: max |y| = {max_pix:.1f} per pixel vs {max_map:.1f} per feature map")

    # 2. the spatial pattern: the batch-average map
    mean_before = act.mean(0)
    spread = {"before": float(mean_before.std(dim=(1, 2)).mean()),
              "per feature map": float(per_map.mean(0).std(dim=(1, 2)).mean()),
              "per pixel": float(per_pixel.mean(0).std(dim=(1, 2)).mean())}
    corr = float(np.mean([np.corrcoef(mean_before[k].flatten().numpy(), per_map.mean(0)[k].flatten().numpy())[0, 1]
                          for k in range(c)]))
    print(f"2. spatial std of the average map (mean over channels): before {spread['before']:.3f}, per feature map "
          f"{spread['per feature map']:.3f} (correlation with before {corr:.3f}: same pattern, rescaled), per pixel "
          f"{spread['per pixel']:.1e} (erased: every pixel is forced to mean 0)")

    # 3. a batch of 16: statistics from the batch vs from the whole data set
    batch = act[:16]
    def normalize(a, per):
        if per == "map":
            return nk.batch_norm(a, training=True, axis=1).output
        flat_a = torch.reshape(a, (a.shape[0], c * h * w))
        return torch.reshape(nk.batch_norm(flat_a, training=True, axis=1).output, a.shape)
    err_map = float((normalize(batch, "map") - per_map[:16]).abs().mean())
    err_pix = float((normalize(batch, "pixel") - per_pixel[:16]).abs().mean())
    print(f"3. a batch of 16 normalized with its own statistics vs with the whole data set's: mean abs difference "
          f"{err_map:.3f} per feature map, {err_pix:.3f} per pixel (16 numbers per statistic instead of {16 * h * w})")

    results = {"n_stats_per_map": int(mean_c.shape[0]), "n_stats_per_pixel": int(mean_p.shape[0]),
               "channels": c, "pixels": c * h * w, "quiet_pixels": int(quiet.sum()),
               "max_abs_per_map": max_map, "max_abs_per_pixel": max_pix, "mean_map_spread": spread,
               "mean_map_correlation_per_map": corr, "batch16_error_per_map": err_map,
               "batch16_error_per_pixel": err_pix}

    # figure: one digit through both, and the statistics behind them
    k = int(torch.argmax(quiet.sum(dim=(1, 2))))  # the channel with most quiet pixels
    i = int(torch.argmax(per_pixel[:, k].abs().amax(dim=(1, 2))))  # the digit that blows up most there
    max_abs_k = float(max(per_map[i, k].abs().max(), per_pixel[i, k].abs().max()))
    fig, axes = plt.subplots(2, 4, figsize=(13, 6.5))
    panels = [
        (images[i], f"digit {labels[i]} (input)", "gray_r"),
        (act[i, k].numpy(), f"conv map {k}", "viridis"),
        (per_map[i, k].numpy(), f"per feature map: max |y| {per_map[i, k].abs().max():.1f}", "viridis"),
        (per_pixel[i, k].numpy(), f"per pixel: max |y| {per_pixel[i, k].abs().max():.1f}", "viridis"),
        (np.log10(pix_std[k].numpy() + 1e-12), f"log10 std over N, per pixel, map {k}", "magma"),
        (mean_before[k].numpy(), "average map before", "viridis"),
        (per_map.mean(0)[k].numpy(), "average map, per feature map", "viridis"),
        (per_pixel.mean(0)[k].numpy(), "average map, per pixel (all 0)", "viridis"),
    ]
    avg = per_map.mean(0)[k]
    same_scale = {2: (-max_abs_k, max_abs_k), 3: (-max_abs_k, max_abs_k),
                  6: (float(avg.min()), float(avg.max())), 7: (float(avg.min()), float(avg.max()))}
    for j, (ax, (img, title, cmap)) in enumerate(zip(axes.flat, panels)):
        vmin, vmax = same_scale.get(j, (None, None))
        im = ax.imshow(img, cmap=cmap, vmin=vmin, vmax=vmax)
        ax.set_title(title, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle(f"Batch norm statistics per feature map ({c} of them) vs per pixel ({c * h * w}); "
                 "pairs of panels share a colour scale")
    results["figures"] = [_common.save(fig, args.out, "per_feature_map.png")]
    return results


if __name__ == "__main__":
    main()
