"""parallel.py: the collective primitives (one process: no-ops and return values; two gloo ranks: the reductions)
and what a repeated ``initialize`` keeps (groups per layout) and redoes (seeds)."""

import random

import numpy as np
import pytest
import torch

from megatron_bliss import parallel


def test_primitives_are_noops_for_a_group_of_one():
    assert parallel.group_size() == 1 and parallel.group_rank() == 0
    assert parallel.rank() == 0 and parallel.world_size() == 1 and parallel.is_rank0()
    parallel.barrier()
    x = torch.tensor([1.0, -2.0])
    for op in ("sum", "max", "min"):
        assert parallel.all_reduce(x, op=op) is x
    assert x.tolist() == [1.0, -2.0]
    with pytest.raises(ValueError, match="op must be one of"):
        parallel.all_reduce(x, op="prod")
    tensors = (torch.ones(2, 2), torch.arange(3.0))
    for mean in (False, True):
        out = parallel.all_reduce_tensors(tensors, mean=mean)
        assert isinstance(out, list) and len(out) == 2 and all(a is b for a, b in zip(out, tensors))
    assert parallel.all_gather_object({"a": 1}) == [{"a": 1}]


def test_launch_rank_reads_torchrun_env_before_initialize(monkeypatch):
    monkeypatch.setattr(parallel.dist, "is_initialized", lambda: False)
    monkeypatch.delenv("RANK", raising=False)
    assert parallel.launch_rank() == 0 and parallel.rank() == 0
    monkeypatch.setenv("RANK", "3")
    assert parallel.launch_rank() == 3
    assert parallel.rank() == 0  # rank() is torch.distributed's only


def test_helpers_before_initialize(monkeypatch):
    from megatron.core import parallel_state as ps

    monkeypatch.setattr(ps, "model_parallel_is_initialized", lambda: False)
    assert parallel.tensor_parallel_size() == 1
    assert parallel.tensor_parallel_group() is None and parallel.data_parallel_group() is None
    assert parallel.data_parallel_rank_and_size() == (0, 1)


def _groups():
    from megatron.core import parallel_state as ps

    return (ps.get_tensor_model_parallel_group(), ps.get_pipeline_model_parallel_group(),
            ps.get_data_parallel_group(), ps.get_model_parallel_group())


def test_initialize_same_layout_keeps_groups(single_process):
    import torch.distributed as dist

    before, world = _groups(), dist.group.WORLD
    parallel.initialize(parallel.ParallelConfig(seed=1234, timeout_minutes=5))
    assert all(a is b for a, b in zip(_groups(), before))
    assert dist.group.WORLD is world
    assert parallel.tensor_parallel_size() == 1 and parallel.group_size(parallel.tensor_parallel_group()) == 1
    assert parallel.data_parallel_rank_and_size() == (0, 1)


def test_initialize_rebuilds_when_the_layout_differs(single_process, monkeypatch):
    before = _groups()
    # a world of one fits only TP=PP=1: pretend the groups were built for another layout
    monkeypatch.setattr(parallel, "_current_layout", lambda: (2, 1, None))
    parallel.initialize(parallel.ParallelConfig(seed=1234))
    monkeypatch.undo()
    after = _groups()
    assert all(g is not None for g in after) and all(a is not b for a, b in zip(after, before))
    assert parallel._current_layout() == (1, 1, None)
    parallel.initialize(parallel.ParallelConfig(seed=1234))
    assert all(a is b for a, b in zip(_groups(), after))


def _draws():
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    with get_cuda_rng_tracker().fork():
        tracked = torch.rand(3)
    return random.random(), float(np.random.rand()), torch.rand(3), tracked


def test_initialize_reseeds_on_every_call(single_process):
    try:
        parallel.initialize(parallel.ParallelConfig(seed=7))
        first = _draws()
        assert _draws()[2].tolist() != first[2].tolist()  # the generators moved on
        parallel.initialize(parallel.ParallelConfig(seed=7))
        again = _draws()
        assert again[:2] == first[:2]
        assert torch.equal(again[2], first[2]) and torch.equal(again[3], first[3])
        parallel.initialize(parallel.ParallelConfig(seed=8))
        assert not torch.equal(_draws()[2], first[2])
    finally:
        parallel.initialize(parallel.ParallelConfig(seed=1234))  # the session fixture's seed


_DIST_SCRIPT = r'''
import warnings

import torch

warnings.filterwarnings("ignore", message=".*Apex.*|.*Transformer Engine.*")
from megatron.core import parallel_state as ps

from megatron_bliss import parallel


def groups():
    return (ps.get_tensor_model_parallel_group(), ps.get_pipeline_model_parallel_group(),
            ps.get_data_parallel_group())


parallel.initialize(parallel.ParallelConfig())
r, n = parallel.rank(), parallel.world_size()
assert n == 2 and parallel.launch_rank() == r and parallel.group_size() == 2 and parallel.group_rank() == r
dp = parallel.data_parallel_group()
assert parallel.group_size(dp) == 2 and parallel.group_rank(dp) == r
x = torch.tensor([r + 1.0, -float(r)], dtype=torch.float64)
assert parallel.all_reduce(x.clone(), dp).tolist() == [3.0, -1.0]
assert parallel.all_reduce(x.clone(), dp, op="max").tolist() == [2.0, 0.0]
assert parallel.all_reduce(x.clone(), dp, op="min").tolist() == [1.0, -1.0]
y = x.clone()
assert parallel.all_reduce(y) is y and y.tolist() == [3.0, -1.0]  # None: the whole job
tensors = [torch.full((2, 2), r + 1.0), torch.arange(3.0) * (r + 1)]
total = parallel.all_reduce_tensors(tensors, dp)
assert torch.equal(total[0], torch.full((2, 2), 3.0)) and torch.equal(total[1], torch.arange(3.0) * 3)
mean = parallel.all_reduce_tensors(tensors, dp, mean=True)
assert torch.equal(mean[0], torch.full((2, 2), 1.5)) and torch.equal(mean[1], torch.arange(3.0) * 1.5)
assert torch.equal(tensors[0], torch.full((2, 2), r + 1.0))  # inputs untouched
assert parallel.all_gather_object({"rank": r}, dp) == [{"rank": 0}, {"rank": 1}]
parallel.barrier(dp)

# initialize: same layout keeps the groups; another (TP, PP, VPP) rebuilds them
kept = groups()
parallel.initialize(parallel.ParallelConfig())
assert all(a is b for a, b in zip(groups(), kept))
parallel.initialize(parallel.ParallelConfig(tensor_model_parallel_size=2))
tp2 = groups()
assert all(a is not b for a, b in zip(tp2, kept))
assert parallel.tensor_parallel_size() == 2 and parallel.group_size(parallel.tensor_parallel_group()) == 2
assert parallel.data_parallel_rank_and_size() == (0, 1)
assert parallel.all_reduce(torch.tensor([r + 1.0]), parallel.tensor_parallel_group()).item() == 3.0
parallel.initialize(parallel.ParallelConfig(tensor_model_parallel_size=2))
assert all(a is b for a, b in zip(groups(), tp2))
vpp = parallel.ParallelConfig(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2)
parallel.initialize(vpp)
pp2 = groups()
assert ps.get_pipeline_model_parallel_world_size() == 2 and ps.get_virtual_pipeline_model_parallel_world_size() == 2
ps.set_virtual_pipeline_model_parallel_rank(1)
parallel.initialize(vpp)
assert all(a is b for a, b in zip(groups(), pp2)) and ps.get_virtual_pipeline_model_parallel_rank() == 0
parallel.initialize(parallel.ParallelConfig(pipeline_model_parallel_size=2))  # VPP alone differs
assert ps.get_pipeline_model_parallel_group() is not pp2[1]
assert ps.get_virtual_pipeline_model_parallel_world_size() is None
if r == 0:
    print("PARALLEL_OK")
parallel.destroy()
'''


@pytest.mark.dist
def test_collectives_and_layouts_on_two_ranks(tmp_path, torchrun):
    script = tmp_path / "parallel_dist.py"
    script.write_text(_DIST_SCRIPT)
    assert "PARALLEL_OK" in torchrun(str(script))
