"""Loading of the compiled extension ``megatron_bliss._C`` (built from ``csrc/`` by ``setup.py``).

The extension is optional. It is imported lazily, on the first question asked of this module, and the reason it is
unavailable is kept for :mod:`megatron_bliss.info` and for error messages: not built (torch missing at build time, a
failed compile, an isolated pip build), built against another torch (an undefined symbol at import), or turned off
with ``MEGATRON_BLISS_DISABLE_EXT=1``, which forces the PyTorch reference ops everywhere (read once, at that first
load).
"""

from __future__ import annotations

import importlib
import os
import threading
from types import ModuleType

import torch

DISABLE_ENV = "MEGATRON_BLISS_DISABLE_EXT"

_lock = threading.Lock()
_loaded = False
_module: ModuleType | None = None
_error: str | None = None


def _load() -> ModuleType | None:
    global _loaded, _module, _error
    if _loaded:
        return _module
    with _lock:
        if _loaded:
            return _module
        if os.environ.get(DISABLE_ENV, "0") not in ("", "0"):
            _error = f"disabled by {DISABLE_ENV}={os.environ[DISABLE_ENV]}"
        else:
            try:
                # torch is imported above: _C links against libtorch, whose symbols torch's import makes visible.
                _module = importlib.import_module("megatron_bliss._C")
            except ImportError as exc:  # not built, or built against another torch/Python
                _error = f"{type(exc).__name__}: {exc}"
        _loaded = True
    return _module


def get_ext() -> ModuleType | None:
    """Returns the ``megatron_bliss._C`` module, or None when it is unavailable (see :func:`ext_error`)."""
    return _load()


def ext_available() -> bool:
    """Whether ``megatron_bliss._C`` imported (and is not disabled by ``MEGATRON_BLISS_DISABLE_EXT``)."""
    return _load() is not None


def ext_error() -> str | None:
    """Why the extension is unavailable, or None when it loaded."""
    _load()
    return _error


def ext_has_cuda() -> bool:
    """Whether the loaded extension was compiled with its CUDA kernels."""
    module = _load()
    return bool(module is not None and module.has_cuda())


def ext_supports(device: torch.device) -> bool:
    """Whether the extension can run on ``device``: CPU always once loaded, CUDA when compiled with CUDA."""
    if device.type == "cpu":
        return ext_available()
    if device.type == "cuda":
        return ext_has_cuda()
    return False
