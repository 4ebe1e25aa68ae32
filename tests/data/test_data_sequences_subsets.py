"""Stored sequences as samples (reader, Dataset) and scored subsets; sampling is tested in test_data_loader."""

import json

import numpy as np
import pytest

from megatron_bliss.data import (
    DataConfig,
    IndexedReader,
    IndexedWriter,
    SequenceDataset,
    preprocess,
    read_sequences,
    select_indices,
    write_subset,
)


@pytest.fixture(scope="module")
def seq_prefix(tmp_path_factory, sample_files, tokenizer_path):
    prefix = str(tmp_path_factory.mktemp("seq") / "c4")
    preprocess(DataConfig(input=sample_files, output_prefix=prefix, tokenizer_model=tokenizer_path,
                          tokens_per_sequence=32, workers=0, progress=False))
    return prefix


def test_read_sequences_and_dataset(seq_prefix):
    seqs = read_sequences(seq_prefix, 32)
    assert seqs.ndim == 2 and seqs.shape[1] == 32 and seqs.dtype == np.uint16
    ds = SequenceDataset(seq_prefix, 32)
    assert len(ds) == seqs.shape[0]
    assert ds[5].dtype.is_floating_point is False and ds[5].tolist() == seqs[5].tolist()
    assert ds.batch([0, 7]).shape == (2, 32)
    with pytest.raises(ValueError, match="expects 64"):
        read_sequences(seq_prefix, 64)


def test_top_k_is_exact_with_deterministic_ties():
    scores = np.array([0.5, 0.9, 0.5, 0.1, 0.9, 0.5, 0.7, 0.5], dtype=np.float32)
    idx, threshold = select_indices(scores, top_k=5)
    assert idx.tolist() == [0, 1, 2, 4, 6] and threshold == 0.5  # ties at 0.5: lower indices 0, 2 first
    rng = np.random.default_rng(0)
    big = rng.integers(0, 50, size=10_000).astype(np.float32)  # many ties
    from megatron_bliss.data.subsets import _top_k_chunked

    chunked, _ = _top_k_chunked(big, 1234, chunk=777)
    expected = np.sort(np.lexsort((np.arange(big.size), -big))[:1234])  # score desc, index asc
    np.testing.assert_array_equal(chunked, expected)
    rand_a, none = select_indices(big, fraction=0.1, method="random", seed=5)
    rand_b, _ = select_indices(big, fraction=0.1, method="random", seed=5)
    assert none is None and rand_a.size == 1000 and np.array_equal(rand_a, rand_b)
    with pytest.raises(ValueError, match="NaN"):
        select_indices(np.array([1.0, np.nan]), top_k=1)


def test_write_subset_copies_the_recorded_sequences(seq_prefix, tmp_path):
    source = read_sequences(seq_prefix)
    scores = np.random.default_rng(1).random(source.shape[0]).astype(np.float32)
    np.save(tmp_path / "scores.npy", scores)
    out = str(tmp_path / "top")
    record = write_subset(seq_prefix, str(tmp_path / "scores.npy"), out)  # default: top 20 %
    indices = np.load(out + ".indices.npy")
    k = int(round(0.2 * source.shape[0]))
    assert record["k"] == k == indices.size and np.all(np.diff(indices) > 0)
    assert set(indices.tolist()) == set(np.argsort(-scores, kind="stable")[:k].tolist())
    np.testing.assert_array_equal(read_sequences(out), source[indices])
    np.testing.assert_array_equal(np.load(out + ".scores.npy"), scores[indices])
    with open(out + ".subset.json") as f:
        sidecar = json.load(f)
    assert sidecar["threshold"] == pytest.approx(float(scores[indices].min()))
    assert len(sidecar["source_bin_sha256"]) == 64 and sidecar["method"] == "top"
    rand = write_subset(seq_prefix, None, str(tmp_path / "rand"), top_k=10, method="random", seed=2)
    assert rand["k"] == 10 and rand["seed"] == 2
    chosen = np.array([3, 1, 8])
    write_subset(seq_prefix, chosen, str(tmp_path / "chosen"))
    np.testing.assert_array_equal(read_sequences(str(tmp_path / "chosen")), source[[1, 3, 8]])
    with pytest.raises(ValueError, match="scores for"):
        write_subset(seq_prefix, scores[:-1], str(tmp_path / "bad"))


def test_subset_of_variable_length_entries(tmp_path):
    prefix = str(tmp_path / "docs")
    writer = IndexedWriter(prefix, np.int32)
    docs = [np.arange(n, dtype=np.int32) * (n + 1) for n in (4, 1, 9, 2, 6)]
    writer.add(np.concatenate(docs), np.array([len(d) for d in docs]))
    writer.finalize()
    write_subset(prefix, np.array([0.3, 0.1, 0.9, 0.2, 0.8]), str(tmp_path / "sub"), top_k=2)
    sub = IndexedReader.open(str(tmp_path / "sub"))
    assert len(sub) == 2 and sub[0].tolist() == docs[2].tolist() and sub[1].tolist() == docs[4].tolist()
