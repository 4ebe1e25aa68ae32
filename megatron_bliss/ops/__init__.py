"""Numerics ops: each has a fast path and a plain-PyTorch reference with the same contract.

- :mod:`megatron_bliss.ops.multi_tensor`: per-tensor dot/norm, ``a x + b y`` and the fused z-solver step over
  parameter lists, on the compiled ``megatron_bliss._C`` (``csrc/``) when it was built, else the reference.
- :mod:`megatron_bliss.ops.reference`: twice-differentiable losses on logits for the second-order path.
- :mod:`megatron_bliss.ops._ext`: loading of ``megatron_bliss._C`` and why it did not load.
"""

import importlib.util

from megatron_bliss.ops._ext import ext_available, ext_error, ext_has_cuda
from megatron_bliss.ops.multi_tensor import (
    multi_tensor_axpby,
    multi_tensor_dot,
    multi_tensor_norm,
    multi_tensor_z_update,
    ops_path,
    reference_multi_tensor_axpby,
    reference_multi_tensor_dot,
    reference_multi_tensor_norm,
    reference_multi_tensor_z_update,
)

__all__ = [
    "multi_tensor_dot", "multi_tensor_norm", "multi_tensor_z_update", "multi_tensor_axpby",
    "reference_multi_tensor_dot", "reference_multi_tensor_norm", "reference_multi_tensor_z_update",
    "reference_multi_tensor_axpby", "ops_path", "ext_available", "ext_error", "ext_has_cuda",
]

# The losses module is optional in a partial checkout; when it exists, its own import errors must surface.
if importlib.util.find_spec("megatron_bliss.ops.reference") is not None:
    from megatron_bliss.ops import reference  # noqa: F401

    __all__.append("reference")
