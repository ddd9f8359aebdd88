"""One rank of the two-process gloo test on Keras's torch backend: ``python ... RANK WORLD PORT OUT_DIR``.

Each rank runs every case in sequence on its slice of the global float64 batches and saves what it
saw to ``OUT_DIR/rank{R}.pt``; test_synchronized.py runs the same cases in ONE process on the whole
batches and compares. The case definitions and data builders live here (NumPy only at import).
"""

from __future__ import annotations

import datetime
import os
import sys
import traceback
from typing import Any

import numpy as np

C = 3
STEPS = 2
# name -> per-rank batch sizes, per-sample shape, layer kwargs, whether a mask is passed
CASES: dict[str, dict[str, Any]] = {
    "uneven": {"sizes": (3, 5), "shape": (4, C), "kwargs": {"momentum": 0.9, "epsilon": 1e-3}},
    "empty_rank": {"sizes": (0, 6), "shape": (C,), "kwargs": {"momentum": 0.5, "scale": False}},
    "mask": {"sizes": (4, 4), "shape": (5, C), "kwargs": {}, "mask": True},
    "channels_first": {"sizes": (4, 4), "shape": (C, 3, 3), "kwargs": {"axis": 1, "momentum": 0.6}},
    "renorm": {"sizes": (3, 5), "shape": (4, C), "kwargs": {"renorm": True, "renorm_momentum": 0.8,
                                                          "renorm_clipping": {"rmax": 1.2, "rmin": 0.9, "dmax": 0.1}}},
}
DDP_SIZES, DDP_STEPS, DDP_LR = (4, 4), 2, 0.1


def offsets(sizes: tuple[int, ...]) -> list[int]:
    return [sum(sizes[:r]) for r in range(len(sizes))]


def global_batch(case: dict[str, Any], seed: int) -> dict[str, np.ndarray]:
    """x (channels with different means and scales along the layer's axis), upstream gradient g, mask."""
    rng = np.random.default_rng(seed)
    shape = (sum(case["sizes"]),) + case["shape"]
    axis = case["kwargs"].get("axis", -1) % len(shape)
    per_channel = [1] * len(shape)
    per_channel[axis] = C
    loc = np.linspace(-2.0, 3.0, C).reshape(per_channel)
    scale = np.linspace(0.5, 2.0, C).reshape(per_channel)
    out = {"x": loc + scale * rng.normal(size=shape), "g": rng.normal(size=shape)}
    if case.get("mask"):
        out["mask"] = rng.uniform(size=shape[:-1]) > 0.3
    return out


def make_layer(nk, case: dict[str, Any]):
    """The case's layer in float64 with non-trivial weights, the same on every rank."""
    layer = nk.BatchNormalization(synchronized=True, dtype="float64", **case["kwargs"])
    layer.build((None,) + case["shape"])
    rng = np.random.default_rng(7)
    for v in layer.weights:
        name = v.path.split("/")[-1]
        base = {"gamma": 1.0, "moving_variance": 1.0, "moving_stddev": 1.0, "renorm_stddev": 1.0}.get(name, 0.0)
        v.assign(base + 0.3 * rng.uniform(0.0, 1.0, size=v.shape))
    return layer


def ddp_data(step: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(100 + step)
    return rng.normal(size=(sum(DDP_SIZES), 4)) * 2 + 1, rng.normal(size=(sum(DDP_SIZES), 1))


def make_model(nk):
    import keras

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, dtype="float64"),
                              nk.BatchNormalization(synchronized=True, momentum=0.8, dtype="float64"),
                              keras.layers.Dense(1, dtype="float64")])
    rng = np.random.default_rng(8)
    model.set_weights([rng.normal(size=w.shape) if i != 5 else rng.uniform(0.5, 1.5, size=w.shape)
                       for i, w in enumerate(model.get_weights())])
    return model


def train_model(model, parameters, call, sizes, rank: int) -> None:
    """DDP_STEPS of SGD on the mean squared error of this rank's rows (all rows when ``rank`` is None)."""
    import torch

    opt = torch.optim.SGD([p for p in parameters if p.requires_grad], lr=DDP_LR)
    for step in range(DDP_STEPS):
        x, y = (torch.tensor(a) for a in ddp_data(step))
        if rank is not None:
            start = offsets(sizes)[rank]
            x, y = x[start:start + sizes[rank]], y[start:start + sizes[rank]]
        opt.zero_grad()
        loss = torch.mean((call(x) - y) ** 2)
        loss.backward()
        opt.step()


def run_case(nk, case: dict[str, Any], seed: int, rank: int | None) -> dict[str, Any]:
    """Two training steps (forward, backward of sum(y * g)) then inference, on this rank's rows (None: all)."""
    import torch

    layer = make_layer(nk, case)
    out: dict[str, Any] = {"steps": []}

    def rows(a: np.ndarray) -> torch.Tensor:
        if rank is not None:
            start = offsets(case["sizes"])[rank]
            a = a[start:start + case["sizes"][rank]]
        return torch.tensor(a)

    for step in range(STEPS):
        data = global_batch(case, seed + step)
        x = rows(data["x"]).requires_grad_()
        kwargs = {"mask": rows(data["mask"])} if "mask" in data else {}
        for v in layer.trainable_weights:
            v.value.grad = None
        with CountCollectives() as forward:
            y = layer(x, training=True, **kwargs)
        with CountCollectives() as backward:
            (y * rows(data["g"])).sum().backward()
        record = {"collectives": (forward.calls, backward.calls), "y": y.detach().clone(), "dx": x.grad.clone()}
        for v in layer.trainable_weights:
            record["d" + v.path.split("/")[-1]] = v.value.grad.clone()
        for v in layer.non_trainable_weights:
            record[v.path.split("/")[-1]] = v.value.detach().clone()
        out["steps"].append(record)
    out["eval"] = layer(rows(global_batch(case, seed + 99)["x"]), training=False).detach().clone()
    return out


from normkit_torch.testing import CountCollectives, end_process_group  # noqa: E402


def run_ddp(nk, rank: int) -> dict[str, Any]:
    """The user's path (keras.io's torch guide): a Keras model in DistributedDataParallel, a torch optimizer."""
    from torch.nn.parallel import DistributedDataParallel

    model = make_model(nk)
    ddp = DistributedDataParallel(model)
    train_model(model, ddp.parameters(), lambda x: ddp(x, training=True), DDP_SIZES, rank)
    import torch

    return {"weights": [torch.tensor(np.asarray(w)) for w in model.get_weights()]}


def run_without_normkit_torch(nk) -> str:
    """synchronized=True with a process group but normkit_torch not importable: the error's text."""
    import torch

    saved = {k: sys.modules[k] for k in ("normkit_torch", "normkit_torch.distributed") if k in sys.modules}
    sys.modules["normkit_torch"] = sys.modules["normkit_torch.distributed"] = None  # import raises ImportError
    try:
        layer = nk.BatchNormalization(synchronized=True, name="bn_without_normkit_torch", dtype="float64")
        layer(torch.ones((4, 3), dtype=torch.float64), training=True)
    except RuntimeError as error:
        return str(error)
    finally:
        for k in ("normkit_torch", "normkit_torch.distributed"):
            sys.modules.pop(k, None)
        sys.modules.update(saved)
    return "no error"


def _raised(fn) -> dict[str, Any]:
    """What ``fn()`` raised: type name and text (None where it returned)."""
    try:
        fn()
    except Exception as error:  # noqa: BLE001 (the test checks the type)
        return {"type": type(error).__name__, "text": str(error)}
    return {"type": None, "text": ""}


def agreement_data(n: int, c: int = C) -> np.ndarray:
    return np.random.default_rng(40 + n + c).normal(size=(n, c)) * 2 + 1


def run_agreement(nk, rank: int) -> dict[str, Any]:
    """Ranks calling one synchronized layer differently: every rank raises SyncMismatchError, then goes on."""
    import torch

    out: dict[str, Any] = {}
    wide = nk.BatchNormalization(synchronized=True, dtype="float64", name="agreement_width")
    out["features"] = _raised(lambda: wide(torch.tensor(agreement_data(4, C + rank)), training=True))
    layer = nk.BatchNormalization(synchronized=True, dtype="float64", name="agreement_grad")
    layer(torch.tensor(agreement_data(4)).requires_grad_(), training=True).sum().backward()
    x = torch.tensor(agreement_data(4)).requires_grad_(rank == 0)
    out["grad"] = _raised(lambda: layer(x, training=True))
    out["after"] = layer(torch.tensor(agreement_data(3 + rank)), training=True).detach().clone()
    return out


def main() -> None:
    rank, world, port, outdir = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    os.environ["KERAS_BACKEND"] = "torch"
    import torch

    torch.set_num_threads(1)
    import keras
    import torch.distributed as dist

    import normkit_keras as nk

    keras.config.set_floatx("float64")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    results: dict[str, Any] = {}
    try:
        if os.environ.get("NORMKIT_SYNC_WORKER") == "agreement":  # test_synchronized_torch_agreement.py's launch
            results["agreement"] = run_agreement(nk, rank)
            torch.save(results, os.path.join(outdir, f"rank{rank}.pt"))
            end_process_group()
            return
        for i, (name, case) in enumerate(CASES.items()):
            results[name] = run_case(nk, case, seed=10 * i, rank=rank)
        results["ddp"] = run_ddp(nk, rank)
        results["without_normkit_torch"] = run_without_normkit_torch(nk)
    except Exception:
        results["error"] = traceback.format_exc()
    torch.save(results, os.path.join(outdir, f"rank{rank}.pt"))
    end_process_group()


if __name__ == "__main__":
    main()
