"""convert on real model code (transformers' Llama, BERT, ViT; timm's ConvNeXt, EfficientNet), built from configs with
random weights, nothing downloaded: every normalization module converted (the report names none left), state_dict
keys and values kept, eval outputs and three float64 SGD steps equal to the unconverted model; the converted
classes' numerics (dtype casts) against the library classes themselves; register_conversion; the report."""

from __future__ import annotations

import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded: every model is built from a config

import pytest
import torch
from torch import nn

import normkit_torch as nkt
import torchvision_standin
from conftest import F64
from normkit_torch._conversions import Float32RMSNorm, LayerNorm2d, TimmBatchNormAct2d, looks_like_norm

STANDIN = torchvision_standin.install()  # timm imports torchvision; its wheel here does not load on CPU torch

import timm  # noqa: E402
import transformers  # noqa: E402
from timm.layers import freeze_batch_norm_2d  # noqa: E402


def _tokens(seed: int) -> torch.Tensor:
    return torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(seed))


def _images(size: int, batch: int = 2):
    return lambda seed: torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=F64)


_TINY = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)
_NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def llama() -> nn.Module:
    cfg = transformers.LlamaConfig(vocab_size=64, max_position_embeddings=32, num_key_value_heads=1, **_TINY)
    return transformers.LlamaModel(cfg)


def bert() -> nn.Module:
    cfg = transformers.BertConfig(vocab_size=64, max_position_embeddings=32, **_TINY, **_NO_DROPOUT)
    return transformers.BertModel(cfg, add_pooling_layer=False)


def vit() -> nn.Module:
    cfg = transformers.ViTConfig(image_size=8, patch_size=4, **_TINY, **_NO_DROPOUT)
    return transformers.ViTModel(cfg, add_pooling_layer=False)


def frozen_resnet() -> nn.Module:
    return timm.create_model("test_resnet", pretrained=False, num_classes=3)  # frozen in _build, calibrated


def _calibrated_frozen(model: nn.Module, inputs) -> nn.Module:
    """timm's freeze_batch_norm_2d (BatchNorm2d -> torchvision's FrozenBatchNorm2d) after statistics of real
    batches (random running statistics would let the activations of a deep frozen net overflow)."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None
    with torch.no_grad():
        model.train()(inputs(10)), model(inputs(11))
    return freeze_batch_norm_2d(model)


# name: (builder, input for a seed, classes of the normalization modules it must hold, converted class)
MODELS = {
    "llama": (llama, _tokens, {"LlamaRMSNorm"}, Float32RMSNorm),
    "bert": (bert, _tokens, {"LayerNorm"}, nkt.LayerNorm),
    "vit": (vit, _images(8), {"LayerNorm"}, nkt.LayerNorm),
    "convnext": (lambda: timm.create_model("test_convnext", pretrained=False, num_classes=3), _images(32),
                 {"LayerNorm", "LayerNorm2d"}, None),
    "efficientnet": (lambda: timm.create_model("test_efficientnet", pretrained=False, num_classes=3),
                     _images(32, batch=4), {"BatchNormAct2d"}, TimmBatchNormAct2d),
    "efficientnet_gn": (lambda: timm.create_model("test_efficientnet_gn", pretrained=False, num_classes=3),
                        _images(32), {"GroupNormAct"}, None),
    "frozen_resnet": (frozen_resnet, _images(32), {"FrozenBatchNorm2d"}, nkt.FrozenBatchNorm2d),
}


def _output(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.last_hidden_state


def _build(name: str):
    builder, inputs, classes, _ = MODELS[name]
    torch.manual_seed(0)
    theirs = builder().to(F64)
    with torch.no_grad():  # non-trivial affine and running statistics (a fresh model has ones and zeros)
        gen = torch.Generator().manual_seed(1)
        for key, t in theirs.state_dict().items():
            if t.is_floating_point() and key.rsplit(".", 1)[-1] in ("weight", "bias", "running_mean", "running_var"):
                noise = torch.rand(t.shape, generator=gen, dtype=F64)
                t.copy_(0.5 + noise if key.endswith(("running_var", "weight")) else noise - 0.5)
    if name == "frozen_resnet":
        theirs = _calibrated_frozen(theirs, inputs)
    norms = [n for n, m in theirs.named_modules() if type(m).__name__ in classes]
    assert norms, f"{name} holds none of {classes}: the test would prove nothing"
    return theirs, inputs, norms


@pytest.mark.parametrize("name", sorted(MODELS))
def test_convert_real_models(name, policy):
    """Every normalization module is converted (none reported, none left that looks like one), the state_dict is
    the same (keys, values, the very tensors), eval outputs equal, and after 3 float64 SGD steps in training mode
    the parameters and running statistics equal the unconverted model's."""
    theirs, inputs, norms = _build(name)
    ours = copy.deepcopy(theirs)
    tensors = {k: v.data_ptr() for k, v in ours.state_dict().items()}
    out, report = nkt.convert(ours, report=True)
    assert out is ours
    assert report.skipped == []
    assert sorted(path for path, _, _ in report.converted) == sorted(norms)
    assert [n for n, m in ours.named_modules() if looks_like_norm(m)] == []
    target = MODELS[name][3]
    assert all(type(ours.get_submodule(n)).__module__.startswith("normkit_torch") for n in norms)
    if target is not None:
        assert all(type(ours.get_submodule(n)) is target for n in norms)
    assert {k: v.data_ptr() for k, v in ours.state_dict().items()} == tensors

    # transformers' RMSNorm computes in float32 even in a float64 model: "core" differs from torch's float32 there
    tol = dict(rtol=1e-5, atol=1e-6) if name == "llama" and policy == "core" else dict(rtol=1e-12, atol=1e-12)
    ours.eval(), theirs.eval()
    x = inputs(0)
    with torch.no_grad():
        torch.testing.assert_close(_output(ours(x)), _output(theirs(x)), **tol)

    ours.train(), theirs.train()
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (ours, theirs)]
    for step in range(3):
        x = inputs(step + 1)
        for model, opt in zip((ours, theirs), opts):
            opt.zero_grad()
            y = _output(model(x))
            (y * torch.linspace(-1, 1, y.numel(), dtype=F64).reshape(y.shape)).mean().backward()
            opt.step()
    mine, native = ours.state_dict(), theirs.state_dict()
    assert list(mine) == list(native)
    for key in native:
        torch.testing.assert_close(mine[key], native[key], **tol, msg=lambda m, k=key: f"{name} {k}: {m}")
    if name == "efficientnet":
        bn = ours.get_submodule(norms[0])
        assert int(bn.num_batches_tracked) == 3 and isinstance(bn, nn.BatchNorm2d)


# ---------------------------------------------------------------- numerics of the converted classes, per dtype


def _rms_classes():
    from transformers.models.helium.modeling_helium import HeliumRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.models.olmo2.modeling_olmo2 import Olmo2RMSNorm
    from transformers.models.t5.modeling_t5 import T5LayerNorm

    return {"llama": LlamaRMSNorm, "olmo": Olmo2RMSNorm, "float32_weight": HeliumRMSNorm, "t5": T5LayerNorm}


@pytest.mark.parametrize("form", ["llama", "olmo", "float32_weight", "t5"])
@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("input_dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_rms_family_numerics_and_casts(form, weight_dtype, input_dtype, policy):
    """Each transformers RMSNorm form converts to Float32RMSNorm with its output dtype and, under "auto", its very
    bits (float32 compute, the cast back in the same place), gradients included; "core" to float32 round-off."""
    theirs = _rms_classes()[form](6, eps=1e-5).to(weight_dtype)
    with torch.no_grad():
        theirs.weight.copy_(torch.linspace(0.5, 1.5, 6))
    ours = nkt.convert(nn.Sequential(copy.deepcopy(theirs)))[0]
    assert type(ours) is Float32RMSNorm and ours.form == form and ours.variance_epsilon == 1e-5
    assert list(ours.state_dict()) == ["weight"] and ours.weight.dtype == weight_dtype
    x = (3.0 + torch.randn(2, 3, 6, generator=torch.Generator().manual_seed(0), dtype=F64)).to(input_dtype)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    a, b = ours(xa), theirs(xb)
    assert a.dtype == b.dtype
    exact = policy == "auto" or torch.finfo(b.dtype).bits < 32
    tol = dict(rtol=0, atol=0) if exact else dict(rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(a, b, **tol)
    g = torch.linspace(-1, 1, a.numel(), dtype=a.dtype).reshape(a.shape)
    a.backward(g), b.backward(g)
    if form == "t5" and torch.finfo(input_dtype).bits < 32:
        # T5LayerNorm sums two half-precision-rounded gradient terms (x is used in its own dtype and in float32);
        # ours is the float32 gradient rounded once: T5LayerNorm's own gradient at the float32 input, cast
        x32 = x.to(torch.float32).requires_grad_(True)
        theirs(x32).backward(g)
        expected = x32.grad.to(input_dtype)
    else:
        expected = xb.grad
    torch.testing.assert_close(xa.grad, expected, **(tol if policy == "auto" else dict(rtol=1e-2, atol=1e-2)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_timm_layer_norm_2d_and_frozen_numerics(dtype, policy):
    """timm's LayerNorm2d (a permuted output, as timm's) and FrozenBatchNormAct2d / torchvision's FrozenBatchNorm2d:
    same values; the frozen ones differ by round-off only (normkit centres before scaling)."""
    from timm.layers import LayerNorm2d as TimmLayerNorm2d
    from timm.layers.norm_act import FrozenBatchNormAct2d
    from torchvision.ops.misc import FrozenBatchNorm2d as VisionFrozen

    x = torch.randn(2, 4, 3, 5, generator=torch.Generator().manual_seed(0), dtype=dtype)
    for theirs in (TimmLayerNorm2d(4), FrozenBatchNormAct2d(4, act_layer=nn.SiLU), VisionFrozen(4)):
        theirs = theirs.to(dtype)
        with torch.no_grad():
            for t in list(theirs.parameters()) + list(theirs.buffers()):
                t.copy_(torch.rand(t.shape, generator=torch.Generator().manual_seed(2), dtype=dtype) + 0.5)
        ours = nkt.convert(nn.Sequential(copy.deepcopy(theirs)))[0]
        assert type(ours).__module__.startswith("normkit_torch") and ours.state_dict().keys() == theirs.state_dict().keys()
        a, b = ours(x), theirs(x)
        if isinstance(ours, LayerNorm2d) and policy == "auto":
            assert a.stride() == b.stride()  # torch's kernel: channels-last memory, permuted back
        exact = policy == "auto" and isinstance(ours, LayerNorm2d)
        eps = torch.finfo(dtype).eps
        torch.testing.assert_close(a, b, rtol=0 if exact else 8 * eps, atol=0 if exact else 8 * eps)


# ---------------------------------------------------------------- what is not converted, and register_conversion


class ScaledNorm(nn.Module):
    """A user's normalization layer normkit does not know: weight and eps, its own forward."""

    def __init__(self, n: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(n)), eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * x / (x.norm(dim=-1, keepdim=True) + self.eps)


class GemmaLikeRMSNorm(nn.Module):
    """weight and variance_epsilon, but ``(1 + weight)``: the RMSNorm shape with a forward of another form."""

    def __init__(self, n: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight, self.variance_epsilon = nn.Parameter(torch.zeros(n)), eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return (h * (1.0 + self.weight.float())).type_as(x)


def test_report_names_every_norm_left_and_register_conversion_adds_one():
    """A norm-looking module convert cannot take is named (path, class, reason) and warned about, never silent;
    a class with the RMSNorm attributes but another forward is not converted; register_conversion converts a
    class (its function's module used), refuses a second registration unless replace=True, and a function
    returning None leaves the module (reported)."""
    net = nn.Sequential(nn.Linear(6, 6), ScaledNorm(6), GemmaLikeRMSNorm(6), nn.LayerNorm(6))
    with pytest.warns(nkt.UnconvertedNormWarning, match=r"1 \(ScaledNorm\).*2 \(GemmaLikeRMSNorm\)"):
        nkt.convert(net)
    _, report = nkt.convert(net, report=True)
    assert [(p, c) for p, c, _ in report.skipped] == [("1", "ScaledNorm"), ("2", "GemmaLikeRMSNorm")]
    assert "register_conversion" in report.skipped[0][2]
    assert type(net[2]) is GemmaLikeRMSNorm and type(net[3]) is nkt.LayerNorm

    def to_rms(m: ScaledNorm) -> nn.Module:
        return nkt.RMSNorm(6, eps=m.eps)

    try:
        nkt.register_conversion(ScaledNorm, to_rms)
        with pytest.raises(ValueError, match="ScaledNorm already has a conversion"):
            nkt.register_conversion(ScaledNorm, lambda m: None)
        _, report = nkt.convert(net, report=True)
        assert report.converted == [("1", "ScaledNorm", "RMSNorm")] and type(net[1]) is nkt.RMSNorm
        nkt.register_conversion(GemmaLikeRMSNorm, lambda m: None, replace=True)
        _, report = nkt.convert(net, report=True)
        assert [(p, c) for p, c, _ in report.skipped] == [("2", "GemmaLikeRMSNorm")]
        assert "declined" in report.skipped[0][2]
    finally:
        from normkit_torch import _conversions

        _conversions._REGISTRY.pop(ScaledNorm, None), _conversions._REGISTRY.pop(GemmaLikeRMSNorm, None)
    with pytest.raises(TypeError, match="cls must be a torch.nn.Module subclass, got 3"):
        nkt.register_conversion(3, to_rms)
    with pytest.raises(TypeError, match="convert_fn must be callable, got int"):
        nkt.register_conversion(ScaledNorm, 3)


def test_timm_fast_norm_is_reported_not_converted():
    """timm's fast-norm path (other numerics under autocast) is left and reported, not converted silently."""
    from timm.layers import LayerNorm as TimmLayerNorm

    ln = TimmLayerNorm(4)
    ln._fast_norm = True
    _, report = nkt.convert(nn.Sequential(ln), report=True)
    assert [(p, c) for p, c, _ in report.skipped] == [("0", "LayerNorm")] and "fast_norm" in report.skipped[0][2]
