"""CPU redirections that megatron-core needs to run without CUDA; inactive when CUDA is present.

megatron-core 0.16 allocates with ``device=torch.cuda.current_device()`` in about a hundred places, hard-codes
``device="cuda"`` in schedules, optimizers and masks, and keeps its dropout RNG states in a CUDA tracker. On a
machine without CUDA (our CI, laptops) :func:`apply_cpu_shims` redirects exactly those seams to the CPU:

- S1 ``torch.cuda.current_device`` returns ``"cpu"``.
- S2 a CPU RNG-states tracker replaces megatron's CUDA one (same seed offsets, so dropout semantics match GPU runs),
  and megatron's private ``_get/_set_cuda_rng_state`` use the CPU generator (activation recompute replays masks).
- S3 a thread-local ``TorchFunctionMode`` rewrites ``device="cuda"`` literals, ``Tensor.cuda()`` and
  ``Tensor.to("cuda")`` to the CPU, and reports ``torch.cuda.FloatTensor`` from an argument-less ``Tensor.type()``
  (megatron's optimizers check that string).
- S4 ``torch.cuda.synchronize`` is a no-op (dist-checkpointing's writer calls it).
- S6 DistributedOptimizer checkpoint loading with plain ``torch.optim`` (no TE/apex): copy under ``no_grad`` and
  skip the per-parameter ``step`` a torch-optim checkpoint lacks.

:func:`enable_forward_ad` (S7) is separate: it swaps megatron's tensor-parallel autograd Functions (which have no
``jvp`` rule) for plain ``F.linear``/identity, which is exact only at tensor-parallel size 1.

Every redirection was measured against a 1-process or plain-torch reference (see the tests). Apply the shims after
``torch.distributed`` is initialized and before any model or optimizer is built.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

logger = logging.getLogger(__name__)

_APPLIED = False
_LOCK = threading.Lock()
_CUDA_TYPE_STRINGS = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
    torch.float64: "torch.cuda.DoubleTensor",
}


def cpu_shims_needed() -> bool:
    """True when megatron-core must be redirected to the CPU (no usable CUDA device)."""
    return not torch.cuda.is_available()


def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return False


class _CpuDeviceMode(TorchFunctionMode):
    """S3: rewrites CUDA device literals to the CPU (entered once per thread, never exited)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.to:
            if len(args) > 1 and _is_cuda_device(args[1]):
                args = (args[0], "cpu", *args[2:])
        elif func is torch.Tensor.type and len(args) == 1 and "dtype" not in kwargs:
            tensor = args[0]
            if tensor.device.type == "cpu" and tensor.dtype in _CUDA_TYPE_STRINGS:
                return _CUDA_TYPE_STRINGS[tensor.dtype]
        return func(*args, **kwargs)


_thread_state = threading.local()


def _enter_device_mode() -> None:
    if getattr(_thread_state, "mode", None) is None:
        mode = _CpuDeviceMode()
        mode.__enter__()
        _thread_state.mode = mode


def _install_rng_tracker() -> None:
    """S2: a CPU tracker with megatron's tracker API, plus CPU versions of its private RNG state accessors."""
    from megatron.core import tensor_parallel
    from megatron.core.tensor_parallel import random as mrandom

    class CpuRNGStatesTracker(mrandom.CudaRNGStatesTracker):
        """Keeps named CPU generator states; ``fork`` swaps the global CPU generator state in and out."""

        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            self.seeds_.add(seed)
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            gen = torch.Generator("cpu")
            gen.manual_seed(seed)
            self.states_[name] = gen.get_state()

        @contextlib.contextmanager
        def fork(self, name=mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            orig = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(orig)

    def get_state(device=None, clone=False, graph_safe=False):
        return torch.get_rng_state()

    def set_state(new_state, device=-1, graph_safe=False):
        torch.set_rng_state(new_state)

    def cpu_manual_seed(seed, te_rng_tracker=False, inference_rng_tracker=False, use_cudagraphable_rng=False,
                        tp_rank=None, ep_rank=None, etp_rank=None, force_reset_rng=False):
        from megatron.core import parallel_state as ps

        tp_rank = ps.get_tensor_model_parallel_rank() if tp_rank is None else tp_rank
        ep_rank = ps.get_expert_model_parallel_rank() if ep_rank is None else ep_rank
        etp_rank = ps.get_expert_tensor_parallel_rank() if etp_rank is None else etp_rank
        tracker = CpuRNGStatesTracker()
        mrandom._CUDA_RNG_STATE_TRACKER = tracker
        mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
        torch.manual_seed(seed)
        tracker.add(mrandom._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
        tracker.add(mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + tp_rank)
        tracker.add(mrandom._EXPERT_PARALLEL_RNG_TRACKER_NAME, seed + 1024 + 100 * ep_rank + etp_rank)

    mrandom._get_cuda_rng_state = get_state
    mrandom._set_cuda_rng_state = set_state
    mrandom.model_parallel_cuda_manual_seed = cpu_manual_seed
    tensor_parallel.model_parallel_cuda_manual_seed = cpu_manual_seed
    tracker = CpuRNGStatesTracker()
    mrandom._CUDA_RNG_STATE_TRACKER = tracker
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True


def _patch_distrib_optimizer_loading() -> None:
    """S6: DistributedOptimizer state loading when the inner optimizer is plain torch.optim."""
    from megatron.core.optimizer import distrib_optimizer as dopt

    original = dopt.DistributedOptimizer._set_main_param_and_optimizer_states
    if getattr(original, "_megatron_bliss_patched", False):
        return

    @functools.wraps(original)
    def patched(self, model_param, tensors):
        # megatron copies every key the optimizer holds; torch's AdamW keeps a per-parameter `step` that a
        # checkpoint of the fully-reshardable format does not carry: keep the current value for missing keys
        tensors = {k: v for k, v in tensors.items() if v is not None}
        if not self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            group_index, group_order = self.model_param_group_index_map[model_param]
            main_param = self.optimizer.param_groups[group_index]["params"][group_order]
            for key, value in self.optimizer.state[main_param].items():
                tensors.setdefault(key, value)
        with torch.no_grad():
            return original(self, model_param, tensors)

    patched._megatron_bliss_patched = True
    dopt.DistributedOptimizer._set_main_param_and_optimizer_states = patched


def apply_cpu_shims() -> bool:
    """Redirects megatron-core's CUDA assumptions to the CPU when CUDA is absent.

    Idempotent; the device-literal mode is entered once per calling thread.

    Returns:
        True when the shims are active (no CUDA), False when CUDA is present and nothing was changed.
    """
    global _APPLIED
    if not cpu_shims_needed():
        return False
    with _LOCK:
        if not _APPLIED:
            torch.cuda.current_device = lambda: "cpu"  # S1
            torch.cuda.synchronize = lambda *a, **k: None  # S4
            _install_rng_tracker()  # S2
            _patch_distrib_optimizer_loading()  # S6
            _APPLIED = True
            logger.debug("megatron-core CPU shims applied")
    _enter_device_mode()  # S3
    return True


_FORWARD_AD_ENABLED = False


def enable_forward_ad() -> None:
    """S7: lets ``torch.func.jvp``/``forward_ad`` pass through megatron-core linear layers (tensor-parallel size 1).

    megatron's tensor-parallel mapping and linear autograd Functions have no ``jvp`` rule. At TP=1 they are an
    identity and ``F.linear``, so they are swapped for those; the logits are bit-identical. Raises at TP>1, where
    the swap would drop the collectives.
    """
    global _FORWARD_AD_ENABLED
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import layers

    if ps.model_parallel_is_initialized() and ps.get_tensor_model_parallel_world_size() > 1:
        raise RuntimeError("forward-mode AD through megatron-core layers needs tensor_model_parallel_size=1")
    if _FORWARD_AD_ENABLED:
        return

    def identity(input_, *args, **kwargs):
        return input_

    def linear(input, weight, bias, *args, **kwargs):
        return F.linear(input, weight, bias)

    for name in ("copy_to_tensor_model_parallel_region", "reduce_from_tensor_model_parallel_region",
                 "gather_from_tensor_model_parallel_region", "scatter_to_tensor_model_parallel_region"):
        setattr(layers, name, identity)
    layers.linear_with_grad_accumulation_and_async_allreduce = linear
    layers.linear_with_frozen_weight = linear
    _FORWARD_AD_ENABLED = True
