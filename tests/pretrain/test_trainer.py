"""The trainer in this process: loss falls on real text, metrics are complete, checkpoints of another preset are
refused, and a weights-only start takes the weights and nothing else."""

import pytest
import torch

from megatron_bliss.checkpointing import CheckpointError
from megatron_bliss.config import load_stage_config
from megatron_bliss.pretrain.config import PretrainPaths, PretrainRunConfig
from megatron_bliss.pretrain.trainer import PretrainTrainer
from tests.pretrain.conftest import common_args, losses


@pytest.fixture
def one_thread(single_process):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: more threads only add contention
    yield
    torch.set_num_threads(threads)


def _load(text_data, save_dir, steps, **extra):
    return load_stage_config(PretrainRunConfig, PretrainPaths, None, common_args(text_data, save_dir, steps, **extra))


def _trainer(text_data, save_dir, steps, **extra):
    return PretrainTrainer(*_load(text_data, save_dir, steps, **extra))


def test_loss_decreases_on_real_text(one_thread, text_data, tmp_path):
    trainer = _trainer(text_data, str(tmp_path / "run"), 40, **{"checkpoint.save_interval": 100})
    trainer.train()
    records = losses(tmp_path / "run")
    assert sorted(records) == list(range(1, 41))
    first, last = records[1]["loss"], sum(records[s]["loss"] for s in range(36, 41)) / 5
    assert first > 8.5 and last < first - 1.5, (first, last)  # uniform over 8,000 ids is 8.99 nats
    val = [records[s]["val_loss"] for s in (4, 20, 40)]
    assert val[0] > val[1] > val[2], val
    for key in ("lr", "grad_norm", "tokens_per_s", "tflops_per_device", "step_time_s"):
        assert records[40][key] > 0, key
    if not torch.cuda.is_available():
        assert records[40]["mfu"] is None  # no peak FLOP/s on the CPU
    assert (tmp_path / "run" / "config.yaml").exists()
    assert (tmp_path / "run" / "latest_checkpointed_iteration.txt").read_text().strip() == "40"


def test_checkpoint_of_another_preset_is_refused(one_thread, text_data, tmp_path):
    _trainer(text_data, str(tmp_path / "debug"), 1).train()
    other = _load(text_data, str(tmp_path / "other"), 1, **{"model.preset": "tiny",
                                                              "paths.load": str(tmp_path / "debug")})
    with pytest.raises(CheckpointError, match=r"saved from preset 'debug'.*preset 'tiny'.*hidden_size: checkpoint 16"):
        PretrainTrainer(*other).load()


def test_weights_only_start_resets_everything_else(one_thread, text_data, tmp_path):
    source = _trainer(text_data, str(tmp_path / "src"), 2)
    source.train()
    weights = {k: v.clone() for k, v in source.chunks[0].state_dict().items() if torch.is_tensor(v)}
    fresh = _trainer(text_data, str(tmp_path / "ft"), 2, **{"paths.load": str(tmp_path / "src"),
                                                             "checkpoint.load_weights_only": True})
    fresh.load()
    assert fresh.step == 0 and fresh.train_data.source.sampler.consumed == 0
    got = fresh.chunks[0].state_dict()
    assert all(torch.equal(got[k], v) for k, v in weights.items())
    inner = getattr(fresh.optimizer, "chained_optimizers", [fresh.optimizer])
    assert all(len(o.optimizer.state) == 0 for o in inner)  # the optimizer starts fresh
