"""Peak memory of the tensors a block of code allocates, on CPU and CUDA, isolated from the rest of the process.

    from bench.memory import peak_tensor_bytes
    result, peak = peak_tensor_bytes(fn)

CUDA: ``torch.cuda.max_memory_allocated`` after a reset, minus what was allocated before. CPU has no allocator
statistics, so :class:`CpuTensorMemory` counts them itself: a ``TorchDispatchMode`` sees every tensor an operator
returns (forward and backward), adds the bytes of each new storage when it appears and removes them when the
storage is freed (a ``weakref.finalize`` on it). The peak is that of tensors allocated inside the block and alive at
the same time: inputs and anything allocated before do not count, scratch memory inside one C++ kernel does not
either (the fused kernels allocate none besides their outputs). Unlike the process's resident set size it is not
blurred by allocator caching or by other threads. The mode slows operators down: never time inside it.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class CpuTensorMemory(TorchDispatchMode):
    """Live and peak bytes of the CPU storages created while the mode is active."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._alive: set[int] = set()

    def _track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key, size = storage.data_ptr(), storage.nbytes()
        if size == 0 or key in self._alive:
            return
        self._alive.add(key)
        self.live += size
        self.peak = max(self.peak, self.live)

        def freed(key=key, size=size):
            self.live -= size
            self._alive.discard(key)

        weakref.finalize(storage, freed)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.untyped_storage().data_ptr() not in inputs:
                self._track(t)
        return out


def peak_tensor_bytes(fn, device: torch.device | str = "cpu"):
    """``(fn(), peak bytes of the tensors fn allocated)`` on ``device`` (see the module docstring)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        result = fn()
        torch.cuda.synchronize()
        return result, torch.cuda.max_memory_allocated() - base
    mode = CpuTensorMemory()
    with mode:
        result = fn()
    return result, mode.peak
