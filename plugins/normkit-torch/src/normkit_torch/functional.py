"""normkit_torch's functional API, shaped like ``torch.nn.functional``: what every module's forward calls.

    import normkit_torch.functional as NF
    y = NF.batch_norm(x, running_mean, running_var, weight, bias, training=True)  # buffers updated in place
    y = NF.layer_norm(x, (768,), weight, bias)

Same arguments, defaults, in-place buffer updates and errors as ``torch.nn.functional``'s
namesakes. Under the kernel policy ``"auto"`` (default) each computes with torch's own kernel, on
every device; under ``normkit_torch.set_kernel_policy("core")`` with the normkit core (exact at
large data offsets, where torch's float32 kernels are about 1e-3 off). For normkit's pure,
any-library functions (new running statistics returned, nothing mutated) use ``normkit.batch_norm``
and friends: on torch tensors they reach the same torch kernels.
"""

from normkit_torch._functional import (
    batch_norm,
    get_kernel_policy,
    group_norm,
    instance_norm,
    layer_norm,
    rms_norm,
    set_kernel_policy,
)

__all__ = [
    "batch_norm",
    "instance_norm",
    "layer_norm",
    "group_norm",
    "rms_norm",
    "set_kernel_policy",
    "get_kernel_policy",
]
