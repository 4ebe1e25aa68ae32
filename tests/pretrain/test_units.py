"""Fast checks of the pretraining pieces: WSD schedule, batch slicing, validation batches, config validation.

The sampler itself is tested with the rest of the data path in tests/data/test_data_loader.py.
"""

import math
import os

import pytest

from megatron_bliss.config import ConfigError, load_stage_config
from megatron_bliss.pretrain.config import PretrainPaths, PretrainRunConfig
from megatron_bliss.pretrain.data import TrainBatches, ValidationBatches
from megatron_bliss.pretrain.schedule import ScheduleConfig, WSDSchedule
from tests.conftest import REPO_ROOT
from tests.pretrain.conftest import SEQ


def test_wsd_schedule_warmup_constant_decay():
    sched = WSDSchedule(ScheduleConfig(warmup_steps=4, lr_multiplier=0.5), peak_lr=1e-3)
    assert [sched.lr(s) for s in range(6)] == pytest.approx([1.25e-4, 2.5e-4, 3.75e-4, 5e-4, 5e-4, 5e-4])
    sched.start_decay(10, half_life=200)
    assert sched.lr(10) == pytest.approx(5e-4)
    assert sched.lr(210) == pytest.approx(2.5e-4) and sched.lr(410) == pytest.approx(1.25e-4)
    restored = WSDSchedule(ScheduleConfig(warmup_steps=4, lr_multiplier=0.5), peak_lr=1e-3)
    restored.load_state_dict(sched.state_dict())
    assert restored.lr(110) == pytest.approx(sched.lr(110)) == pytest.approx(5e-4 * 0.5 ** 0.5)


def test_schedule_sets_groups_with_wd_mult():
    class Opt:
        param_groups = [{"lr_mult": 1.0, "wd_mult": 1.0}, {"lr_mult": 1.0, "wd_mult": 0.0}]

    lr = WSDSchedule(ScheduleConfig(warmup_steps=0), 2e-3).apply(Opt, 5, weight_decay=0.1)
    assert lr == 2e-3 and [g["lr"] for g in Opt.param_groups] == [2e-3, 2e-3]
    assert [g["weight_decay"] for g in Opt.param_groups] == [0.1, 0.0]


def test_data_parallel_slices_partition_the_global_batch(text_data):
    whole = TrainBatches([text_data["train"]], None, 0, SEQ + 1, 8, 2, dp_rank=0, dp_size=1)
    halves = [TrainBatches([text_data["train"]], None, 0, SEQ + 1, 8, 2, dp_rank=r, dp_size=2) for r in (0, 1)]
    for _ in range(2):
        ref = [b["tokens"] for b in whole.next_batches()]
        got = [b["tokens"] for h in halves for b in h.next_batches()]
        assert len(ref) == 4 and all((a == b).all() for a, b in zip(ref, got))


def test_train_batches_resume_where_they_stopped(text_data):
    prefixes = [text_data["train"], text_data["train"]]
    run = TrainBatches(prefixes, [0.25, 0.75], 5, SEQ + 1, 8, 2, dp_rank=1, dp_size=2)
    for _ in range(3):
        run.next_batches()
    state = run.state_dict()
    assert state["consumed"] == 24 and state["counts"] == [6, 18]  # the blend weights, global samples
    resumed = TrainBatches(prefixes, [0.25, 0.75], 5, SEQ + 1, 8, 2, dp_rank=1, dp_size=2)
    resumed.load_state_dict(state)
    for a, b in zip(run.next_batches(), resumed.next_batches()):
        assert (a["tokens"] == b["tokens"]).all() and (a["labels"] == b["labels"]).all()
    with pytest.raises(ValueError, match="data state is for"):
        TrainBatches(prefixes[:1], None, 5, SEQ + 1, 8, 2, dp_rank=1, dp_size=2).load_state_dict(state)


def test_validation_scores_only_the_targets(text_data):
    val = ValidationBatches(text_data["valid"], SEQ + 1, global_batch_size=12, micro_batch_size=2, dp_rank=0,
                            dp_size=1)
    assert len(val) == 9  # 100 LAMBADA examples -> 9 global batches of 12, the last padded with mask-0 rows
    assert float(val.batches[-1][-1]["loss_mask"].sum()) == 0.0
    for micro in val.batches[0]:
        mask = micro["loss_mask"]  # long passages keep their last 17 tokens: the target word ends each row
        assert (mask[:, -1] == 1).all() and (mask.sum(1) < SEQ / 2).all()


def _load(*overrides, path=None):
    """The run config, with its paths checked as a run checks them before building anything."""
    cfg, paths = load_stage_config(PretrainRunConfig, PretrainPaths, path, list(overrides))
    paths.check(cfg)
    return cfg


def test_config_cross_checks(text_data, tmp_path):
    with pytest.raises(ValueError, match="num_attention_heads.*tensor_model_parallel_size"):
        _load("--model.preset=debug", "--parallel.tensor_model_parallel_size=3")
    with pytest.raises(ValueError, match=r"stored sequences have 17 tokens, but model.seq_length=32"):
        _load("--model.preset=debug", "--model.seq_length=32", f"--paths.train_prefixes=[{text_data['train']}]")
    with pytest.raises(ValueError, match="global_batch_size"):
        _load("--model.preset=debug", "--train.global_batch_size=10", "--train.micro_batch_size=4")
    main = tmp_path / "main"
    with pytest.raises(ValueError, match="evaluation branch must write elsewhere"):
        _load("--model.preset=debug", f"--paths.branch_from={main}/iter_0000004", f"--paths.save_dir={main}")
    with pytest.raises(ConfigError, match="unknown key"):
        _load("--optim.learning_rate=1")


@pytest.mark.parametrize("name", ["tiny_target", "pythia_160m", "pythia_410m", "pythia_1b", "pythia_2.8b"])
def test_example_configs_load(name):
    cfg = _load(path=os.path.join(REPO_ROOT, "examples", "configs", f"{name}.yaml"))
    cfg.validate(1 if name.startswith("tiny") else 8)  # the pythia layouts are for one node of 8 GPUs
    if name.startswith("pythia"):  # the BLISS/MATES target recipe
        assert (cfg.train.global_batch_size, cfg.model.seq_length, cfg.optim.lr) == (512, 1024, 1e-3)
        assert (cfg.schedule.warmup_steps, cfg.optim.adam_beta2, cfg.optim.weight_decay) == (2000, 0.95, 0.1)
        assert math.isclose(cfg.optim.clip_grad, 1.0) and cfg.model.preset == name
