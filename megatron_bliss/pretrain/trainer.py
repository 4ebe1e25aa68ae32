"""PretrainTrainer: the target's training loop on megatron-core's pipeline schedules, DDP and optimizer.

One step = one global batch: this rank's micro-batches go through ``get_forward_backward_func()`` (no pipelining,
1F1B, or interleaved 1F1B with virtual stages), ``finalize_model_grads`` reduces gradients over data-parallel ranks
(and tied/embedding groups), then the megatron optimizer clips and steps with the WSD learning rate of that step.
The trainer is ``Stateful``: step, schedule and sampler position go into every checkpoint, with the weights,
the optimizer and all ranks' RNG states, so a resumed run repeats the uninterrupted run's losses.

Starting point, in order of precedence: the latest checkpoint of ``paths.save_dir`` (resume); the main run's
checkpoint named by ``paths.branch_from`` (evaluation branch: decays from the fork for ``branch.steps`` into its own
directory, reading the main run's files only); ``paths.load`` (full state, or weights only under any layout).
"""

from __future__ import annotations

import logging
import math
import os
import time

import torch
from torch.distributed.checkpoint.stateful import Stateful

from megatron_bliss import checkpointing as ckpt
from megatron_bliss import parallel
from megatron_bliss.config import config_hash, dump
from megatron_bliss.log import MetricsWriter
from megatron_bliss.models.presets import model_flops_per_token
from megatron_bliss.pretrain.build import build_model_and_optimizer
from megatron_bliss.pretrain.config import PretrainPaths, PretrainRunConfig
from megatron_bliss.pretrain.data import TrainBatches, ValidationBatches
from megatron_bliss.pretrain.forward_step import lm_eval_forward_step, lm_forward_step
from megatron_bliss.pretrain.schedule import WSDSchedule
from megatron_bliss.pretrain.throughput import detect_peak_flops, throughput_metrics

logger = logging.getLogger(__name__)


class PretrainTrainer(Stateful):
    """Builds model, optimizer and data for a :class:`PretrainRunConfig` and trains it.

    Args:
        cfg: the run configuration (validated again against the actual world size).
        paths: the files the run reads and writes.
        train_data: source of micro-batches with ``next_batches()``/``state_dict()``; default: the indexed datasets
            ``paths.train_prefixes`` (benchmarks pass synthetic batches).
        valid_data: iterable of per-step micro-batch lists; default: ``paths.valid_prefix`` when set.
    """

    def __init__(self, cfg: PretrainRunConfig, paths: PretrainPaths, train_data=None, valid_data=None):
        from megatron.core import parallel_state as ps
        from megatron.core.pipeline_parallel import get_forward_backward_func

        self.cfg, self.paths = cfg, paths
        parallel.initialize(cfg.parallel)
        cfg.validate(parallel.world_size())
        paths.check(cfg)
        t = cfg.train
        self.device = parallel.get_device()
        dp_rank, dp_size = parallel.data_parallel_rank_and_size()
        self.tp_rank = ps.get_tensor_model_parallel_rank()
        self.is_last_stage = ps.is_pipeline_last_stage(ignore_virtual=True)
        self.dp_size = dp_size
        built = build_model_and_optimizer(cfg)
        self.chunks, self.model, self.optimizer = built.chunks, built.wrapped, built.optimizer
        self.schedule = WSDSchedule(cfg.schedule, cfg.optim.lr)
        sample_length = cfg.model.seq_length + 1
        self.train_data = train_data or TrainBatches(
            paths.train_prefixes, cfg.data.train_weights, cfg.data.seed, sample_length, t.global_batch_size,
            t.micro_batch_size, dp_rank, dp_size, self.device)
        if valid_data is None and paths.valid_prefix and t.eval_interval:
            valid_data = ValidationBatches(paths.valid_prefix, sample_length, t.global_batch_size,
                                           t.micro_batch_size, dp_rank, dp_size, self.device, t.eval_batches)
        self.valid_data = valid_data
        self.forward_backward = get_forward_backward_func()
        self.step = 0
        self.train_steps = t.train_steps
        self.branch_end: int | None = None
        self.flops_per_token = model_flops_per_token(cfg.model)
        self.peak_flops = cfg.logging.peak_flops or detect_peak_flops()
        self.checkpoints = ckpt.CheckpointManager(paths.save_dir, cfg.checkpoint.keep_last)
        self.model_state = ckpt.ModelState(self.chunks, cfg.model, "target")
        self._saved_step: int | None = None

    # ---- the loop -------------------------------------------------------------------------------------------
    def train(self) -> dict:
        """Loads the starting point, trains to the last step (validating, logging, saving) and returns the last
        step's metrics."""
        from tqdm import tqdm

        self.load()
        cfg, run_dir = self.cfg, self.paths.metrics_dir()
        if run_dir and parallel.is_rank0():
            dump(cfg, os.path.join(run_dir, "config.yaml"), paths=self.paths)
        writer = MetricsWriter(run_dir, purge_step=self.step, tensorboard=cfg.logging.tensorboard) if run_dir else None
        bar = tqdm(total=self.train_steps, initial=self.step, desc="pretrain", dynamic_ncols=True,
                   disable=not (parallel.is_rank0() and cfg.logging.progress_bar))
        metrics: dict = {}
        if self.paths.save_dir and cfg.checkpoint.save_initial and self.step == 0:
            # weights only and no latest marker: a starting point for other runs (checkpoint.load_weights_only)
            self.checkpoints.save(0, {"model": self.model_state}, mark_latest=False)
        try:
            while self.step < self.train_steps:
                metrics = self.train_step()
                done = self.step == self.train_steps
                interval = cfg.train.eval_interval
                if self.valid_data is not None and interval and (self.step % interval == 0 or done):
                    metrics["val_loss"] = self.evaluate()
                if writer and (self.step % cfg.logging.log_interval == 0 or done or "val_loss" in metrics):
                    writer.log(self.step, metrics)
                bar.update(1)
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}", refresh=False)
                if not math.isfinite(metrics["loss"]):
                    raise FloatingPointError(f"loss is {metrics['loss']} at step {self.step}")
                if self.paths.save_dir and (done or (cfg.checkpoint.save_interval
                                                         and self.step % cfg.checkpoint.save_interval == 0)):
                    self.save()
        finally:
            bar.close()
            if writer:
                writer.close()
        return metrics

    def train_step(self) -> dict:
        """One optimizer step on the next global batch; returns loss, lr, grad norm and throughput."""
        start = time.perf_counter()
        batches = self.train_data.next_batches()
        lr = self.schedule.apply(self.optimizer, self.step, self.cfg.optim.weight_decay)
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        losses = self.forward_backward(
            forward_step_func=lm_forward_step, data_iterator=self._iterators(batches), model=self.model,
            num_microbatches=len(batches), seq_length=self.cfg.model.seq_length,
            micro_batch_size=self.cfg.train.micro_batch_size, forward_only=False)
        update_ok, grad_norm, _ = self.optimizer.step()
        self.step += 1
        loss = self._reduce_loss([d["lm_loss"] for d in losses])  # CPU-GPU sync point, once per step
        seconds = time.perf_counter() - start
        tokens = self.cfg.train.global_batch_size * self.cfg.model.seq_length
        return {"loss": loss, "lr": lr, "grad_norm": float(grad_norm) if grad_norm is not None else None,
                "skipped": not update_ok, "step_time_s": seconds,
                **throughput_metrics(tokens, seconds, self.flops_per_token, parallel.world_size(), self.peak_flops)}

    @torch.no_grad()
    def evaluate(self) -> float:
        """Token-weighted mean validation loss (over the loss mask) on all of ``valid_data``."""
        for chunk in self.model:
            chunk.eval()
        totals = torch.zeros(2, dtype=torch.float64, device=self.device)
        for batches in self.valid_data:
            out = self.forward_backward(
                forward_step_func=lm_eval_forward_step, data_iterator=self._iterators(batches), model=self.model,
                num_microbatches=len(batches), seq_length=self.cfg.model.seq_length,
                micro_batch_size=self.cfg.train.micro_batch_size, forward_only=True)
            if out and self.tp_rank == 0:
                totals[0] += sum(d["lm_loss_sum"].double() for d in out)
                totals[1] += sum(d["lm_tokens"].double() for d in out)
        for chunk in self.model:
            chunk.train()
        parallel.all_reduce(totals)
        return float(totals[0] / totals[1].clamp_min(1.0))

    def _iterators(self, batches: list):
        return [iter(batches) for _ in self.model] if len(self.model) > 1 else iter(batches)

    def _reduce_loss(self, losses: list) -> float:
        """Global-batch mean loss on every rank: last-stage, TP-rank-0 ranks contribute their mean / dp."""
        value = torch.zeros(1, dtype=torch.float64, device=self.device)
        if losses and self.tp_rank == 0:
            value += torch.stack(losses).double().mean() / self.dp_size
        parallel.all_reduce(value)
        return float(value)

    # ---- state and checkpoints ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Step, schedule and data position (weights, optimizer and RNG are saved beside it)."""
        return {"step": self.step, "schedule": self.schedule.state_dict(), "data": self.train_data.state_dict(),
                "branch_end": self.branch_end}

    def load_state_dict(self, state: dict) -> None:
        """Restores step, schedule and data position; a sampler state of other datasets restarts sampling."""
        self.step = int(state["step"])
        self.schedule.load_state_dict(state.get("schedule", {}))
        self.branch_end = state.get("branch_end")
        if self.branch_end is not None:
            self.train_steps = self.branch_end
        try:
            self.train_data.load_state_dict(state["data"])
        except ValueError as exc:
            logger.warning("data position not restored (%s): sampling starts at the beginning of this blend", exc)

    def _layout(self) -> dict:
        p = self.cfg.parallel
        return {"world_size": parallel.world_size(), "tp": p.tensor_model_parallel_size,
                "pp": p.pipeline_model_parallel_size, "vpp": p.virtual_pipeline_model_parallel_size}

    def _states(self) -> dict:
        """What a training checkpoint holds: weights, optimizer, this trainer's state and every rank's RNG."""
        return {"model": self.model_state, "optimizer": ckpt.MegatronOptimizerState(self.optimizer, self.model_state),
                "trainer": self, "rng": ckpt.RNGState(self._layout())}

    def save(self) -> None:
        """Writes ``iter_{step}`` (weights, optimizer, trainer state, RNG) then the latest marker; all ranks call."""
        if self._saved_step == self.step:
            return
        if self.cfg.optim.overlap_param_gather:
            for chunk in self.model:  # the all-gather of updated shards is otherwise deferred to the next forward
                chunk.start_param_sync(force_sync=True)
        self.checkpoints.save(self.step, self._states(), {"config_hash": config_hash(self.cfg)})
        self._saved_step = self.step

    def load(self) -> None:
        """Restores the starting point (see the module docstring); does nothing for a fresh run."""
        c, b, p = self.cfg.checkpoint, self.cfg.branch, self.paths
        latest = self.checkpoints.latest_step()
        if latest is not None:
            self._load_full(self.checkpoints.iteration_dir(latest))
            self._saved_step = self.step
        elif p.branch_from:
            self._load_full(ckpt.resolve(p.branch_from))
            self.branch_end = self.train_steps = self.step + b.steps
            self.schedule.start_decay(self.step, b.half_life)
            logger.info("evaluation branch: steps %d..%d, lr half-life %g", self.step, self.branch_end, b.half_life)
        elif p.load and c.load_weights_only:
            path = ckpt.resolve(p.load)
            ckpt.load(path, {"model": self.model_state})
            self.optimizer.reload_model_params()  # fp32 main params follow the loaded weights
            logger.info("loaded weights only from %s", path)
        elif p.load:
            self._load_full(ckpt.resolve(p.load))

    def _load_full(self, path: str) -> None:
        if self.cfg.optim.use_distributed_optimizer:
            self._create_optimizer_state()
        ckpt.load(path, self._states())
        if self.cfg.optim.use_distributed_optimizer:
            self._unshare_adam_steps()
        logger.info("resumed from %s at step %d", path, self.step)

    def _unshare_adam_steps(self) -> None:
        """megatron-core 0.16's distributed optimizer, loading into plain torch AdamW (no TE/Apex), gives every
        parameter the same ``step`` tensor; AdamW increments it in place once per parameter, which would corrupt
        the bias correction from the first resumed step on. Give each parameter its own copy."""
        optimizers = getattr(self.optimizer, "chained_optimizers", [self.optimizer])
        for opt in optimizers:
            for state in opt.optimizer.state.values():
                if torch.is_tensor(state.get("step")):
                    state["step"] = state["step"].clone()

    def _create_optimizer_state(self) -> None:
        """One zero-gradient, zero-lr step: torch.optim creates Adam state lazily, and the distributed optimizer's
        loading state dict needs it to exist (parameters are unchanged)."""
        for group in self.optimizer.param_groups:
            group["lr"], group["weight_decay"] = 0.0, 0.0
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        self.optimizer.step()


def run_pretrain(cfg: PretrainRunConfig, paths: PretrainPaths) -> dict:
    """Runs (or resumes) one pretraining run; returns the last step's metrics."""
    return PretrainTrainer(cfg, paths).train()
