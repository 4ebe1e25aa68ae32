"""Preprocessing: round trips, bad input accounting, strict mode, shards, determinism across workers, parquet."""

import json
import os

import numpy as np
import pytest

from megatron_bliss.data import DataConfig, DataFormatError, IndexedReader, build_tokenizer, preprocess
from megatron_bliss.data.sequences import read_sequences
from tests.data.assets import sample_texts


def _run(tmp_path, inputs, tokenizer_path, name="out", **kw):
    kw.setdefault("progress", False)
    kw.setdefault("workers", 0)
    cfg = DataConfig(input=list(inputs), output_prefix=str(tmp_path / name), tokenizer_model=tokenizer_path, **kw)
    return preprocess(cfg), str(tmp_path / name)


def test_documents_round_trip(tmp_path, sample_files, tokenizer_path):
    manifest, prefix = _run(tmp_path, sample_files, tokenizer_path, mode="documents")
    tok = build_tokenizer(tokenizer_path)
    texts = sample_texts()
    reader = IndexedReader.open(prefix)
    assert len(reader) == len(texts) == manifest["counts"]["documents"]
    for i in range(len(texts)):
        ids = reader[i]
        assert ids[-1] == tok.eod and tok.eod not in ids[:-1]
        assert tok.detokenize(ids[:-1]) == texts[i]  # identity normalization: exact round trip
    assert manifest["tokenizer"]["vocab_size"] == 8000 and manifest["dtype"] == "uint16"
    assert all(len(x["sha256"]) == 64 for x in manifest["inputs"])


def test_sequences_cut_exactly_and_drop_the_tail(tmp_path, sample_files, tokenizer_path):
    docs_manifest, docs_prefix = _run(tmp_path, sample_files, tokenizer_path, name="docs", mode="documents")
    manifest, prefix = _run(tmp_path, sample_files, tokenizer_path, tokens_per_sequence=128)
    stream = IndexedReader.open(docs_prefix).tokens
    seqs = read_sequences(prefix, 128)
    n = stream.size // 128
    assert seqs.shape == (n, 128) and manifest["tokens_per_sequence"] == 128
    assert "seq_length" not in manifest and manifest["config"]["tokens_per_sequence"] == 128  # one name, one meaning
    np.testing.assert_array_equal(seqs.reshape(-1), stream[: n * 128])
    assert manifest["counts"]["dropped_tail_tokens"] == stream.size - n * 128
    assert manifest["counts"]["tokens"] + manifest["counts"]["dropped_tail_tokens"] == stream.size


def test_shards_are_disjoint_round_robin(tmp_path, sample_files, tokenizer_path):
    _, whole = _run(tmp_path, sample_files, tokenizer_path, name="whole", tokens_per_sequence=64)
    manifest, prefix = _run(tmp_path, sample_files, tokenizer_path, name="sh", tokens_per_sequence=64, shards=3)
    full = read_sequences(whole)
    for k in range(3):
        np.testing.assert_array_equal(read_sequences(f"{prefix}_shard{k}"), full[k::3])
    assert [s["prefix"] for s in manifest["shards"]] == ["sh_shard0", "sh_shard1", "sh_shard2"]
    _, dwhole = _run(tmp_path, sample_files, tokenizer_path, name="dwhole", mode="documents")
    _, dsh = _run(tmp_path, sample_files, tokenizer_path, name="dsh", mode="documents", shards=2)
    ref = IndexedReader.open(dwhole)
    for k in range(2):
        shard = IndexedReader.open(f"{dsh}_shard{k}")
        assert len(shard) == len(range(k, len(ref), 2))
        for j, i in enumerate(range(k, len(ref), 2)):
            np.testing.assert_array_equal(shard[j], ref[i])


def test_bad_lines_counted_and_good_lines_kept(tmp_path, bad_corpus, tokenizer_path):
    paths, good, expected = bad_corpus
    manifest, prefix = _run(tmp_path, paths, tokenizer_path, mode="documents")
    assert {k: v for k, v in manifest["skipped"].items() if v} == expected
    tok = build_tokenizer(tokenizer_path)
    reader = IndexedReader.open(prefix)
    assert [tok.detokenize(reader[i][:-1]) for i in range(len(reader))] == good
    assert manifest["inputs"][1]["truncated"]["line"] == len(good) - 20 + 1


@pytest.mark.parametrize("case,line,reason", [(0, 2, "malformed_json"), (1, None, "truncated_gzip")])
def test_strict_mode_names_file_and_line(tmp_path, bad_corpus, tokenizer_path, case, line, reason):
    paths, good, _ = bad_corpus
    with pytest.raises(DataFormatError) as err:
        _run(tmp_path, [paths[case]], tokenizer_path, strict=True)
    expected_line = line if line is not None else len(good) - 20 + 1
    assert str(err.value).startswith(f"{paths[case]}:{expected_line}: {reason}")
    assert not os.path.exists(tmp_path / "out.bin") and not os.path.exists(tmp_path / "out.manifest.json")


def test_workers_give_byte_identical_output(tmp_path, sample_files, tokenizer_path):
    outs = {}
    for workers in (1, 2):
        manifest, prefix = _run(tmp_path, sample_files, tokenizer_path, name=f"w{workers}", workers=workers,
                                tokens_per_sequence=256, shards=2, chunk_bytes=16384)
        outs[workers] = [open(f"{prefix}_shard{k}{s}", "rb").read() for k in range(2) for s in (".bin", ".idx")]
    assert outs[1] == outs[2]
    _, prefix0 = _run(tmp_path, sample_files, tokenizer_path, name="w0", tokens_per_sequence=256, shards=2)
    assert [open(f"{prefix0}_shard{k}{s}", "rb").read() for k in range(2) for s in (".bin", ".idx")] == outs[1]


def test_rerun_skips_finished_work(tmp_path, sample_files, tokenizer_path, caplog):
    first, prefix = _run(tmp_path, sample_files, tokenizer_path, tokens_per_sequence=128)
    before = open(prefix + ".bin", "rb").read()
    with caplog.at_level("INFO"):
        second, _ = _run(tmp_path, sample_files, tokenizer_path, tokens_per_sequence=128)
    assert "already complete" in caplog.text and second == first
    assert open(prefix + ".bin", "rb").read() == before
    third, _ = _run(tmp_path, sample_files, tokenizer_path, tokens_per_sequence=64,
                    overwrite=True)  # other settings: redone when asked to overwrite
    assert third["tokens_per_sequence"] == 64 and len(read_sequences(prefix)[0]) == 64


def test_json_key_and_hf_tokenizer(tmp_path, tokenizer_path):
    tokenizers = pytest.importorskip("tokenizers")
    texts = sample_texts()[:30]
    path = tmp_path / "content.jsonl"
    path.write_text("".join(json.dumps({"content": t}) + "\n" for t in texts))
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=500, special_tokens=["<unk>", "<|endoftext|>", "<pad>"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tok.save(str(tmp_path / "tokenizer.json"))
    manifest, prefix = _run(tmp_path, [str(path)], str(tmp_path / "tokenizer.json"), mode="documents",
                            json_key="content")
    hf = build_tokenizer(str(tmp_path / "tokenizer.json"))
    assert (hf.kind, hf.eod, hf.pad) == ("huggingface", 1, 2)
    reader = IndexedReader.open(prefix)
    assert [hf.detokenize(reader[i][:-1]) for i in range(len(reader))] == texts


def test_parquet_pool_passes_through(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    rows = [rng.integers(0, 50277, size=32) for _ in range(10)]
    for i in range(2):
        table = pa.table({"input_ids": pa.array([r.tolist() for r in rows[i * 5:(i + 1) * 5]],
                                                type=pa.list_(pa.int32()))})
        pq.write_table(table, tmp_path / f"pool-{i}.parquet")
    cfg = DataConfig(input=[str(tmp_path / "*.parquet")], output_prefix=str(tmp_path / "pool"),
                     tokens_per_sequence=32, vocab_size=50277, progress=False)
    manifest = preprocess(cfg)
    np.testing.assert_array_equal(read_sequences(str(tmp_path / "pool"), 32), np.stack(rows))
    assert manifest["dtype"] == "uint16" and manifest["counts"]["sequences"] == 10
    with pytest.raises(DataFormatError, match=r"pool-0.parquet:0: wrong_length .*--tokens-per-sequence is 16"):
        preprocess(DataConfig(input=[str(tmp_path / "pool-0.parquet")], output_prefix=str(tmp_path / "bad"),
                              tokens_per_sequence=16, vocab_size=50277, progress=False))


def test_bad_settings_are_named(tmp_path, sample_files, tokenizer_path):
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        _run(tmp_path, [str(tmp_path / "nothing-here*.json")], tokenizer_path)
    with pytest.raises(ValueError, match="mode"):
        DataConfig(input=sample_files, output_prefix="x", mode="sentences")
    with pytest.raises(FileNotFoundError, match="no-such.model"):
        _run(tmp_path, sample_files, str(tmp_path / "no-such.model"))
