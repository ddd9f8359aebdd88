"""A stand-in for torchvision, installed by ``install()`` only where ``import torchvision`` fails, so timm imports.

timm imports torchvision at import time (``torchvision.ops.misc.FrozenBatchNorm2d`` in its layers, datasets and
transforms in ``timm.data``); torchvision's only wheel for torch 2.13 here (0.28.0) is a CUDA build whose
extension does not load against CPU torch. The stand-in answers every ``torchvision.*`` import: its one real
class is ``torchvision.ops.misc.FrozenBatchNorm2d``, copied from torchvision 0.28.0 (BSD-3-Clause, Copyright (c)
Soumith Chintala 2016) minus its usage logging; every other name is a placeholder class that raises when built.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types

import torch
from torch import Tensor

VERSION = "0.28.0+normkit.standin"


class FrozenBatchNorm2d(torch.nn.Module):
    """BatchNorm2d where the batch statistics and the affine parameters are fixed (torchvision 0.28.0's)."""

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        num_batches_tracked_key = prefix + "num_batches_tracked"
        if num_batches_tracked_key in state_dict:
            del state_dict[num_batches_tracked_key]
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight.reshape(1, -1, 1, 1)
        b = self.bias.reshape(1, -1, 1, 1)
        rv = self.running_var.reshape(1, -1, 1, 1)
        rm = self.running_mean.reshape(1, -1, 1, 1)
        scale = w * (rv + self.eps).rsqrt()
        bias = b - rm * scale
        return x * scale + bias

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({self.weight.shape[0]}, eps={self.eps})"


FrozenBatchNorm2d.__module__ = "torchvision.ops.misc"


class _Placeholder(type):
    """A torchvision name the stand-in does not have: attributes are placeholders too; building one raises."""

    def __getattr__(cls, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return _placeholder(f"{cls.__qualname__}.{name}")


def _placeholder(name: str) -> type:
    def unavailable(self, *args, **kwargs):
        raise RuntimeError(f"torchvision.{name} is not available: torchvision is a test stand-in here ({VERSION})")

    return _Placeholder(name.rsplit(".", 1)[-1], (), {"__init__": unavailable, "__qualname__": name})


class _Module(types.ModuleType):
    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        value = _placeholder(f"{self.__name__.partition('.')[2] or self.__name__}.{name}")
        setattr(self, name, value)
        return value


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname == "torchvision" or fullname.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _Module(spec.name)
        module.__path__ = []
        if spec.name == "torchvision":
            module.__version__ = VERSION
        if spec.name == "torchvision.ops.misc":
            module.FrozenBatchNorm2d = FrozenBatchNorm2d
        return module

    def exec_module(self, module):
        pass


def install() -> bool:
    """Make ``import torchvision`` work: the real one where it imports, else the stand-in. True: the stand-in."""
    try:
        import torchvision  # noqa: F401
        return False
    except Exception:  # not installed, or a build that does not load against this torch
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
    sys.meta_path.insert(0, _Finder())
    return True
