"""Process groups, devices, seeds and rank helpers: the one place that knows about distributed execution.

:func:`initialize` reads torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``), initializes ``torch.distributed`` (NCCL with CUDA, gloo without), megatron-core's
``parallel_state`` with the tensor/pipeline sizes of a :class:`ParallelConfig`, applies the CPU shims when CUDA is
absent, and seeds every generator deterministically per rank. A plain ``python`` process (no torchrun variables) is
a world of one. Model and bilevel code stay single-device; where they need a collective they take the group and
call the primitives below (:func:`all_reduce`, :func:`all_reduce_tensors`, :func:`all_gather_object`, ...), each a
no-op for a group of one. :func:`initialize` may be called once per stage; its docstring says what it keeps.
"""

from __future__ import annotations

import datetime
import logging
import os
import random
import socket
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from megatron_bliss import compat

logger = logging.getLogger(__name__)


@dataclass
class ParallelConfig:
    """Parallel layout of one job; data-parallel size is derived as world_size / (tp * pp)."""

    tensor_model_parallel_size: int = 1
    """Tensor-parallel size (TP): shards every linear layer's weights across this many ranks."""
    pipeline_model_parallel_size: int = 1
    """Pipeline-parallel size (PP): splits the layers into this many stages."""
    virtual_pipeline_model_parallel_size: int | None = None
    """Model chunks per pipeline stage for the interleaved schedule; None disables interleaving."""
    seed: int = 1234
    """Base seed; data-parallel ranks share it, tensor-parallel ranks offset it as megatron-core does."""
    backend: str | None = None
    """torch.distributed backend; None picks nccl with CUDA and gloo without."""
    timeout_minutes: int = 30
    """Collective timeout."""

    def __post_init__(self):
        for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"parallel.{name} must be >= 1, got {getattr(self, name)}")
        vpp = self.virtual_pipeline_model_parallel_size
        if vpp is not None and (vpp < 1 or self.pipeline_model_parallel_size < 2):
            raise ValueError("parallel.virtual_pipeline_model_parallel_size needs pipeline_model_parallel_size >= 2")

    def data_parallel_size(self, world_size: int) -> int:
        """Returns the data-parallel size for ``world_size`` ranks, or raises if the layout does not fit."""
        model_parallel = self.tensor_model_parallel_size * self.pipeline_model_parallel_size
        if world_size % model_parallel:
            raise ValueError(
                f"world size {world_size} is not divisible by tensor_model_parallel_size "
                f"({self.tensor_model_parallel_size}) x pipeline_model_parallel_size "
                f"({self.pipeline_model_parallel_size})")
        return world_size // model_parallel


def get_device() -> torch.device:
    """The device this rank computes on: ``cuda:LOCAL_RANK`` with CUDA, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def seed_everything(seed: int) -> None:
    """Seeds Python, numpy and torch (and megatron's tracker) for this rank."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    from megatron.core import tensor_parallel
    from megatron.core.tensor_parallel import random as mrandom

    # after apply_cpu_shims the attribute is the CPU version; read it at call time
    (mrandom.model_parallel_cuda_manual_seed if compat.cpu_shims_needed()
     else tensor_parallel.model_parallel_cuda_manual_seed)(seed)


def _current_layout() -> tuple | None:
    """(TP, PP, VPP) of megatron-core's model-parallel groups, or None when they are not built."""
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return None
    return (ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size(),
            ps.get_virtual_pipeline_model_parallel_world_size())


def initialize(cfg: ParallelConfig) -> None:
    """Prepares this process for ``cfg``: safe to call at the start of every stage of one process.

    What a call does, and what a repeated call does:

    - ``torch.distributed``: the first call initializes the default process group (backend and timeout of that
      call); later calls reuse it unchanged, whatever their ``backend``/``timeout_minutes``.
    - CPU shims (:func:`compat.apply_cpu_shims`, without CUDA): applied once per process; repeated calls are
      no-ops.
    - megatron-core's model-parallel groups: **idempotent per layout**. When the requested (TP, PP, VPP) equals the
      layout the groups were built with, they are kept (the same group objects; ``timeout_minutes`` of the call
      that built them; the virtual-pipeline rank is reset to 0 as a fresh build sets it). When it differs (or the
      groups do not exist), they are destroyed and rebuilt for ``cfg``. A rebuild creates new process groups
      (megatron-core does not free the old communicators), so objects holding the old groups (models, optimizers,
      DDP wrappers) must not be used afterwards.
    - Seeds: **not idempotent, on purpose**. Every call reseeds Python, numpy, torch and megatron-core's RNG
      tracker from ``cfg.seed`` (see :func:`seed_everything`), so each stage starts from the same random state
      whatever ran before it in the process.

    Args:
        cfg: the layout. Raises ValueError when it does not divide the world size (before any collective).
    """
    from megatron.core import parallel_state as ps

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    cfg.data_parallel_size(world_size)  # validates before any collective
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        backend = cfg.backend or ("nccl" if torch.cuda.is_available() else "gloo")
        init_method = None
        if "WORLD_SIZE" not in os.environ:
            # a plain process is a world of one: a private port, and nothing written to os.environ that a
            # subprocess (another job) would inherit
            init_method = f"tcp://127.0.0.1:{_free_port()}"
        elif "MASTER_ADDR" not in os.environ:
            raise RuntimeError("WORLD_SIZE is set but MASTER_ADDR is not: launch with torchrun")
        dist.init_process_group(backend=backend, init_method=init_method, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(minutes=cfg.timeout_minutes))
    compat.apply_cpu_shims()
    layout = (cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size,
              cfg.virtual_pipeline_model_parallel_size)
    current = _current_layout()
    if current == layout:
        if layout[2] is not None:
            ps.set_virtual_pipeline_model_parallel_rank(0)
    else:
        if current is not None:
            logger.debug("rebuilding model-parallel groups: (tp, pp, vpp) %s -> %s", current, layout)
            ps.destroy_model_parallel()
        ps.initialize_model_parallel(
            tensor_model_parallel_size=cfg.tensor_model_parallel_size,
            pipeline_model_parallel_size=cfg.pipeline_model_parallel_size,
            virtual_pipeline_model_parallel_size=cfg.virtual_pipeline_model_parallel_size,
            distributed_timeout_minutes=cfg.timeout_minutes,
        )
    seed_everything(cfg.seed)
    logger.debug("initialized rank %d/%d tp=%d pp=%d dp=%d", rank, world_size, cfg.tensor_model_parallel_size,
                 cfg.pipeline_model_parallel_size, ps.get_data_parallel_world_size())


def destroy() -> None:
    """Tears down megatron-core's groups and the default process group."""
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def rank() -> int:
    """Global rank (0 outside torch.distributed)."""
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    """Global world size (1 outside torch.distributed)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def launch_rank() -> int:
    """Global rank, also before :func:`initialize`: torch.distributed's once initialized, else torchrun's ``RANK``
    (0 in a plain process)."""
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


def is_rank0() -> bool:
    """True on global rank 0."""
    return rank() == 0


def log_rank0(msg: str, *args, level: int = logging.INFO) -> None:
    """Logs only on global rank 0."""
    if is_rank0():
        logging.getLogger("megatron_bliss").log(level, msg, *args)


def data_parallel_group():
    """megatron-core's data-parallel group of this rank (None before :func:`initialize`)."""
    from megatron.core import parallel_state as ps

    return ps.get_data_parallel_group() if ps.model_parallel_is_initialized() else None


def data_parallel_rank_and_size() -> tuple[int, int]:
    """(rank, size) of this process within its data-parallel group; (0, 1) when uninitialized."""
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return 0, 1
    return ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()


def group_size(group=None) -> int:
    """Number of ranks in ``group`` (None: the whole job); 1 outside torch.distributed."""
    return dist.get_world_size(group) if dist.is_initialized() else 1


def group_rank(group=None) -> int:
    """This process's rank within ``group`` (None: the whole job); 0 outside torch.distributed."""
    return dist.get_rank(group) if dist.is_initialized() else 0


def tensor_parallel_group():
    """megatron-core's tensor-parallel group of this rank (None before :func:`initialize`)."""
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_group() if ps.model_parallel_is_initialized() else None


def tensor_parallel_size() -> int:
    """megatron-core's tensor-parallel size (1 before :func:`initialize`)."""
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_world_size() if ps.model_parallel_is_initialized() else 1


def barrier(group=None) -> None:
    """Waits for every rank of ``group`` (None: the whole job); a no-op outside torch.distributed."""
    if dist.is_initialized():
        dist.barrier(group=group)


_REDUCE_OPS = {"sum": "SUM", "max": "MAX", "min": "MIN"}


def all_reduce(tensor: torch.Tensor, group=None, op: str = "sum") -> torch.Tensor:
    """In-place ``op`` ('sum', 'max' or 'min') of ``tensor`` over ``group`` (None: the whole job); returns it.

    A no-op for a group of one or outside torch.distributed, so single-process code calls it unconditionally; an
    unknown ``op`` raises ValueError there too.
    """
    if op not in _REDUCE_OPS:
        raise ValueError(f"all_reduce: op must be one of {sorted(_REDUCE_OPS)}, got {op!r}")
    if group_size(group) > 1:
        dist.all_reduce(tensor, op=getattr(dist.ReduceOp, _REDUCE_OPS[op]), group=group)
    return tensor


def all_gather_object(obj, group=None) -> list:
    """Every rank's ``obj`` (picklable), indexed by rank within ``group``; ``[obj]`` outside torch.distributed."""
    size = group_size(group)
    if size == 1:
        return [obj]
    out = [None] * size
    dist.all_gather_object(out, obj, group=group)
    return out


def all_reduce_tensors(tensors, group=None, mean: bool = False) -> list:
    """Sum (or ``mean``) over ``group`` of a list of tensors through one flat buffer; new tensors, inputs untouched.

    One collective instead of one per tensor; a no-op (the same tensors) for a group of one.
    """
    tensors = list(tensors)
    size = group_size(group)
    if size == 1:
        return tensors
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, group=group)
    if mean:
        flat /= size
    out, offset = [], 0
    for t in tensors:
        out.append(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()
    return out
