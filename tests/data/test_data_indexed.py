"""The streaming indexed writer produces megatron's exact format, read back by megatron-core and our reader."""

import os

import numpy as np
import pytest

from megatron_bliss.data.indexed import IndexedReader, IndexedWriter, dtype_for_vocab


def _write(prefix, docs, dtype):
    writer = IndexedWriter(prefix, dtype)
    writer.add(np.concatenate(docs[:2]), np.array([len(d) for d in docs[:2]]))
    for doc in docs[2:]:
        writer.add(doc, np.array([len(doc)]))
    return writer.finalize()


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_round_trip_and_megatron_reads_it(tmp_path, dtype):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 60000, size=n).astype(dtype) for n in (5, 1, 17, 300, 2)]
    prefix = str(tmp_path / "ds")
    assert _write(prefix, docs, dtype) == (5, sum(map(len, docs)))
    ours = IndexedReader.open(prefix)
    theirs = IndexedDataset(prefix)
    assert len(theirs) == len(ours) == 5 and ours.dtype == np.dtype(dtype)
    assert list(theirs.document_indices) == [0, 1, 2, 3, 4, 5]
    for i, doc in enumerate(docs):
        np.testing.assert_array_equal(theirs[i], doc)
        np.testing.assert_array_equal(ours[i], doc)
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_matches_megatron_builder_bytes(tmp_path):
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    docs = [np.arange(n, dtype=np.uint16) + n for n in (3, 8, 1, 13)]
    _write(str(tmp_path / "ours"), docs, np.uint16)
    builder = IndexedDatasetBuilder(str(tmp_path / "theirs.bin"), dtype=np.uint16)
    for doc in docs:
        builder.add_item(torch.from_numpy(doc.astype(np.int64)))
        builder.end_document()
    builder.finalize(str(tmp_path / "theirs.idx"))
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"ours{suffix}").read_bytes() == (tmp_path / f"theirs{suffix}").read_bytes()


def test_empty_dataset_and_abort(tmp_path):
    prefix = str(tmp_path / "empty")
    assert IndexedWriter(prefix, np.uint16).finalize() == (0, 0)
    assert len(IndexedReader.open(prefix)) == 0
    writer = IndexedWriter(str(tmp_path / "aborted"), np.uint16)
    writer.add(np.arange(4), np.array([4]))
    writer.abort()
    assert sorted(os.listdir(tmp_path)) == ["empty.bin", "empty.idx"]


def test_dtype_choice_and_bad_files(tmp_path):
    assert dtype_for_vocab(32000) == np.uint16 and dtype_for_vocab(50304) == np.uint16
    assert dtype_for_vocab(65500) == np.int32 and dtype_for_vocab(None) == np.int32
    with pytest.raises(ValueError, match="lengths sum"):
        IndexedWriter(str(tmp_path / "x"), np.uint16).add(np.arange(3), np.array([2]))
    (tmp_path / "junk.bin").write_bytes(b"")
    (tmp_path / "junk.idx").write_bytes(b"not an index at all, certainly")
    with pytest.raises(ValueError, match="junk.idx"):
        IndexedReader.open(str(tmp_path / "junk"))
    with pytest.raises(FileNotFoundError, match="missing"):
        IndexedReader.open(str(tmp_path / "missing"))
