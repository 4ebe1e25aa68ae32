"""Peak memory of the tensors a block of code allocates, on CPU and CUDA, isolated from the rest of the process.

    from bench.memory import peak_tensor_bytes
    result, peak = peak_tensor_bytes(fn)

CUDA: ``torch.cuda.max_memory_allocated`` after a reset, minus what was allocated before. CPU has no allocator
statistics, so the call runs under ``torch.profiler`` with ``profile_memory=True``, which records every allocation
and free of PyTorch's CPU allocator (forward, backward and forward-mode passes, C++ kernels included) with its size
and time. The peak is the largest running sum of those events: the most memory the block held at once beyond what
was held before it (a free of an older tensor counts against it). Unlike the process's resident set size it is not
blurred by allocator caching, by the interpreter or by other threads. The profiler slows the call down: never time
inside it.
"""

from __future__ import annotations

import torch


def _cpu_peak(fn):
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.typed[0] == _EventType.Allocation and node.typed[1].device.type == "cpu":
            events.append((node.start_time_ns, node.typed[1].alloc_size))
    live = peak = 0
    for _, size in sorted(events):
        live += size
        peak = max(peak, live)
    return result, peak


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
    return _cpu_peak(fn)
