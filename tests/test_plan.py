"""The dry run (``--run.dry_run=true``): every stage's plan of models, memory, steps, tokens and FLOPs, its refusal
of a layout over ``--run.gpu_memory_gb``, and its numbers against the presets and the schedule arithmetic.

Each dry run is a subprocess, as a user runs it (and so that its in-process fake process group never meets another
test's).
"""

import os
import re
import subprocess
import sys

import pytest

from megatron_bliss.config import load_stage_config
from megatron_bliss.models.presets import get_preset, num_parameters, preset_num_parameters
from megatron_bliss.pipeline.config import PipelinePaths, PipelineRunConfig
from tests.conftest import REPO_ROOT

CONFIGS = os.path.join(REPO_ROOT, "examples", "configs")


def dry_run(module: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def memory_rows(out: str) -> dict:
    """``{(phase, ranks): (parameters, peak GiB)}`` from the memory table."""
    rows = {}
    for m in re.finditer(r"^\| (\S+) \| ([^|]+) \| ([\d,]+) \|.*\| ([\d.]+) \|$", out, re.M):
        rows[(m.group(1), m.group(2).strip())] = (int(m.group(3).replace(",", "")), float(m.group(4)))
    return rows


def phase_rows(out: str) -> dict:
    """``{phase: (kind, steps, tokens, flops)}`` from the schedule table."""
    rows = {}
    for m in re.finditer(r"^\| (\S+) \| (pretrain|selection|eval) \| ([\d,]+) \| ([\d,]+) \| ([\d.e+-]+) \|", out,
                         re.M):
        rows[m.group(1)] = (m.group(2), int(m.group(3).replace(",", "")), int(m.group(4).replace(",", "")),
                            float(m.group(5)))
    return rows


def expected_tokens(path: str, world: int = 8) -> dict:
    """Tokens per phase from the config alone: steps x global batch x seq_length (scoring: the round's shard, taken
    as the sequences its training draws from the selection when the shard does not exist)."""
    cfg, _ = load_stage_config(PipelineRunConfig, PipelinePaths, path)
    s, seq = cfg.steps, cfg.target.seq_length
    out = {"round0/target": s.target_warmup_steps * cfg.train.global_batch_size * seq,
           "round0/proxy": s.proxy_warmup_steps * cfg.proxy_train.global_batch_size * seq}
    shard = round(s.target_round_steps * cfg.train.global_batch_size / cfg.selection.fraction)
    for r in range(cfg.run.rounds + 1):
        out[f"round{r}/eval"] = s.eval_branch_steps * cfg.train.global_batch_size * seq
        if cfg.eval.tasks:
            out[f"round{r}/lm_eval"] = 0  # the harness's tokens depend on its tasks and are not counted
        if r:
            out[f"round{r}/bilevel"] = cfg.bilevel.outer_steps * cfg.bilevel.micro_batch_size * world * seq
            out[f"round{r}/score"] = shard * seq
            out[f"round{r}/select"] = 0
            out[f"round{r}/target"] = s.target_round_steps * cfg.train.global_batch_size * seq
    return out


@pytest.mark.parametrize("name", ["bliss_410m.yaml", "bliss_1b.yaml", "bliss_2.8b.yaml"])
def test_pipeline_dry_run_prints_the_plan(name):
    path = os.path.join(CONFIGS, name)
    out = dry_run("megatron_bliss.pipeline", "--config", path, "--run.dry_run=true", "--run.world_size=8",
                  "--run.gpu_memory_gb=80").stdout
    assert "on 8 GPUs, limit 80 GiB per GPU" in out
    assert "KL logits from the frozen" in out and "Rules: bf16 training holds 2 B" in out
    cfg, _ = load_stage_config(PipelineRunConfig, PipelinePaths, path)
    memory = memory_rows(out)
    assert memory[("round0/target", "0-7")][0] == num_parameters(cfg.target)
    assert memory[("round0/proxy", "0-7")][0] == num_parameters(cfg.proxy)
    score_params = memory[("round1/score", "0-7")][0]  # the proxy body and final norm, a (h -> 1) head, no LM head
    assert score_params == num_parameters(cfg.proxy, output_layer=False) + cfg.proxy.hidden_size + 1
    assert memory[("round1/bilevel", "0-7")][0] == (num_parameters(cfg.proxy) + score_params
                                                    + num_parameters(cfg.target))
    assert all(peak < 80 for _, peak in memory.values())

    phases = phase_rows(out)
    expected = expected_tokens(path)
    assert {k: v[2] for k, v in phases.items()} == expected
    total = re.search(r"^total: ([\d,]+) tokens, ([\d.e+]+) FLOPs; target pretraining ([\d,]+) tokens", out, re.M)
    assert int(total.group(1).replace(",", "")) == sum(expected.values())
    pretrain = sum(v for k, v in expected.items() if k.endswith("/target"))
    assert int(total.group(3).replace(",", "")) == pretrain == 5 * 10000 * 512 * 1024  # about 26B target tokens
    assert float(total.group(2)) == pytest.approx(sum(v[3] for v in phases.values()), rel=1e-2)
    share = float(re.search(r"\(([\d.]+) % of all FLOPs\)", out).group(1))
    selection = sum(v[3] for v in phases.values() if v[0] == "selection")
    assert share == pytest.approx(100 * selection / float(total.group(2)), abs=0.1)


def test_pretrain_dry_run_counts_presets_and_divides_over_tp_pp():
    path = os.path.join(CONFIGS, "pythia_2.8b.yaml")
    out = dry_run("megatron_bliss.pretrain", "--config", path, "--run.dry_run", "--run.world_size", "1").stdout
    params, peak = memory_rows(out)[("pretrain", "0")]
    assert params == preset_num_parameters("pythia_2.8b")
    # 2 + 4 + 12 bytes per parameter (one rank: nothing to shard) + 34 s b h per layer + 10 B per logit
    m = get_preset("pythia_2.8b")
    expect = params * 18 + 34 * 1024 * 4 * m.hidden_size * m.num_layers + 10 * 4 * 1024 * m.padded_vocab_size()
    assert peak == pytest.approx(expect / 2 ** 30, abs=0.06)

    out = dry_run("megatron_bliss.pretrain", "--config", path, "--run.dry_run=true", "--run.world_size=8",
                  "--parallel.tensor_model_parallel_size=2", "--parallel.pipeline_model_parallel_size=2").stdout
    rows = memory_rows(out)
    h, f, layers, tp = m.hidden_size, m.ffn_hidden_size, m.num_layers // 2, 2
    sharded = 4 * h * h + 3 * h + 2 * h * f + f  # QKV, projection, fc1 and fc2 weights, QKV and fc1 biases
    replicated = 6 * h  # two LayerNorms, the row-parallel biases of the projection and fc2
    per_layer = sharded // tp + replicated
    vocab = m.padded_vocab_size(tp) * h // tp
    assert rows[("pretrain", "pp stage 0: 0-3")][0] == layers * per_layer + vocab
    assert rows[("pretrain", "pp stage 1: 4-7")][0] == layers * per_layer + vocab + 2 * h


def test_oversized_layout_is_refused_naming_phase_estimate_and_limit():
    path = os.path.join(CONFIGS, "bliss_2.8b.yaml")
    proc = dry_run("megatron_bliss.pipeline", "--config", path, "--run.dry_run=true", "--run.gpu_memory_gb=1",
                   check=False)
    assert proc.returncode == 1
    assert re.search(r"dry run refused: round0/target: rank\(s\) 0-7 need an estimated [\d.]+ GiB, more than "
                     r"--run.gpu_memory_gb=1", proc.stderr), proc.stderr[-2000:]
    proc = dry_run("megatron_bliss.pretrain", "--config", os.path.join(CONFIGS, "pythia_1b.yaml"),
                   "--run.gpu_memory_gb=1", check=False)
    assert proc.returncode != 0 and "add --run.dry_run=true" in proc.stderr


def test_bilevel_and_score_stages_accept_the_flag():
    out = dry_run("megatron_bliss.bilevel", "--proxy.preset=pythia_160m", "--target.preset=pythia_410m",
                  "--run.dry_run=true", "--run.world_size=2").stdout
    rows = memory_rows(out)
    assert rows[("bilevel", "0-1")][0] > num_parameters(get_preset("pythia_410m"))
    assert re.search(r"^\| bilevel \| selection \| 100 \| 819,200 \|", out, re.M)  # 100 steps x 4 x 2 x 1024
    out = dry_run("megatron_bliss.score", "--model.preset=pythia_160m", "--scoring.max_sequences=1024",
                  "--paths.checkpoint=ckpt", "--paths.data_prefix=missing", "--paths.output_dir=out",
                  "--run.dry_run=true", "--run.world_size=2").stdout
    assert re.search(r"^\| score \| selection \| 16 \| 1,048,576 \|", out, re.M)  # 1024 / (32 x 2) micro-batches
