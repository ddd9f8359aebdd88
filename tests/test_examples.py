"""Every example runs in its fast mode and its numbers support the claim it illustrates as far as a few steps
can show it. The tour (``make demo``) runs each example's ``main(["--fast", "--out", DIR])`` in turn, so it runs
once here (one module fixture, on one pytest-xdist worker) and each example's test checks that pass of it."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
# end-to-end runs (~1 minute for the file); one worker, which runs the tour once
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("examples")]

NAMES = ["feature_scaling", "per_feature_map", "every_library", "lr_sweep", "keras_seed_models", "tour"]


def _checked_figures(name: str, results: dict, out: Path) -> dict:
    assert isinstance(results, dict)
    assert results["figures"], f"{name} wrote no figure"
    for figure in results["figures"]:
        path = Path(figure)
        assert path.parent == out, f"{name} wrote {path} outside --out {out}"
        assert path.suffix == ".png" and path.is_file() and path.stat().st_size > 5_000, path
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    return results


@pytest.fixture(scope="module")
def tour(tmp_path_factory):
    """``examples/tour.py --fast``'s results (every example's own results under its name) and its --out folder."""
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    out = tmp_path_factory.mktemp("tour")
    results = importlib.import_module("tour").main(["--fast", "--out", str(out)])
    return _checked_figures("tour", results, out), out


def run(name: str, tour) -> dict:
    """The results of example ``name``'s fast pass inside the tour, its figures checked."""
    results, out = tour
    return _checked_figures(name, results[name], out)


# examples checked by a test file of their own (script name -> that file)
CHECKED_ELSEWHERE = {
    "port_torch_to_keras": "test_example_port.py",
    "fold_and_recalibrate": "test_example_tools.py",
    "port_torch_to_flax": "test_example_port_flax.py",
}


def test_every_example_is_covered():
    """Every example script is run and its claim checked, here or in the test file named for it."""
    scripts = {p.stem for p in EXAMPLES.glob("*.py") if not p.stem.startswith("_")}
    elsewhere = {name for name in scripts if name in CHECKED_ELSEWHERE}
    assert scripts - elsewhere == set(NAMES)
    here = Path(__file__).resolve().parent
    for name in elsewhere:
        assert name in (here / CHECKED_ELSEWHERE[name]).read_text(), f"{CHECKED_ELSEWHERE[name]} does not run {name}"


def test_feature_scaling(tour):
    r = run("feature_scaling", tour)
    raw, mm, z = r["unscaled"], r["min-max"], r["z-score"]
    assert z["final_loss"] < mm["final_loss"] < raw["final_loss"]
    assert z["test_mse"] < raw["test_mse"] / 10
    assert z["final_loss"] < 2 * 16.0  # near the noise floor (std 4 $/day) in 40 steps
    assert abs(z["per_year"] - (-2.0)) < 0.2  # z-scored: the age effect is found
    assert abs(raw["per_year"]) < 0.2  # unscaled: the age weight hardly moves
    assert r["module_vs_function_max_abs_diff"] < 1e-5


def test_per_feature_map(tour):
    r = run("per_feature_map", tour)
    assert r["n_stats_per_map"] == r["channels"] == 8
    assert r["n_stats_per_pixel"] == r["pixels"] == 8 * 8 * 8
    assert r["quiet_pixels"] > 0
    assert r["max_abs_per_pixel"] > 1.5 * r["max_abs_per_map"]
    spread = r["mean_map_spread"]
    assert spread["per pixel"] < 1e-4 < 0.05 < spread["per feature map"]
    assert r["mean_map_correlation_per_map"] > 0.999
    assert r["batch16_error_per_pixel"] > 5 * r["batch16_error_per_map"]


def test_every_library(tour):
    r = run("every_library", tour)
    assert set(r["max_abs_diff"]) == {"torch", "jax (jit)", "dask (computed)", "tensorflow"}
    for lib, diff in r["max_abs_diff"].items():
        assert diff <= 1e-5, lib
    assert r["all_agree"]
    assert r["dask_lazy"] and r["dask_tasks"] > 0
    assert r["types"]["torch"] == "torch.Tensor"
    assert r["types"]["tensorflow"].startswith("tensorflow")


def test_lr_sweep(tour):
    r = run("lr_sweep", tour)
    assert r["lrs"] == [0.01, 0.1, 1.0] and r["epochs"] == 2
    for net in ("mlp", "cnn"):
        for key in ("bn", "plain"):
            for lr in r["lrs"]:
                assert 0.0 <= r[net][key][lr]["test_acc"] <= 1.0
                assert len(r[net][key][lr]["loss"]) == r["epochs"]
    # the deep MLP: with BatchNorm1d it trains at the high learning rates, without it stays at chance
    mlp = r["mlp"]
    high = [lr for lr in r["lrs"] if lr >= 0.1]
    assert any(mlp["bn"][lr]["test_acc"] > 0.8 and mlp["plain"][lr]["test_acc"] < 0.2 for lr in high), mlp
    assert all(mlp["plain"][lr]["test_acc"] < 0.2 for lr in r["lrs"])  # at no learning rate without BN
    assert mlp["trains_at"]["plain"] == [] and set(mlp["trains_at"]["bn"]) & set(high)
    # the shallow CNN (the contrast): it trains without BN too; two epochs: BN is ahead at the small learning rates
    cnn = r["cnn"]
    assert cnn["bn"][0.01]["test_acc"] > cnn["plain"][0.01]["test_acc"] + 0.2
    assert cnn["bn"][0.1]["test_acc"] > cnn["plain"][0.1]["test_acc"] > 0.2


def test_keras_seed_models(tour):
    r = run("keras_seed_models", tour)
    models = r["models"]
    for name in ("dense", "conv"):
        assert models[(name, "init_max_abs_diff")] < 1e-4  # same weights, same forward pass
        for impl in ("normkit", "keras"):
            m = models[(name, impl)]
            assert 0.0 <= m["test_acc"] <= 1.0 and 0.0 <= m["test_acc_batch_stats"] <= 1.0
            assert m["epoch_s"] > 0 and m["first_epoch_s"] > 0
            assert len(m["val_acc_per_epoch"]) == 2
        # the drop-in trains like the native layer from the same start; float32 round-off differences grow
        # over training and the conv model's inference accuracy swings from epoch to epoch, hence its margin
        margin = 0.02 if name == "dense" else 0.1
        assert abs(models[(name, "normkit")]["test_acc"] - models[(name, "keras")]["test_acc"]) <= margin


def test_tour(tour):
    r, _ = tour
    core = r["core"]
    assert core["numpy_z_mean"] < 1e-5
    assert all(abs(s - 1) < 1e-4 for s in core["numpy_z_std"] + core["torch_y_std"])
    assert core["inputs_untouched"]
    for name in NAMES[:-1]:
        assert name in r and r[name]["figures"]
    assert len(r["figures"]) == 5
