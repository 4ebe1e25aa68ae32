"""Scoring reuses chunks only from the same inputs and settings; a damaged checkpoint is one clear error naming it;
loading a checkpoint runs no code from its pickled files."""

import dataclasses
import io
import json
import os
import pickle

import numpy as np
import pytest
import torch

from megatron_bliss.data.indexed import IndexedWriter


# ------------------------------------------------------------------------------------------------------ helpers
class _Marker:
    """Unpickling it would create ``path`` (through a shell command)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


class _Counter:
    """A Stateful object whose state goes to the checkpoint's common part."""

    def __init__(self):
        self.state = {"step": 3, "history": [1.5, 2.5], "name": "x", "tensor": torch.arange(4)}

    def state_dict(self):
        return dict(self.state)

    def load_state_dict(self, state):
        self.state = dict(state)


def _score_model(seed: int):
    from megatron_bliss.models import build_gpt, build_score_model, get_preset

    cfg = get_preset("debug")
    model = build_score_model(cfg, build_gpt(cfg))
    model.reset_head(seed)
    return model, cfg


@pytest.fixture
def saved(single_process, tmp_path):
    """A checkpoint written by CheckpointManager (a score model and a common part); returns (dir, load)."""
    from megatron_bliss import checkpointing as ckpt

    model, cfg = _score_model(11)
    manager = ckpt.CheckpointManager(str(tmp_path / "ckpt"))
    path = manager.save(5, {"model": ckpt.ModelState(model, cfg, "score"), "counter": _Counter()})

    def load():
        fresh, _ = _score_model(3)
        counter = _Counter()
        counter.state = {}
        meta = manager.load_latest({"model": ckpt.ModelState(fresh, cfg, "score"), "counter": counter})
        return meta, fresh, counter

    _, fresh, counter = load()  # the untouched checkpoint loads
    assert counter.state["step"] == 3 and torch.equal(counter.state["tensor"], torch.arange(4))
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values()):
        if torch.is_tensor(a):
            assert torch.equal(a, b)
    return path, load


def _redirect_item_to_payload(path, kind, marker):
    """Points the first stored item of ``kind`` at ``__evil.distcp``, a pickle that would create ``marker``."""
    with open(os.path.join(path, ".metadata"), "rb") as f:
        metadata = pickle.load(f)  # the test's own, untouched file
    key = next(k for k, v in metadata.state_dict_metadata.items() if isinstance(v, kind))
    payload = io.BytesIO()
    torch.save(_Marker(marker), payload)
    with open(os.path.join(path, "__evil.distcp"), "wb") as f:
        f.write(payload.getvalue())
    for index, info in list(metadata.storage_data.items()):
        if index.fqn == key:
            metadata.storage_data[index] = dataclasses.replace(info, relative_path="__evil.distcp", offset=0,
                                                               length=len(payload.getvalue()))
    with open(os.path.join(path, ".metadata"), "wb") as f:
        pickle.dump(metadata, f)
    return marker


def _distcp_files(path):
    return sorted(n for n in os.listdir(path) if n.endswith(".distcp"))


# ------------------------------------------------------------------------------------------------------ case 15
@pytest.mark.parametrize("which", ["distcp", ".metadata", "common.pt"])
def test_case15_truncated_checkpoint_file_is_one_clear_error_naming_it(saved, which):
    from megatron_bliss.checkpointing import CheckpointError

    path, load = saved
    name = _distcp_files(path)[0] if which == "distcp" else which
    file = os.path.join(path, name)
    size = os.path.getsize(file)
    with open(file, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(CheckpointError, match="damaged") as info:
        load()
    assert path in str(info.value) and name in str(info.value)
    assert info.value.__cause__ is not None  # the original error is chained


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"format_version": 2}', "\udcff"])
def test_case15_corrupt_bliss_checkpoint_json_is_a_checkpoint_error(saved, content):
    from megatron_bliss.checkpointing import METADATA_FILE, CheckpointError

    path, load = saved
    with open(os.path.join(path, METADATA_FILE), "w", encoding="utf-8", errors="surrogateescape") as f:
        f.write(content)
    with pytest.raises(CheckpointError, match=f"damaged.*{METADATA_FILE}"):
        load()


# ----------------------------------------------------------------------------------------------------- security
def test_security_crafted_metadata_pickle_is_refused_without_running(saved, tmp_path):
    from megatron_bliss.checkpointing import CheckpointError

    path, load = saved
    marker = tmp_path / "ran_metadata"
    with open(os.path.join(path, ".metadata"), "wb") as f:
        pickle.dump(_Marker(marker), f)
    with pytest.raises(CheckpointError, match=r"\.metadata.*refused") as info:
        load()
    assert path in str(info.value) and "system" in str(info.value)
    assert not marker.exists()


def test_security_crafted_common_pt_is_refused_without_running(saved, tmp_path, monkeypatch):
    from megatron_bliss.checkpointing import CheckpointError

    # torch before 2.6 unpickles everything by default; this variable restores that default on newer torch
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    path, load = saved
    marker = tmp_path / "ran_common"
    torch.save({"common": {"counter": _Marker(marker)}}, os.path.join(path, "common.pt"))
    with pytest.raises(CheckpointError, match=r"common\.pt.*refused") as info:
        load()
    assert path in str(info.value)
    assert not marker.exists()


def test_security_crafted_object_item_in_distcp_is_refused_without_running(saved, tmp_path):
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    from megatron_bliss.checkpointing import CheckpointError

    path, load = saved
    marker = _redirect_item_to_payload(path, BytesStorageMetadata, tmp_path / "ran_item")
    with pytest.raises(CheckpointError, match=r"__evil\.distcp.*refused") as info:
        load()
    assert path in str(info.value)
    assert not marker.exists()


def test_security_crafted_tensor_item_in_distcp_is_refused_without_running(saved, tmp_path):
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from megatron_bliss.checkpointing import CheckpointError

    path, load = saved
    marker = _redirect_item_to_payload(path, TensorStorageMetadata, tmp_path / "ran_tensor")
    with pytest.raises(CheckpointError, match=r"__evil\.distcp") as info:
        load()
    assert path in str(info.value)
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------------ case 04
@pytest.fixture
def scoring_inputs(single_process, tmp_path):
    """Two shards and two score checkpoints."""
    from megatron_bliss.checkpointing import save_model

    rng = np.random.default_rng(0)
    shards = []
    for name in ("shard_a", "shard_b"):
        writer = IndexedWriter(str(tmp_path / name), np.uint16)
        writer.add_fixed(rng.integers(0, 256, size=(40, 17), dtype=np.int32).astype(np.uint16))
        writer.finalize()
        shards.append(str(tmp_path / name))
    checkpoints = []
    for seed in (11, 12):
        model, cfg = _score_model(seed)
        save_model(str(tmp_path / f"score{seed}"), model, cfg, "score")
        checkpoints.append(str(tmp_path / f"score{seed}"))
    return tmp_path, shards, checkpoints


def _score(shard, checkpoint, out, chunk_size=16, overwrite=False):
    from megatron_bliss.models import get_preset
    from megatron_bliss.parallel import ParallelConfig
    from megatron_bliss.score.config import ScorePaths, ScoreRunConfig, ScoringConfig
    from megatron_bliss.score.scoring import run_scoring

    cfg = ScoreRunConfig(model=get_preset("debug"), parallel=ParallelConfig(seed=1234),
                         scoring=ScoringConfig(micro_batch_size=4, chunk_size=chunk_size))
    if overwrite:
        cfg.run.overwrite = True
    return np.load(run_scoring(cfg, ScorePaths(checkpoint=checkpoint, data_prefix=shard, output_dir=str(out))))


def test_case04_rerun_with_another_shard_is_refused_then_overwritten(scoring_inputs):
    base, (shard_a, shard_b), (ckpt, _) = scoring_inputs
    out = base / "out"
    a = _score(shard_a, ckpt, out)
    # an unchanged rerun resumes: a lost chunk is redone, the others are reused
    kept = os.path.getmtime(out / "chunks" / "chunk_000000.npy")
    os.remove(out / "chunks" / "chunk_000001.npy")
    np.testing.assert_array_equal(_score(shard_a, ckpt, out), a)
    assert os.path.getmtime(out / "chunks" / "chunk_000000.npy") == kept
    with pytest.raises(ValueError, match=rf"{out}.*data_prefix\.path.*shard_a.*shard_b.*--run\.overwrite=true"):
        _score(shard_b, ckpt, out)
    b = _score(shard_b, ckpt, out, overwrite=True)
    np.testing.assert_array_equal(b, _score(shard_b, ckpt, base / "fresh"))
    assert not np.array_equal(a, b)
    with open(out / "scoring.json") as f:
        assert json.load(f)["data_prefix"] == shard_b


def test_case04_changed_chunk_size_is_refused_naming_it(scoring_inputs):
    base, (shard_a, _), (ckpt, _) = scoring_inputs
    out = base / "out"
    a = _score(shard_a, ckpt, out, chunk_size=16)
    os.remove(out / "scores.npy")
    with pytest.raises(ValueError, match=rf"{out}.*scoring\.chunk_size: 16 before, 32 now"):
        _score(shard_a, ckpt, out, chunk_size=32)
    np.testing.assert_array_equal(_score(shard_a, ckpt, out, chunk_size=32, overwrite=True), a)


def test_case04_another_checkpoint_is_refused(scoring_inputs):
    base, (shard_a, _), (ckpt_11, ckpt_12) = scoring_inputs
    out = base / "out"
    _score(shard_a, ckpt_11, out)
    with pytest.raises(ValueError, match=rf"{out}.*checkpoint\.checksum"):
        _score(shard_a, ckpt_12, out)


def test_case04_chunks_of_unknown_origin_are_refused(scoring_inputs):
    base, (shard_a, _), (ckpt, _) = scoring_inputs
    out = base / "out"
    os.makedirs(out / "chunks")
    np.save(out / "chunks" / "chunk_000000.npy", np.zeros(16, dtype=np.float32))
    with pytest.raises(ValueError, match=rf"{out}.*1 chunk file\(s\) without a fingerprint\.json"):
        _score(shard_a, ckpt, out)
