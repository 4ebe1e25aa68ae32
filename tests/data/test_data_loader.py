"""The one data path: blended resumable sampler, data-parallel batch source, validation crop rule, next-token split."""

import json

import numpy as np
import pytest
import torch

from megatron_bliss.data import IndexedWriter
from megatron_bliss.data.loader import (
    BatchSource,
    SequenceSampler,
    ValidationSet,
    crop_examples,
    dp_slice,
    micro_batches,
    next_token_batch,
    split_next_token,
)
from megatron_bliss.data.validation import load_validation_set


def _pool(n, length=6, offset=0):
    """``[n, length]`` rows whose first token is the row number (plus ``offset``), so a row names itself."""
    rows = np.zeros((n, length), dtype=np.int64)
    rows[:, 0] = np.arange(n) + offset
    rows[:, 1:] = 7
    return rows


def _write_examples(prefix, examples, spans=None):
    writer = IndexedWriter(prefix, np.int32)
    for tokens in examples:
        writer.add(np.asarray(tokens), np.array([len(tokens)]))
    writer.finalize()
    if spans is not None:
        np.save(prefix + ".targets.npy", np.asarray(spans, dtype=np.int64).reshape(-1, 2))
    return prefix


# ------------------------------------------------------------------------------------------------------ sampler


def test_sampler_blends_epochs_and_resumes_exactly():
    sampler = SequenceSampler([10, 30], [0.25, 0.75], seed=3)
    datasets, rows = sampler.take(40)
    assert np.bincount(datasets, minlength=2).tolist() == [10, 30]  # the greedy blend is exact at the weights
    assert sorted(rows[datasets == 0].tolist()) == list(range(10))  # one epoch visits every sequence once
    assert sorted(rows[datasets == 1].tolist()) == list(range(30))
    state = json.loads(json.dumps(sampler.state_dict()))
    after = sampler.take(17)
    resumed = SequenceSampler([10, 30], [0.25, 0.75], seed=3)
    resumed.load_state_dict(state)
    for got, want in zip(resumed.take(17), after):
        np.testing.assert_array_equal(got, want)
    assert not np.array_equal(SequenceSampler([10, 30], [0.25, 0.75], seed=4).take(40)[1], rows)
    with pytest.raises(ValueError, match="sizes"):
        SequenceSampler([10, 31], None, seed=3).load_state_dict(state)
    with pytest.raises(ValueError, match="weights"):
        SequenceSampler([10, 30], [0.5, 0.5], seed=3).load_state_dict(state)


def test_sampler_blend_shares_stay_within_one_sample():
    sampler = SequenceSampler([7, 50, 13], [0.2, 0.5, 0.3], seed=0)
    seen = np.zeros(3)
    for n in range(1, 301):
        d, _ = sampler.take(1)
        seen[d[0]] += 1
        assert np.abs(seen - sampler.weights * n).max() <= 1.0  # every dataset within one sample of its share
    proportional = SequenceSampler([10, 30], None, seed=0)
    assert np.bincount(proportional.take(40)[0], minlength=2).tolist() == [10, 30]  # None: by size


def test_sampler_epochs_are_fresh_permutations_and_deterministic():
    a, b = SequenceSampler([9], seed=5), SequenceSampler([9], seed=5)
    rows = a.take(27)[1]
    np.testing.assert_array_equal(rows, b.take(27)[1])
    epochs = rows.reshape(3, 9)
    assert all(sorted(e.tolist()) == list(range(9)) for e in epochs)
    assert not np.array_equal(epochs[0], epochs[1])
    with pytest.raises(ValueError, match="at least one sequence"):
        SequenceSampler([0, 4])
    with pytest.raises(ValueError, match="weights"):
        SequenceSampler([3, 4], [1.0])


# ------------------------------------------------------------------------------------------------- batch source


def test_dp_slices_partition_the_global_batch():
    data = [_pool(23), _pool(11, offset=100)]
    whole = BatchSource(data, 8, 0, 1, weights=[0.6, 0.4], seed=2)
    ranks = [BatchSource(data, 8, r, 4, weights=[0.6, 0.4], seed=2) for r in range(4)]
    for _ in range(7):  # crosses epochs of both datasets
        ref, _ = whole.next_rows()
        got = torch.cat([r.next_rows()[0] for r in ranks])
        assert got.shape == (8, 6) and torch.equal(got, ref)
    assert dp_slice(8, 3, 4) == slice(6, 8)
    with pytest.raises(ValueError, match="not divisible by the data-parallel size 3"):
        BatchSource(data, 8, 0, 3)
    with pytest.raises(ValueError, match="out of range"):
        dp_slice(8, 2, 2)
    with pytest.raises(ValueError, match="tiny: 3 sequences cannot fill one global batch of 4"):
        BatchSource([_pool(3)], 4, names=["tiny"])


def test_batch_source_resumes_mid_epoch_like_an_uninterrupted_run():
    data = [_pool(13)]
    full = BatchSource(data, 4, 1, 2, seed=9, names=["pool"])
    uninterrupted = [full.next_rows()[0] for _ in range(10)]
    first = BatchSource(data, 4, 1, 2, seed=9, names=["pool"])
    head = [first.next_rows()[0] for _ in range(4)]  # 16 samples: mid-way through the second epoch
    state = json.loads(json.dumps(first.state_dict()))
    assert state["consumed"] == 16 and state["prefixes"] == ["pool"]
    resumed = BatchSource(data, 4, 1, 2, seed=9, names=["pool"])
    resumed.load_state_dict(state)
    tail = [resumed.next_rows()[0] for _ in range(6)]
    assert all(torch.equal(a, b) for a, b in zip(head + tail, uninterrupted))
    with pytest.raises(ValueError, match="data state is for"):
        BatchSource(data, 4, 1, 2, seed=9, names=["other"]).load_state_dict(state)
    with pytest.raises(ValueError, match="older sampler"):
        resumed.load_state_dict({"epoch": 1, "position": 4, "seed": 9})


def test_micro_batches_are_the_next_token_split():
    source = BatchSource([_pool(16)], 8, 0, 2, seed=0)
    batches = source.next_micro_batches(2)
    assert len(batches) == 2 and set(batches[0]) == {"tokens", "labels"}
    assert batches[0]["tokens"].shape == (2, 5) and batches[0]["tokens"].is_contiguous()
    seqs = torch.arange(12).reshape(2, 6)
    mask = torch.zeros(2, 6)
    mask[:, -2:] = 1
    inputs, labels, shifted = split_next_token(seqs, mask)
    assert torch.equal(inputs, seqs[:, :-1]) and torch.equal(labels, seqs[:, 1:])
    assert torch.equal(shifted, mask[:, 1:]) and split_next_token(seqs)[2] is None
    batch = next_token_batch(seqs, mask)
    assert torch.equal(batch["labels"], labels) and torch.equal(batch["loss_mask"], mask[:, 1:])
    with pytest.raises(ValueError, match="differs"):
        split_next_token(seqs, mask[:, :4])
    with pytest.raises(ValueError, match="micro_batch_size=4"):
        micro_batches(seqs, 4)


# --------------------------------------------------------------------------------------------------- validation


def test_crop_keeps_the_last_tokens_and_refuses_a_target_that_does_not_fit(tmp_path):
    # example 0: 10 tokens, target 8..9; example 1: 4 tokens, target 3; example 2: 7 tokens, target 4..6
    examples = [list(range(10, 20)), [1, 2, 3, 4], [5, 6, 7, 8, 9, 10, 11]]
    prefix = _write_examples(str(tmp_path / "val"), examples, [(8, 10), (3, 4), (4, 7)])
    vset = ValidationSet(prefix, sample_length=6)
    assert vset.tokens.shape == (3, 6) and vset.has_targets
    assert vset.tokens[0].tolist() == list(range(14, 20))  # the last 6 tokens: the target ends the row
    assert vset.mask[0].tolist() == [0, 0, 0, 0, 1, 1]
    assert vset.tokens[1].tolist() == [1, 2, 3, 4, 0, 0] and vset.mask[1].tolist() == [0, 0, 0, 1, 0, 0]
    assert vset.tokens[2].tolist() == [6, 7, 8, 9, 10, 11] and vset.mask[2].tolist() == [0, 0, 0, 1, 1, 1]
    tokens, mask = load_validation_set(prefix, max_length=6)  # one rule for every consumer
    np.testing.assert_array_equal(tokens, vset.tokens)
    np.testing.assert_array_equal(mask, vset.mask)
    narrow = ValidationSet(prefix, sample_length=6, fixed_width=False)
    np.testing.assert_array_equal(narrow.tokens, vset.tokens)  # the widest kept example fills 6 tokens
    assert ValidationSet(prefix).tokens.shape == (3, 10)  # no sample_length: the longest example
    with pytest.raises(ValueError, match=r"val: example 2 has a target of 3 tokens .* sample_length=3"):
        ValidationSet(prefix, sample_length=3)  # the 3-token target needs 4 tokens with its context


def test_sets_without_targets_score_every_token_and_are_only_cropped(tmp_path):
    prefix = _write_examples(str(tmp_path / "plain"), [list(range(1, 9)), [4, 5, 6]])
    vset = ValidationSet(prefix, sample_length=5)
    assert not vset.has_targets
    assert vset.tokens.tolist() == [[4, 5, 6, 7, 8], [4, 5, 6, 0, 0]]
    assert vset.mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]


def test_validation_errors_name_the_set(tmp_path):
    with pytest.raises(ValueError, match="given arrays: 1 examples have no target token"):
        crop_examples(np.ones((2, 4)), np.array([[0, 0, 1, 1], [0, 0, 0, 0]]), name="given arrays")
    with pytest.raises(ValueError, match="no target token after position 0"):
        crop_examples(np.ones((1, 4)), np.array([[1, 0, 0, 0]]))
    prefix = _write_examples(str(tmp_path / "bad"), [[1, 2, 3]], [(1, 5)])
    with pytest.raises(ValueError, match=r"bad.targets.npy: example 0 has target span \[1, 5\]"):
        ValidationSet(prefix)
    with pytest.raises(FileNotFoundError, match="nothing.bin"):
        ValidationSet(str(tmp_path / "nothing"))


def test_fixed_and_shuffled_validation_batches():
    tokens = np.tile(np.arange(10)[:, None], (1, 5))
    mask = np.zeros((10, 5), np.float32)
    mask[:, 2:] = 1
    vset = ValidationSet((tokens, mask), name="arrays")
    fixed = [vset.fixed_batches(4, r, 2) for r in range(2)]
    assert len(fixed[0]) == 3  # ceil(10 / 4) global batches, in stored order
    firsts = [int(t[i, 0]) for b in range(3) for r in range(2) for t in [fixed[r][b][0]] for i in range(2)]
    assert firsts[:10] == list(range(10)) and float(fixed[1][2][1].sum()) == 0.0  # padding rows: mask 0
    assert len(vset.fixed_batches(4, max_batches=2)) == 2
    shuffled = [vset.batch_source(4, r, 2, seed=1) for r in range(2)]
    seen = []
    for _ in range(5):  # two epochs of 10 examples in global batches of 4
        for source in shuffled:
            t, m = source.next_rows()
            assert t.shape == (2, 5) and torch.equal(m, torch.from_numpy(mask[t[:, 0].numpy()]))
            seen += t[:, 0].tolist()
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:]) == list(range(10))
