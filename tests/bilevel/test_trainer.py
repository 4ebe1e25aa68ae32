"""The bilevel round on real text: CLI run, kill -9 and resume with identical metrics, NaN guard, refusal to write
a poisoned checkpoint, and a first selection-quality check with controls (untrained head, sign-flipped
hypergradient)."""

import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import yaml

from megatron_bliss.bilevel import BilevelConfig, BilevelRunConfig
from megatron_bliss.bilevel import trainer as trainer_mod
from megatron_bliss.bilevel.config import BilevelPaths
from megatron_bliss.bilevel.trainer import BilevelTrainer, cosine_lr
from megatron_bliss.checkpointing import save_model
from megatron_bliss.log import read_metrics
from megatron_bliss.models.gpt import build_gpt, gpt_logits
from megatron_bliss.models.presets import get_preset
from megatron_bliss.ops import reference as ref
from tests.bilevel import realtext
from tests.conftest import REPO_ROOT, run_torchrun

PROXY = dict(preset="debug", vocab_size=8000, make_vocab_size_divisible_by=64, seq_length=64, hidden_size=16,
             num_attention_heads=4, num_layers=2)


def _proxy_config():
    shape = {k: v for k, v in PROXY.items() if k != "preset"}
    return get_preset(PROXY["preset"], **shape)


def _cli(config_path, *overrides, wait=True):
    env = {k: v for k, v in os.environ.items()  # a plain process: not this test process's rendezvous
           if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "megatron_bliss.bilevel", "--config", str(config_path), *overrides]
    for _ in range(3):  # a free port picked for the process group can be taken by another process before binding
        # its own process group, so that a kill of the group (as a scheduler kills a job step) takes the round's
        # helper processes with it (megatron-core's checkpoint writer starts a multiprocessing Manager server)
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        if not wait:
            return proc
        out, _ = proc.communicate(timeout=300)
        if proc.returncode == 0 or "EADDRINUSE" not in out:
            break
    assert proc.returncode == 0, out[-4000:]
    return proc


def _comparable(records):
    return [{k: v for k, v in r.items() if not k.startswith("time_")} for r in records]


@pytest.mark.slow
@pytest.mark.parametrize("solver", [{"solver_init": "warm"},
                                    {"solver": "amortized", "curvature": "gauss_newton", "solver_steps": 1,
                                     "share_inner_step": True}],
                         ids=["sgd warm", "amortized, shared inner step"])
def test_cli_round_resumes_after_kill_with_identical_metrics(tmp_path, solver):
    train, val = realtext.build_prefixes(str(tmp_path))
    config = {"proxy": PROXY, "bilevel": {
        "kl_coef": 0.0, "outer_steps": 8, "micro_batch_size": 4, "val_micro_batch_size": 4,
        "save_interval": 2, "eval_interval": 4, "score_lr": 1e-3, "proxy_lr": 1e-3,
        "tensorboard": False, **solver}, "paths": {"train_prefix": train, "val_prefix": val}}
    path = tmp_path / "round.yaml"
    path.write_text(yaml.safe_dump(config))
    full, killed = tmp_path / "full", tmp_path / "killed"
    _cli(path, f"--paths.output_dir={full}")
    proc = _cli(path, f"--paths.output_dir={killed}", wait=False)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        metrics = killed / "metrics.jsonl"
        if metrics.exists() and sum(1 for _ in open(metrics)) >= 5:  # past the checkpoint at 4, before the end
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "score").exists()
    _cli(path, f"--paths.output_dir={killed}")
    expected, resumed = read_metrics(str(full)), read_metrics(str(killed))
    assert [r["step"] for r in resumed] == list(range(1, 9))
    assert _comparable(resumed) == _comparable(expected)
    assert {"val_loss", "lower_loss", "lower_kl", "weight_entropy", "score_std", "z_residual", "time_solve",
            "eval_loss"} <= set(expected[-1])
    if solver.get("solver") == "amortized":  # z carried across steps and through the checkpoint
        assert "z_residual_kept" in expected[-1] and expected[-1]["z_products"] == 2  # kept r, residual
        assert expected[-1]["z_step"] > 0 and expected[0]["z_residual_kept"] == 1.0  # z = 0 at the round's start
        assert expected[-1]["time_inner"] < expected[-1]["time_solve"]  # the inner step ran inside the hypergradient
        assert expected[0]["lower_loss"] != expected[1]["lower_loss"] and expected[-1]["proxy_grad_norm"] > 0
    assert (full / "score" / "bliss_checkpoint.json").exists() and (full / "config.yaml").exists()
    # a finished round reruns as a no-op
    _cli(path, f"--paths.output_dir={full}")
    assert len(read_metrics(str(full))) == 8


def test_config_errors_name_the_setting():
    with pytest.raises(ValueError, match="bilevel.solver"):
        BilevelConfig(solver="lbfgs")
    with pytest.raises(ValueError, match="micro_batch_size"):
        BilevelConfig(micro_batch_size=1)
    with pytest.raises(ValueError, match="target section"):
        BilevelRunConfig(bilevel=BilevelConfig(kl_coef=0.01)).validate()
    proxy = get_preset("tiny", attention_backend="sdpa")
    with pytest.raises(ValueError, match="attention_backend=sdpa"):
        BilevelRunConfig(proxy=proxy, bilevel=BilevelConfig(kl_coef=0.0, hvp_engine="exact")).validate()
    from megatron_bliss.bilevel.__main__ import main

    with pytest.raises(SystemExit):
        main(["--bilevel.no_such_key=1"])


def test_cosine_schedule():
    assert cosine_lr(0, 100, 1.0, 0.1, 0.1) == pytest.approx(0.1)
    assert cosine_lr(9, 100, 1.0, 0.1, 0.1) == pytest.approx(1.0)
    assert cosine_lr(99, 100, 1.0, 0.1, 0.1) == pytest.approx(0.1, abs=1e-3)
    assert cosine_lr(0, 100, 1.0, 0.0, 0.0) == pytest.approx(1.0)


def _small_round(tmp_path, name, train, val, **overrides):
    b = dict(kl_coef=0.0, outer_steps=3, micro_batch_size=4, val_micro_batch_size=4,
             save_interval=1, eval_interval=0, tensorboard=False, score_lr=1e-3, proxy_lr=1e-3)
    b.update(overrides)
    return BilevelTrainer(BilevelRunConfig(proxy=_proxy_config(), bilevel=BilevelConfig(**b)),
                          BilevelPaths(output_dir=str(tmp_path / name)), train, val)


def test_nan_guard_skips_and_never_checkpoints_poison(tmp_path, monkeypatch, single_process):
    train, _ = realtext.domain_pool(0)
    val = realtext.kjv_validation(str(tmp_path))
    trainer = _small_round(tmp_path, "nan", train, val)
    original = trainer_mod.lower_level_loss

    def poisoned(*args, **kwargs):
        out = original(*args, **kwargs)
        out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(trainer_mod, "lower_level_loss", poisoned)
    before = [p.detach().clone() for p in trainer.proxy.parameters()]
    metrics = trainer.outer_step()
    assert metrics["skipped_inner"] == 1
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.proxy.parameters()))
    monkeypatch.setattr(trainer_mod, "lower_level_loss", original)
    original_hyper = trainer_mod.score_hypergradient

    def poisoned_hyper(*args, **kwargs):
        out = original_hyper(*args, **kwargs)
        out.grads[0] = out.grads[0] * float("nan")
        return out

    monkeypatch.setattr(trainer_mod, "score_hypergradient", poisoned_hyper)
    score_before = [p.detach().clone() for p in trainer.score.parameters()]
    assert trainer.outer_step()["skipped_outer"] == 1
    assert all(torch.equal(a, b) for a, b in zip(score_before, trainer.score.parameters()))
    monkeypatch.setattr(trainer_mod, "score_hypergradient", original_hyper)
    trainer.cfg.bilevel.max_skipped_steps = 1
    monkeypatch.setattr(trainer_mod, "lower_level_loss", poisoned)
    with pytest.raises(FloatingPointError, match="max_skipped_steps"):
        trainer.outer_step()
    with torch.no_grad():
        next(trainer.proxy.parameters()).fill_(float("nan"))
    trainer.step = 5
    trainer.save()
    assert not os.path.exists(os.path.join(trainer.checkpoints.save_dir, "iter_0000005"))


def _warm_proxy(cfg, pool, path, steps=120, seed=0):
    torch.manual_seed(seed)
    proxy = build_gpt(cfg)
    opt = torch.optim.AdamW(proxy.parameters(), lr=3e-3, weight_decay=0.0)
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        batch = torch.from_numpy(pool[rng.integers(0, len(pool), 16)])
        loss = ref.sequence_cross_entropy(gpt_logits(proxy, batch[:, :-1]), batch[:, 1:]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    save_model(path, proxy, cfg, "proxy")


@pytest.mark.slow
def test_ranking_moves_toward_validation_domain(tmp_path, monkeypatch, single_process):
    """Pool: 25 % KJV, 75 % dictionary entries; validation: held-out KJV passages. After a short round the score
    model ranks held-out KJV sequences above the rest; the sign-flipped hypergradient from the same start ranks them
    below, and the untrained head (the start) is in between: the movement comes from the hypergradient's sign."""
    pool, _ = realtext.domain_pool(0)
    held_out, is_kjv = realtext.domain_pool(1)
    val = realtext.kjv_validation(str(tmp_path))
    cfg = get_preset("tiny", vocab_size=8000, make_vocab_size_divisible_by=64, seq_length=64, hidden_size=32)
    _warm_proxy(cfg, pool, str(tmp_path / "warm"))
    original = trainer_mod.score_hypergradient
    aucs = {}
    for name, sign in (("bliss", 1.0), ("flipped", -1.0)):
        def signed(*args, sign=sign, **kwargs):
            out = original(*args, **kwargs)
            out.grads = [sign * g for g in out.grads]
            return out

        monkeypatch.setattr(trainer_mod, "score_hypergradient", signed)
        trainer = BilevelTrainer(BilevelRunConfig(proxy=cfg, bilevel=BilevelConfig(
            kl_coef=0.0, outer_steps=15, micro_batch_size=8, val_micro_batch_size=8, score_lr=1e-3, proxy_lr=1e-4,
            save_interval=1000, eval_interval=0, residual_interval=0, tensorboard=False)),
            BilevelPaths(warmup_proxy=str(tmp_path / "warm"), output_dir=str(tmp_path / name)), pool, val)
        with torch.no_grad():
            aucs["untrained"] = realtext.auc(trainer.score.logit(torch.from_numpy(held_out)).numpy(), is_kjv)
        while trainer.step < trainer.cfg.bilevel.outer_steps:
            trainer.outer_step()
            trainer.step += 1
        with torch.no_grad():
            aucs[name] = realtext.auc(trainer.score.logit(torch.from_numpy(held_out)).numpy(), is_kjv)
    print("held-out KJV AUC:", aucs)
    assert aucs["bliss"] > aucs["untrained"] + 0.25, aucs
    assert aucs["flipped"] < aucs["untrained"] - 0.1, aucs
    assert aucs["bliss"] > 0.75, aucs


def test_round_with_target_kl(tmp_path, single_process):
    """γ > 0: the frozen target is loaded from its checkpoint, its logits enter G, and it stays frozen."""
    pool, _ = realtext.domain_pool(0)
    val = realtext.kjv_validation(str(tmp_path))
    cfg = _proxy_config()
    torch.manual_seed(3)
    target = build_gpt(cfg)
    save_model(str(tmp_path / "target"), target, cfg, "target")
    trainer = BilevelTrainer(BilevelRunConfig(proxy=cfg, target=cfg, bilevel=BilevelConfig(
        kl_coef=0.5, outer_steps=2, micro_batch_size=4, val_micro_batch_size=4,
        save_interval=1000, eval_interval=0, tensorboard=False)),
        BilevelPaths(target=str(tmp_path / "target"), output_dir=str(tmp_path / "kl")), pool, val)
    for a, b in zip(trainer.target.parameters(), target.parameters()):
        assert torch.equal(a, b) and not a.requires_grad
    metrics = trainer.outer_step()
    assert metrics["lower_kl"] > 0 and np.isfinite(metrics["val_loss"])
    with pytest.raises(ValueError, match="target"):
        BilevelRunConfig(proxy=cfg, bilevel=BilevelConfig(kl_coef=0.5)).validate()


def test_sequences_longer_than_the_model_are_refused(tmp_path, single_process):
    pool, _ = realtext.domain_pool(0)
    val = realtext.kjv_validation(str(tmp_path))
    with pytest.raises(ValueError, match="proxy.seq_length is 16"):
        BilevelTrainer(BilevelRunConfig(proxy=get_preset("debug", vocab_size=8000), bilevel=BilevelConfig(
            kl_coef=0.0, tensorboard=False)), BilevelPaths(output_dir=str(tmp_path / "r")), pool, val)


@pytest.mark.dist
def test_checkpoint_saved_at_dp2_loads_at_dp1_and_tp2(tmp_path):
    """Proxy, score model, both optimizers and z saved at DP=2 come back tensor for tensor at DP=1 and at TP=2."""
    script = os.path.join(REPO_ROOT, "tests", "bilevel", "checkpoint_layouts.py")
    run_dir, ref = str(tmp_path / "round"), str(tmp_path / "ref.pt")
    run_torchrun(script, "save", run_dir, ref, nproc=2)
    assert "tensors equal at TP=1, dp=1" in run_torchrun(script, "check", run_dir, ref, "1", nproc=1)
    out = run_torchrun(script, "check", run_dir, ref, "2", nproc=2)
    assert out.count("tensors equal at TP=2") == 2


@pytest.mark.slow
def test_round_runs_at_tensor_parallel_two_and_its_score_model_scores(tmp_path):
    """A whole round with the proxy and the score model at TP=2 (finite-difference Gauss-Newton, amortized z) under
    torchrun, then the round's score model scoring the shard at TP=1 (its checkpoint reshards)."""
    train, val = realtext.build_prefixes(str(tmp_path))
    proxy = {**PROXY, "make_vocab_size_divisible_by": 32}  # the same padded vocabulary at TP=1 and TP=2
    config = {"proxy": proxy, "parallel": {"tensor_model_parallel_size": 2}, "bilevel": {
        "kl_coef": 0.0, "outer_steps": 4, "micro_batch_size": 4, "val_micro_batch_size": 4, "save_interval": 2,
        "eval_interval": 2, "score_lr": 1e-3, "proxy_lr": 1e-3, "hvp_engine": "finite_difference",
        "curvature": "gauss_newton", "solver": "amortized", "solver_steps": 1, "tensorboard": False},
        "paths": {"train_prefix": train, "val_prefix": val, "output_dir": str(tmp_path / "round")}}
    path = tmp_path / "round.yaml"
    path.write_text(yaml.safe_dump(config))
    out = run_torchrun(os.path.join(REPO_ROOT, "megatron_bliss", "bilevel", "__main__.py"), "--config", str(path),
                       timeout=600)
    metrics = read_metrics(str(tmp_path / "round"))
    assert [r["step"] for r in metrics] == [1, 2, 3, 4], out[-2000:]
    assert all(math.isfinite(r["val_loss"]) and math.isfinite(r["hypergrad_norm"]) for r in metrics)
    assert metrics[-1]["hypergrad_norm"] > 0 and "z_residual_kept" in metrics[-1]
    score_cfg = {"model": proxy, "scoring": {"micro_batch_size": 4, "chunk_size": 16, "max_sequences": 32},
                 "paths": {"checkpoint": str(tmp_path / "round" / "score"), "data_prefix": train,
                           "output_dir": str(tmp_path / "scores")}}
    score_path = tmp_path / "score.yaml"
    score_path.write_text(yaml.safe_dump(score_cfg))
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE",
                                                           "LOCAL_RANK")}
    subprocess.run([sys.executable, "-m", "megatron_bliss.score", "--config", str(score_path)], check=True,
                   cwd=REPO_ROOT, env=dict(env, PYTHONPATH=REPO_ROOT), capture_output=True, timeout=300)
    scores = np.load(tmp_path / "scores" / "scores.npy")
    assert scores.shape == (32,) and np.isfinite(scores).all() and scores.std() > 0
