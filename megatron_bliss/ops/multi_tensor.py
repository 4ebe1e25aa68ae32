"""Multi-tensor reductions and updates over lists of tensors: what the bilevel z-solver does to a whole parameter list.

Each public op takes lists (one tensor per proxy parameter) and does its work in one call instead of a Python loop
over parameters: per-tensor dot products and L2 norms, ``out = a x + b y``, and the fused z-solver step of BLISS §3
(``v = Hz - F_y + μ z``; ``v_k ← v_k · c/‖v_k‖`` where ``‖v_k‖ > c``; ``z ← z - η v``).

Two implementations with one contract:
- ``megatron_bliss._C`` (``csrc/``), used when it was built and supports the tensors' device (CPU; CUDA when built
  with CUDA) and dtype;
- the ``reference_*`` functions, plain PyTorch (``torch._foreach_*`` where one exists), used otherwise and kept
  public so that tests compare the two. ``MEGATRON_BLISS_DISABLE_EXT=1`` forces them.

Contract: lists have equal length; the k-th tensors of all lists have the same shape and dtype; all tensors are on one
device and floating point (float32, float64, bfloat16, float16; a list may mix dtypes across k). Reductions return a
float64 tensor ``[n]`` on that device, accumulated in float64 (in float32 within blocks of a 16-bit tensor). Any
strides are accepted (non-contiguous tensors cost a copy in ``_C``). The ops are not differentiable: they run under
``torch.no_grad()``, and in-place ones bump the version counter of what they write, like PyTorch in-place ops.
The total norm of a list is ``torch.linalg.vector_norm(multi_tensor_norm(xs))``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence

import torch

from megatron_bliss.ops import _ext

__all__ = [
    "multi_tensor_dot",
    "multi_tensor_norm",
    "multi_tensor_z_update",
    "multi_tensor_axpby",
    "reference_multi_tensor_dot",
    "reference_multi_tensor_norm",
    "reference_multi_tensor_z_update",
    "reference_multi_tensor_axpby",
    "ops_path",
]

TensorList = Sequence[torch.Tensor]

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_LOW_PRECISION = (torch.bfloat16, torch.float16)


def _op_dtype(dtype: torch.dtype) -> torch.dtype:
    """Arithmetic dtype of a storage dtype: float32 for the 16-bit types, the dtype itself otherwise."""
    return torch.float32 if dtype in _LOW_PRECISION else dtype


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of a reduction: float32 for the 16-bit types, float64 otherwise."""
    return torch.float32 if dtype in _LOW_PRECISION else torch.float64


def _check(op: str, names: Sequence[str],
           lists: Sequence[TensorList]) -> tuple[list[list[torch.Tensor]], torch.device | None]:
    """Validates the op's contract; returns the lists as lists and their common device (None when empty)."""
    as_lists = [list(xs) for xs in lists]
    n = len(as_lists[0])
    for name, xs in zip(names, as_lists):
        if len(xs) != n:
            raise ValueError(f"{op}: {name} has {len(xs)} tensors but {names[0]} has {n}")
    if n == 0:
        return as_lists, None
    device = as_lists[0][0].device
    for name, xs in zip(names, as_lists):
        for k, (t, first) in enumerate(zip(xs, as_lists[0])):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{op}: {name}[{k}] is a {type(t).__name__}, not a tensor")
            if t.dtype not in _FLOAT_DTYPES:
                raise TypeError(f"{op}: {name}[{k}] has dtype {t.dtype}; "
                                "expected float32, float64, bfloat16 or float16")
            if t.device != device:
                raise ValueError(f"{op}: {name}[{k}] is on {t.device} but {names[0]}[0] is on {device}")
            if t.shape != first.shape or t.dtype != first.dtype:
                raise ValueError(f"{op}: {name}[{k}] is {tuple(t.shape)} {t.dtype} but {names[0]}[{k}] is "
                                 f"{tuple(first.shape)} {first.dtype}")
    return as_lists, device


def _dtype_groups(xs: list[torch.Tensor]) -> dict[torch.dtype, list[int]] | None:
    """Indices of each dtype when ``xs`` mixes dtypes, None when it has one (the common case: one call)."""
    first = xs[0].dtype
    if all(x.dtype == first for x in xs):
        return None
    groups: dict[torch.dtype, list[int]] = defaultdict(list)
    for k, x in enumerate(xs):
        groups[x.dtype].append(k)
    return groups


def _use_ext(device: torch.device) -> bool:
    return _ext.ext_supports(device)


def ops_path(device: torch.device | str = "cpu") -> str:
    """Which implementation the ops use on ``device``: ``"_C"`` (the compiled extension) or ``"reference"``."""
    return "_C" if _use_ext(torch.device(device)) else "reference"


def _reduce(lists: list[list[torch.Tensor]], device: torch.device | None, ext_name: str | None,
            ref_fn: Callable[..., torch.Tensor]) -> torch.Tensor:
    """Runs a per-tensor reduction once per dtype group into a float64 [n] tensor: ``_C.<ext_name>`` when the
    extension supports the device (and ``ext_name`` is given), else ``ref_fn``."""
    if device is None:
        return torch.empty(0, dtype=torch.float64)
    ext = _ext.get_ext() if ext_name is not None and _use_ext(device) else None
    fn = getattr(ext, ext_name) if ext is not None else ref_fn
    groups = _dtype_groups(lists[0])
    if groups is None:
        return fn(*lists)
    out = torch.empty(len(lists[0]), dtype=torch.float64, device=device)
    for indices in groups.values():
        out[torch.tensor(indices, device=device)] = fn(*[[xs[k] for k in indices] for xs in lists])
    return out


# ----------------------------------------------------------------------------------------------------- references


def _ref_dot(xs: list[torch.Tensor], ys: list[torch.Tensor]) -> torch.Tensor:
    acc = _acc_dtype(xs[0].dtype)  # one dtype per call (see _reduce)
    dots = [torch.dot(x.reshape(-1).to(acc), y.reshape(-1).to(acc)) for x, y in zip(xs, ys)]
    return torch.stack(dots).to(torch.float64)


def _ref_norm(xs: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(torch._foreach_norm(xs, 2, dtype=_acc_dtype(xs[0].dtype))).to(torch.float64)


def _ref_z_update(hz: list[torch.Tensor], g: list[torch.Tensor], z: list[torch.Tensor], mu: float, eta: float,
                  clip: float) -> torch.Tensor:
    op = _op_dtype(z[0].dtype)
    hz_o, g_o, z_o = ([t.to(op) for t in ts] for ts in (hz, g, z))
    v = torch._foreach_sub(hz_o, g_o)
    torch._foreach_add_(v, z_o, alpha=mu)
    norms = torch.stack(torch._foreach_norm(v, 2, dtype=torch.float64))
    scale = torch.where(norms > clip, clip / norms, torch.ones_like(norms))  # no host sync
    torch._foreach_mul_(v, list(scale.to(op).unbind()))
    torch._foreach_add_(z, v, alpha=-eta)
    return norms


def _ref_axpby(out: list[torch.Tensor], xs: list[torch.Tensor], ys: list[torch.Tensor], a: float, b: float) -> None:
    op = _op_dtype(out[0].dtype)
    result = torch._foreach_mul([x.to(op) for x in xs], a)  # new tensors: out may alias xs or ys
    torch._foreach_add_(result, [y.to(op) for y in ys], alpha=b)
    torch._foreach_copy_(out, result)


@torch.no_grad()
def reference_multi_tensor_dot(xs: TensorList, ys: TensorList) -> torch.Tensor:
    """PyTorch reference of :func:`multi_tensor_dot` (same contract)."""
    lists, device = _check("multi_tensor_dot", ("xs", "ys"), (xs, ys))
    return _reduce(lists, device, None, _ref_dot)


@torch.no_grad()
def reference_multi_tensor_norm(xs: TensorList) -> torch.Tensor:
    """PyTorch reference of :func:`multi_tensor_norm` (same contract)."""
    lists, device = _check("multi_tensor_norm", ("xs",), (xs,))
    return _reduce(lists, device, None, _ref_norm)


@torch.no_grad()
def reference_multi_tensor_z_update(hz: TensorList, g: TensorList, z: TensorList, mu: float, eta: float,
                                    clip: float = 1.0) -> torch.Tensor:
    """PyTorch reference of :func:`multi_tensor_z_update` (same contract)."""
    return _z_update(hz, g, z, mu, eta, clip, force_reference=True)


@torch.no_grad()
def reference_multi_tensor_axpby(out: TensorList, xs: TensorList, ys: TensorList, a: float, b: float) -> None:
    """PyTorch reference of :func:`multi_tensor_axpby` (same contract)."""
    _axpby(out, xs, ys, a, b, force_reference=True)


# ------------------------------------------------------------------------------------------------------ public ops


@torch.no_grad()
def multi_tensor_dot(xs: TensorList, ys: TensorList) -> torch.Tensor:
    """Per-tensor dot products ⟨x_k, y_k⟩ (over all elements) in one call.

    Args:
        xs: n floating tensors on one device.
        ys: n tensors, ``ys[k]`` of the shape and dtype of ``xs[k]``.

    Returns:
        float64 tensor ``[n]`` on the tensors' device (CPU for empty lists); the total is ``.sum()``.
    """
    lists, device = _check("multi_tensor_dot", ("xs", "ys"), (xs, ys))
    return _reduce(lists, device, "multi_tensor_dot", _ref_dot)


@torch.no_grad()
def multi_tensor_norm(xs: TensorList) -> torch.Tensor:
    """Per-tensor L2 norms ‖x_k‖ in one call.

    Args:
        xs: n floating tensors on one device.

    Returns:
        float64 tensor ``[n]`` on the tensors' device (CPU for empty lists); the norm of the whole list is
        ``torch.linalg.vector_norm(result)``.
    """
    lists, device = _check("multi_tensor_norm", ("xs",), (xs,))
    return _reduce(lists, device, "multi_tensor_norm", _ref_norm)


def _check_scalars(op: str, clip: float) -> None:
    if not clip > 0:  # also rejects NaN
        raise ValueError(f"{op}: clip must be > 0 (float('inf') for no clipping), got {clip}")


def _z_update(hz: TensorList, g: TensorList, z: TensorList, mu: float, eta: float, clip: float,
              force_reference: bool) -> torch.Tensor:
    _check_scalars("multi_tensor_z_update", clip)
    (z_l, hz_l, g_l), device = _check("multi_tensor_z_update", ("z", "hz", "g"), (z, hz, g))
    if device is None:
        return torch.empty(0, dtype=torch.float64)
    ext = None if force_reference or not _use_ext(device) else _ext.get_ext()

    def run(hz_g: list[torch.Tensor], g_g: list[torch.Tensor], z_g: list[torch.Tensor]) -> torch.Tensor:
        if ext is not None:
            return ext.multi_tensor_z_update(hz_g, g_g, z_g, float(mu), float(eta), float(clip))
        return _ref_z_update(hz_g, g_g, z_g, float(mu), float(eta), float(clip))

    groups = _dtype_groups(z_l)
    if groups is None:
        return run(hz_l, g_l, z_l)
    norms = torch.empty(len(z_l), dtype=torch.float64, device=device)
    for indices in groups.values():
        hz_i, g_i, z_i = ([ts[k] for k in indices] for ts in (hz_l, g_l, z_l))
        norms[torch.tensor(indices, device=device)] = run(hz_i, g_i, z_i)
    return norms


@torch.no_grad()
def multi_tensor_z_update(hz: TensorList, g: TensorList, z: TensorList, mu: float, eta: float,
                          clip: float = 1.0) -> torch.Tensor:
    """One fused step of BLISS's z-solver (§3), in place on ``z``.

    ``v = hz - g + mu * z``; per tensor, ``v_k ← v_k · clip/‖v_k‖`` where ``‖v_k‖ > clip``;
    then ``z ← z - eta v``.
    ``v`` is never materialized: the op reads ``hz, g, z`` twice (norms, then update) and writes ``z`` once.

    Args:
        hz: H·z, one tensor per parameter (the Hessian-vector product of the lower objective along z).
        g: F_y, the validation gradient, same shapes.
        z: the current iterate, updated in place.
        mu: damping μ of ``H + μI``.
        eta: step size η_z.
        clip: per-tensor norm bound c (> 0; ``float('inf')`` disables clipping).

    Returns:
        float64 tensor ``[n]``: ‖v_k‖ before clipping (the solver's residual norms), on z's device.
    """
    return _z_update(hz, g, z, mu, eta, clip, force_reference=False)


def _axpby(out: TensorList, xs: TensorList, ys: TensorList, a: float, b: float, force_reference: bool) -> None:
    (out_l, xs_l, ys_l), device = _check("multi_tensor_axpby", ("out", "xs", "ys"), (out, xs, ys))
    if device is None:
        return
    ext = None if force_reference or not _use_ext(device) else _ext.get_ext()
    groups = _dtype_groups(out_l)
    for indices in groups.values() if groups is not None else [range(len(out_l))]:
        o, x, y = ([ts[k] for k in indices] for ts in (out_l, xs_l, ys_l))
        if ext is not None:
            ext.multi_tensor_axpby(o, x, y, float(a), float(b))
        else:
            _ref_axpby(o, x, y, float(a), float(b))


@torch.no_grad()
def multi_tensor_axpby(out: TensorList, xs: TensorList, ys: TensorList, a: float, b: float) -> None:
    """``out_k = a x_k + b y_k`` for every k, in place on ``out`` (the vector update of CG and similar solvers).

    Args:
        out: n tensors written in place; ``out[k]`` may be ``xs[k]`` or ``ys[k]`` itself (e.g. ``x ← x + α p``).
        xs: n tensors of the shapes and dtypes of ``out``.
        ys: n tensors of the shapes and dtypes of ``out``.
        a: coefficient of ``xs``.
        b: coefficient of ``ys``.
    """
    _axpby(out, xs, ys, a, b, force_reference=False)
