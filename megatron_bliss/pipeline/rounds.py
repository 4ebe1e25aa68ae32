"""The BLISS schedule, orchestration only: warm-up, then rounds of bilevel -> score -> select -> train -> evaluate.

Every phase is another package's public ``run_*``/trainer called with a config built here; this module only decides
paths, steps and learning rates, and records each finished phase in the manifest (so a rerun resumes at the first
unfinished phase, and each phase resumes from its own checkpoints inside). Layout of ``paths.run_dir``::

    manifest.json  config.yaml  report/
    round0/warmup_subset.{bin,idx}   target/ (iter_*, metrics)   proxy/   eval/
    round{r}/bilevel/ (checkpoints, score/)   scores/scores.npy   subset.{bin,idx}   target/   eval/

The random baseline (``run.method=random``) runs the same schedule with a seeded random subset of the same size and
no bilevel or scoring phase.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable

import numpy as np

from megatron_bliss import parallel
from megatron_bliss.config import dump
from megatron_bliss.models.presets import ModelConfig, model_flops_per_token
from megatron_bliss.pipeline.config import PipelinePaths, PipelineRunConfig, manifest_hash
from megatron_bliss.pipeline.manifest import Manifest, phase_key

logger = logging.getLogger(__name__)


def _data_parallel(cfg: PipelineRunConfig):
    """The pipeline's layout without model parallelism: the proxy-sized phases run data-parallel over every rank."""
    return dataclasses.replace(cfg.parallel, tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
                               virtual_pipeline_model_parallel_size=None)


def _lm_flops(model: ModelConfig, steps: int, train_cfg) -> float:
    tokens = steps * train_cfg.global_batch_size * model.seq_length
    return model_flops_per_token(model) * tokens


class BlissPipeline:
    """Builds and runs the phases of one run directory in order, skipping those the manifest records as done."""

    def __init__(self, cfg: PipelineRunConfig, paths: PipelinePaths):
        cfg.validate()
        paths.check(cfg)
        self.cfg, self.paths = cfg, paths
        parallel.initialize(_data_parallel(cfg))
        self.manifest = Manifest(paths.run_dir, manifest_hash(cfg, paths), force=cfg.run.force,
                                 writer=parallel.is_rank0())
        if parallel.is_rank0():
            dump(cfg, os.path.join(paths.run_dir, "config.yaml"), paths=paths)
        self.phases: list[tuple[str, Callable[[], dict]]] = self._plan()

    # ------------------------------------------------------------------------------------------------- the plan
    def _plan(self) -> list:
        c = self.cfg
        phases = [(phase_key(0, "warmup_subset"), self.warmup_subset),
                  (phase_key(0, "target"), self.warmup_target),
                  (phase_key(0, "eval"), lambda: self.eval_branch(0))]
        if c.run.method == "bliss":
            phases.append((phase_key(0, "proxy"), self.warmup_proxy))
        for r in range(1, c.run.rounds + 1):
            if c.run.method == "bliss":
                phases += [(phase_key(r, "bilevel"), lambda r=r: self.bilevel(r)),
                           (phase_key(r, "score"), lambda r=r: self.score(r))]
            phases += [(phase_key(r, "select"), lambda r=r: self.select(r)),
                       (phase_key(r, "target"), lambda r=r: self.round_target(r)),
                       (phase_key(r, "eval"), lambda r=r: self.eval_branch(r))]
        return phases

    def run(self) -> str:
        """Runs every unfinished phase; returns the report directory."""
        from megatron_bliss.pipeline.report import write_report

        for key, phase in self.phases:
            if self.manifest.is_done(key):
                parallel.log_rank0("pipeline: %s already done", key)
                continue
            parallel.log_rank0("pipeline: %s", key)
            start = time.time()
            info = phase()
            parallel.barrier()
            info["seconds"] = time.time() - start
            outputs = info.pop("outputs", [])
            self.manifest.mark_done(key, outputs=outputs, info=info)
            if parallel.is_rank0():
                write_report([self.paths.run_dir], os.path.join(self.paths.run_dir, "report"))
        parallel.barrier()
        report = os.path.join(self.paths.run_dir, "report")
        parallel.log_rank0("report: %s/report.md", report)
        return report

    # --------------------------------------------------------------------------------------------- the phases
    def _paths(self, r: int) -> dict:
        d = os.path.join(self.paths.run_dir, f"round{r}")
        return {"target": os.path.join(d, "target"), "eval": os.path.join(d, "eval"),
                "bilevel": os.path.join(d, "bilevel"), "score": os.path.join(d, "bilevel", "score"),
                "scores": os.path.join(d, "scores"), "subset": os.path.join(d, "subset" if r else "warmup_subset"),
                "proxy": os.path.join(d, "proxy")}

    def warmup_subset(self) -> dict:
        from megatron_bliss.data.subsets import write_subset

        out = self._paths(0)["subset"]
        if parallel.is_rank0():
            write_subset(self.paths.shards[0], None, out, method="random",
                         fraction=self.cfg.data.warmup_fraction, seed=self.cfg.parallel.seed)
        return {"outputs": [out + ".bin", out + ".idx"]}

    def warmup_target(self) -> dict:
        c, p = self.cfg, self._paths(0)
        metrics = self._pretrain(model=c.target, prefixes=[p["subset"]], save_dir=p["target"],
                                 total_steps=c.steps.target_warmup_steps)
        return {"kind": "pretrain", "steps": c.steps.target_warmup_steps, "metrics": metrics,
                "flops": _lm_flops(c.target, c.steps.target_warmup_steps, c.train)}

    def warmup_proxy(self) -> dict:
        c, p = self.cfg, self._paths(0)
        metrics = self._pretrain(model=c.proxy, prefixes=[p["subset"]], save_dir=p["proxy"],
                                 total_steps=c.steps.proxy_warmup_steps, proxy=True)
        return {"kind": "selection", "steps": c.steps.proxy_warmup_steps, "metrics": metrics,
                "flops": _lm_flops(c.proxy, c.steps.proxy_warmup_steps, c.proxy_train)}

    def bilevel(self, r: int) -> dict:
        from megatron_bliss.bilevel.config import BilevelPaths, BilevelRunConfig
        from megatron_bliss.bilevel.trainer import run_bilevel

        c, p, prev = self.cfg, self._paths(r), self._paths(r - 1)
        b = dataclasses.replace(c.bilevel, seed=c.parallel.seed + r)
        paths = BilevelPaths(train_prefix=self.paths.shards[r], val_prefix=self.paths.valid_prefix,
                             warmup_proxy=self._paths(0)["proxy"], target=prev["target"] if b.kl_coef > 0 else "",
                             init_score=prev["score"] if r > 1 else "", output_dir=p["bilevel"])
        bcfg = BilevelRunConfig(proxy=c.proxy, target=c.target if b.kl_coef > 0 else None,
                                parallel=_data_parallel(c), bilevel=b)
        metrics = run_bilevel(bcfg, paths)
        return {"kind": "selection", "steps": b.outer_steps, "metrics": metrics, "flops": self._bilevel_flops(b),
                "outputs": [p["score"]]}

    def score(self, r: int) -> dict:
        from megatron_bliss.score.config import ScorePaths, ScoreRunConfig
        from megatron_bliss.score.scoring import run_scoring

        c, p = self.cfg, self._paths(r)
        scfg = ScoreRunConfig(model=c.proxy, parallel=_data_parallel(c), scoring=c.scoring)
        path = run_scoring(scfg, ScorePaths(checkpoint=p["score"], data_prefix=self.paths.shards[r],
                                            output_dir=p["scores"]))
        n = len(np.load(path, mmap_mode="r"))
        flops = model_flops_per_token(c.proxy, output_layer=False) / 3 * n * c.proxy.seq_length
        return {"kind": "selection", "sequences": n, "flops": flops, "outputs": [path]}

    def select(self, r: int) -> dict:
        from megatron_bliss.data.sequences import read_sequences
        from megatron_bliss.data.subsets import write_subset
        from megatron_bliss.selection.select import select_indices

        c, p = self.cfg, self._paths(r)
        info = {"kind": "selection", "method": c.run.method}
        if parallel.is_rank0():
            selection = dataclasses.replace(c.selection, seed=c.parallel.seed + r)
            if c.run.method == "bliss":
                scores = np.load(os.path.join(p["scores"], "scores.npy"))
                indices = select_indices(scores, selection)
                info["threshold"] = float(scores[indices].min())
            else:
                n = len(read_sequences(self.paths.shards[r]))
                indices = select_indices(np.zeros(n), dataclasses.replace(selection, method="random"))
            write_subset(self.paths.shards[r], indices, p["subset"])
            info["selected"] = int(len(indices))
        return {**info, "outputs": [p["subset"] + ".bin", p["subset"] + ".idx"]}

    def round_target(self, r: int) -> dict:
        c, p = self.cfg, self._paths(r)
        total = c.steps.target_warmup_steps + r * c.steps.target_round_steps
        metrics = self._pretrain(model=c.target, prefixes=[p["subset"]], save_dir=p["target"],
                                 total_steps=total, lr_multiplier=c.steps.round_lr_factor ** r,
                                 load=self._paths(r - 1)["target"])
        return {"kind": "pretrain", "steps": c.steps.target_round_steps, "metrics": metrics,
                "flops": _lm_flops(c.target, c.steps.target_round_steps, c.train)}

    def eval_branch(self, r: int) -> dict:
        c, p = self.cfg, self._paths(r)
        prefixes = [p["subset"]]
        metrics = self._pretrain(model=c.target, prefixes=prefixes, save_dir=p["eval"], total_steps=0,
                                 lr_multiplier=c.steps.round_lr_factor ** r, branch_from=p["target"])
        return {"kind": "eval", "steps": c.steps.eval_branch_steps, "val_loss": metrics.get("val_loss"),
                "flops": _lm_flops(c.target, c.steps.eval_branch_steps, c.train)}

    # ------------------------------------------------------------------------------------------------- helpers
    def _pretrain(self, *, model: ModelConfig, prefixes, save_dir: str, total_steps: int, lr_multiplier: float = 1.0,
                  load: str | None = None, branch_from: str | None = None, proxy: bool = False) -> dict:
        """Runs one target (or proxy warm-up) pretraining phase; returns its last metrics."""
        from megatron_bliss.pretrain.config import (
            BranchConfig,
            CheckpointConfig,
            LoggingConfig,
            PretrainPaths,
            PretrainRunConfig,
        )
        from megatron_bliss.pretrain.data import PretrainDataConfig
        from megatron_bliss.pretrain.trainer import run_pretrain

        cfg = self.cfg
        train = cfg.proxy_train if proxy else cfg.train
        branch = BranchConfig()
        if branch_from is not None:
            branch = BranchConfig(steps=cfg.steps.eval_branch_steps, half_life=cfg.steps.eval_branch_half_life)
            train = dataclasses.replace(train, eval_interval=cfg.steps.eval_branch_steps)
        else:
            train = dataclasses.replace(train, train_steps=total_steps)
        run = PretrainRunConfig(
            model=model,
            parallel=_data_parallel(cfg) if proxy else cfg.parallel,
            data=PretrainDataConfig(seed=cfg.parallel.seed),
            train=train,
            optim=cfg.proxy_optim if proxy else cfg.optim,
            schedule=dataclasses.replace(cfg.schedule, lr_multiplier=lr_multiplier),
            checkpoint=CheckpointConfig(keep_last=1, save_interval=None if branch_from else cfg.run.save_interval),
            branch=branch,
            logging=LoggingConfig(progress_bar=False),
        )
        paths = PretrainPaths(train_prefixes=list(prefixes), valid_prefix=self.paths.valid_prefix, save_dir=save_dir,
                              load=load, branch_from=branch_from)
        return run_pretrain(run, paths)

    def _bilevel_flops(self, b) -> float:
        """Estimated FLOPs of a bilevel round, in proxy fwd+bwd units per outer step: inner steps, the validation
        gradient, two per curvature product of the solve, and the mixed term (about two); plus the target's
        forward for the KL term."""
        c = self.cfg
        tokens = b.micro_batch_size * parallel.world_size() * c.proxy.seq_length
        units = b.inner_steps + 1 + 2 * b.solver_steps + 2
        flops = b.outer_steps * units * model_flops_per_token(c.proxy) * tokens
        if b.kl_coef > 0:
            flops += b.outer_steps * (b.inner_steps + b.solver_steps) * model_flops_per_token(c.target) / 3 * tokens
        return flops


def run_pipeline(cfg: PipelineRunConfig, paths: PipelinePaths) -> str:
    """Runs (or resumes) a whole BLISS run; returns the report directory."""
    return BlissPipeline(cfg, paths).run()

