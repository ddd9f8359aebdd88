"""Batch renormalization (Ioffe 2017) with Keras's semantics and torch's module conventions.

training (per feature, batch moments from ``normkit.batch_moments``, var_B biased):
    std_B = sqrt(var_B + eps);  s = max(renorm_std, sqrt(eps))
    r = clip(std_B / s, rmin, rmax);  d = clip((mean_B - renorm_mean) / s, -dmax, dmax)     (no gradient)
    y = (x - mean_B) / std_B * (r * weight) + (d * weight + bias)        (normkit.normalize)
    renorm_mean, renorm_std <- EMA(mean_B, std_B) with renorm_momentum
    running_mean, running_std <- EMA(mean_B, std_B) with momentum;  running_var = relu(running_std**2 - eps)
inference: y = (x - running_mean) / sqrt(running_var + eps) * weight + bias

This is ``keras.layers.BatchNormalization(renorm=True)`` step for step (r and d from the renorm
statistics before their update; eps inside the square root; ``moving_variance`` derived from
``moving_stddev``). Momenta are torch's direction, the weight of the new batch:
``momentum = 1 - keras_momentum`` and ``renorm_momentum = 1 - keras_renorm_momentum`` (Keras's
defaults 0.99/0.99 are 0.01/0.01 here; ``momentum`` keeps torch's 0.1 default). Every EMA goes
through ``normkit.update_running_stats`` (a count-1 ``Moments`` carries the std in its ``m2``).
"""

from __future__ import annotations

import math
import numbers
from typing import TYPE_CHECKING, Any, Optional

import torch
from array_api_compat import torch as xp
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

import normkit
from normkit import Moments
from normkit_torch import _deploy

__all__ = ["BatchRenorm1d", "BatchRenorm2d", "BatchRenorm3d"]


def _check_bound(name: str, value: Any, low: float, high: float, expected: str) -> None:
    """A clipping bound is None or a real number in [low, high] (inf allowed where high is inf)."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value) or not low <= value <= high:
        raise ValueError(f"{name} must be None (no clipping) or a number {expected}, got {value!r}")


def _check_clipping(rmax: Optional[float], rmin: Optional[float], dmax: Optional[float], warmup_steps: int) -> None:
    """r = std_B / std clipped to [rmin, rmax] must be able to be 1 (no correction) and stay positive;
    d clipped to [-dmax, dmax] must be able to be 0 (the paper: rmax >= 1, 0 <= rmin <= 1, dmax >= 0)."""
    _check_bound("rmax", rmax, 1.0, math.inf, ">= 1 (r = 1, no correction, must stay inside the clipping)")
    _check_bound("rmin", rmin, 0.0, 1.0, "in [0, 1] (r = 1 must stay inside the clipping; r is positive)")
    _check_bound("dmax", dmax, 0.0, math.inf, ">= 0 (d is clipped to [-dmax, dmax])")
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ValueError(f"warmup_steps must be a non-negative int, got {warmup_steps!r}")
    if warmup_steps and (rmax is None or rmin is None or dmax is None):
        raise ValueError(
            "warmup_steps > 0 relaxes the clipping bounds from r = 1, d = 0 to rmin, rmax, dmax: give all three "
            f"(got rmax={rmax}, rmin={rmin}, dmax={dmax})"
        )


class _BatchRenorm(_BatchNorm):
    """Shared implementation; see the module docstring for the math."""

    _normkit_dims: int
    if TYPE_CHECKING:  # not at run time: TorchScript cannot resolve these postponed (string) annotations
        running_std: Tensor
        renorm_mean: Tensor
        renorm_std: Tensor

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: Any = None,
        dtype: Any = None,
        *,
        bias: bool = True,
        renorm_momentum: float = 0.01,
        rmax: Optional[float] = None,
        rmin: Optional[float] = None,
        dmax: Optional[float] = None,
        warmup_steps: int = 0,
    ) -> None:
        if not track_running_stats:
            raise ValueError("BatchRenorm needs running statistics: track_running_stats must be True, got False")
        if isinstance(renorm_momentum, bool) or not (isinstance(renorm_momentum, (int, float)) and 0.0 <= renorm_momentum <= 1.0):
            raise ValueError(f"renorm_momentum must be a number in [0, 1], got {renorm_momentum!r}")
        _check_clipping(rmax, rmin, dmax, warmup_steps)
        self.renorm_momentum = float(renorm_momentum)
        self.rmax, self.rmin, self.dmax = rmax, rmin, dmax
        self.warmup_steps = warmup_steps
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias)
        factory = {"device": device, "dtype": dtype}
        self.register_buffer("running_std", torch.ones(num_features, **factory))
        self.register_buffer("renorm_mean", torch.zeros(num_features, **factory))
        self.register_buffer("renorm_std", torch.ones(num_features, **factory))

    def reset_running_stats(self) -> None:
        super().reset_running_stats()
        if "running_std" in self._buffers:  # not yet registered while _BatchNorm.__init__ runs
            self.running_std.fill_(1)
            self.renorm_mean.zero_()
            self.renorm_std.fill_(1)

    def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any, **kwargs: Any) -> None:
        """A BatchNorm*d checkpoint (no renorm buffers) loads: ``running_std = renorm_std = sqrt(running_var + eps)``
        and ``renorm_mean = running_mean``, the state a renorm layer with those statistics would hold."""
        rm, rv = state_dict.get(prefix + "running_mean"), state_dict.get(prefix + "running_var")
        if rm is not None and rv is not None and prefix + "running_std" not in state_dict:
            std = torch.sqrt(rv + self.eps)
            state_dict[prefix + "running_std"] = std
            state_dict.setdefault(prefix + "renorm_mean", rm)
            state_dict.setdefault(prefix + "renorm_std", std)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        clip = ", ".join(f"{k}={getattr(self, k)}" for k in ("rmax", "rmin", "dmax") if getattr(self, k) is not None)
        warm = f", warmup_steps={self.warmup_steps}" if self.warmup_steps else ""
        return f"{super().extra_repr()}, renorm_momentum={self.renorm_momentum}" + (f", {clip}" if clip else "") + warm

    def _bounds(self, done: Tensor, like: Tensor) -> tuple[Any, Any, Any]:
        """(rmin, rmax, dmax) for this step. Warm-up: with f = min(t / warmup_steps, 1), t the training batches
        before this one, the bounds are 1 + (rmin - 1) f, 1 + (rmax - 1) f and dmax f: plain batch norm
        (r = 1, d = 0) at the first step, relaxed linearly to the given bounds (the paper's schedule)."""
        if not self.warmup_steps:
            return self.rmin, self.rmax, self.dmax
        f = torch.clamp(done.to(like.dtype) / self.warmup_steps, max=1.0)
        return 1.0 + (self.rmin - 1.0) * f, 1.0 + (self.rmax - 1.0) * f, self.dmax * f

    def forward(self, input: Tensor) -> Tensor:
        if torch.jit.is_scripting():  # TorchScript: inference only (normkit_torch._deploy)
            self._check_input_dim(input)
            return _deploy.scripted_batch_renorm(input, self.running_mean, self.running_var, self.weight, self.bias,
                                                 self.eps, self.training)
        if _deploy.is_traced(input):  # torch.fx: a leaf
            return _deploy.traced_call(self, input)
        self._check_input_dim(input)
        if input.shape[1] != self.num_features:  # torch.nn's check and message
            raise RuntimeError(f"running_mean should contain {input.shape[1]} elements not {self.num_features}")
        if self.training and input.numel() == 0:  # torch.nn's empty batch: an empty output, statistics kept
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
            return normkit.normalize(input, self.running_mean, self.running_var, self.weight, self.bias,
                                     eps=self.eps, axis=1, xp=xp)
        if not self.training:
            return normkit.normalize(input, self.running_mean, self.running_var, self.weight, self.bias,
                                     eps=self.eps, axis=1, xp=xp)
        if input.numel() // max(input.shape[1], 1) <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {input.size()}")
        if self.eps <= 0.0:
            raise ValueError(f"batch_norm eps must be positive during training, but got {self.eps}")
        batch = normkit.batch_moments(input, axis=1, xp=xp)
        var = batch.var
        with torch.no_grad():
            mean_b = batch.mean.detach()
            std_b = torch.sqrt(var.detach() + self.eps)
            s = torch.clamp(self.renorm_std.to(std_b.dtype), min=math.sqrt(self.eps))
            r = std_b / s
            d = (mean_b - self.renorm_mean.to(mean_b.dtype)) / s
            rmin, rmax, dmax = self._bounds(self.num_batches_tracked, r)
            if rmin is not None:
                r = torch.maximum(r, torch.as_tensor(rmin, dtype=r.dtype, device=r.device))
            if rmax is not None:
                r = torch.minimum(r, torch.as_tensor(rmax, dtype=r.dtype, device=r.device))
            if dmax is not None:
                dmax = torch.as_tensor(dmax, dtype=d.dtype, device=d.device)
                d = torch.minimum(torch.maximum(d, -dmax), dmax)
        weight = r if self.weight is None else r * self.weight
        bias = d if self.weight is None else d * self.weight
        if self.bias is not None:
            bias = bias + self.bias
        output = normkit.normalize(input, batch.mean, var, weight, bias, eps=self.eps, axis=1, xp=xp)
        self._update(mean_b, std_b)
        return output

    @torch.no_grad()
    def _update(self, mean_b: Tensor, std_b: Tensor) -> None:
        self.num_batches_tracked.add_(1)
        step = Moments(count=1, mean=mean_b, m2=std_b)  # m2 / (1 - 0) = std_B: the EMA of the std
        new_mean, new_std = normkit.update_running_stats(
            self.renorm_mean, self.renorm_std, step, momentum=self.renorm_momentum, correction=0, xp=xp
        )
        self.renorm_mean.copy_(new_mean)
        self.renorm_std.copy_(new_std)
        new_mean, new_std = normkit.update_running_stats(  # momentum None: the cumulative average over the batches
            self.running_mean, self.running_std, step, momentum=self.momentum, correction=0,
            num_batches=self.num_batches_tracked, xp=xp,
        )
        self.running_mean.copy_(new_mean)
        self.running_std.copy_(new_std)
        self.running_var.copy_(torch.relu(new_std * new_std - self.eps))


class BatchRenorm1d(_BatchRenorm):
    """Batch renormalization over ``(N, C)`` or ``(N, C, L)``: BatchNorm1d's arguments plus
    ``renorm_momentum`` (torch direction), ``rmax``, ``rmin``, ``dmax`` (None: unclipped) and ``warmup_steps``."""

    _normkit_dims = 1

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 2 and input.dim() != 3:
            raise ValueError(f"expected 2D or 3D input (got {input.dim()}D input)")


class BatchRenorm2d(_BatchRenorm):
    """Batch renormalization over ``(N, C, H, W)``; arguments as ``BatchRenorm1d``."""

    _normkit_dims = 2

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 4:
            raise ValueError(f"expected 4D input (got {input.dim()}D input)")


class BatchRenorm3d(_BatchRenorm):
    """Batch renormalization over ``(N, C, D, H, W)``; arguments as ``BatchRenorm1d``."""

    _normkit_dims = 3

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 5:
            raise ValueError(f"expected 5D input (got {input.dim()}D input)")
