"""The BLISS schedule, orchestration only: warm-up, then rounds of bilevel -> score -> select -> train -> evaluate.

Every phase is another package's public ``run_*``/trainer called with a config built here; this module only decides
paths, steps and learning rates, and records each finished phase in the manifest (so a rerun resumes at the first
unfinished phase, and each phase resumes from its own checkpoints inside). Layout of ``paths.run_dir``::

    manifest.json  config.yaml  report/
    round0/warmup_subset.{bin,idx}   target/ (iter_*, metrics)   proxy/   eval/
    round{r}/bilevel/ (checkpoints, score/)   scores/scores.npy   subset.{bin,idx}   target/   eval/   lm_eval/

The random baseline (``run.method=random``) runs the same schedule with a seeded random subset of the same size and
no bilevel or scoring phase. With ``eval.tasks`` set, every round's evaluation branch is then scored by
lm-evaluation-harness (``round{r}/lm_eval``: results.json, results.md; the summary also in the manifest).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import time
from collections.abc import Callable

import numpy as np

from megatron_bliss import parallel
from megatron_bliss.config import dump
from megatron_bliss.models.presets import ModelConfig, model_flops_per_token
from megatron_bliss.pipeline.config import PROXY_METHODS, PipelinePaths, PipelineRunConfig, manifest_hash
from megatron_bliss.pipeline.manifest import Manifest, phase_key

logger = logging.getLogger(__name__)



def _data_parallel(cfg: PipelineRunConfig):
    """The pipeline's layout without model parallelism: the proxy-sized phases run data-parallel over every rank."""
    return dataclasses.replace(cfg.parallel, tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
                               virtual_pipeline_model_parallel_size=None)


_PHASE_SECTIONS = {"target": {"model": "target"},
                   "proxy": {"model": "proxy", "proxy": "proxy", "train": "proxy_train", "optim": "proxy_optim"}}


def _in_pipeline_terms(message: str, proxy: bool) -> str:
    """A phase's error with its settings named as the pipeline config spells them (``proxy_train.*`` for the
    proxy warm-up's ``train.*``; ``steps.round_lr_factor`` for the per-round ``schedule.lr_multiplier``)."""
    sections = _PHASE_SECTIONS["proxy" if proxy else "target"]
    message = re.sub(r"\b(model|proxy|train|optim)\.(?=[a-z_])",
                     lambda m: sections.get(m.group(1), m.group(1)) + ".", message)
    return message.replace("schedule.lr_multiplier", "steps.round_lr_factor ** round (schedule.lr_multiplier)")


def _lm_flops(model: ModelConfig, steps: int, train_cfg) -> float:
    tokens = steps * train_cfg.global_batch_size * model.seq_length
    return model_flops_per_token(model) * tokens


def score_flops(proxy: ModelConfig, method: str, sequences: int) -> float:
    """Estimated FLOPs of scoring ``sequences`` sequences of a shard by ``method``: one forward of the score model
    (bliss) or of the proxy without its LM head (cosine); gradsim, three with the head (a jvp, or two forwards)."""
    passes = 3 if method == "gradsim" else 1
    return passes * model_flops_per_token(proxy, output_layer=method == "gradsim") / 3 * sequences * proxy.seq_length


class BlissPipeline:
    """Builds and runs the phases of one run directory in order, skipping those the manifest records as done."""

    def __init__(self, cfg: PipelineRunConfig, paths: PipelinePaths):
        cfg.validate()
        paths.check(cfg)
        self.cfg, self.paths = cfg, paths
        parallel.initialize(_data_parallel(cfg))
        self._preflight()
        self.manifest = Manifest(paths.run_dir, manifest_hash(cfg, paths), force=cfg.run.force,
                                 writer=parallel.is_rank0())
        if parallel.is_rank0():
            # config.yaml is the configuration the run was started with; a forced change goes beside it, named by
            # its hash (each phase's manifest entry names the hash it ran under)
            digest = self.manifest.data["config_hash"]
            name = "config.yaml" if digest == self.manifest.original_hash else f"config.{digest}.yaml"
            dump(cfg, os.path.join(paths.run_dir, name), paths=paths)
        self.phases: list[tuple[str, Callable[[], dict], list[str]]] = self._plan()
        if parallel.is_rank0():  # every input file the run will read, hashed once and refused if it changes later
            self.manifest.check_inputs(self._external_inputs())

    # ------------------------------------------------------------------------------------------------- the plan
    def _plan(self) -> list:
        """``(manifest key, phase, its input paths)`` in order; inputs are the files and checkpoint directories the
        phase reads (the shards and the validation set from outside the run, earlier phases' outputs)."""
        c, p0 = self.cfg, self._paths(0)
        valid, subset0 = self._dataset_files(self.paths.valid_prefix), self._dataset_files(p0["subset"])
        phases = [(phase_key(0, "warmup_subset"), self.warmup_subset, self._dataset_files(self.paths.shards[0])),
                  (phase_key(0, "target"), self.warmup_target, subset0 + valid),
                  (phase_key(0, "eval"), lambda: self.eval_branch(0), [p0["target"], *subset0, *valid])]
        phases += self._lm_eval_phases(0)
        method = c.run.method
        if method in PROXY_METHODS:
            phases.append((phase_key(0, "proxy"), self.warmup_proxy, subset0 + valid))
        for r in range(1, c.run.rounds + 1):
            p, prev, shard = self._paths(r), self._paths(r - 1), self._dataset_files(self.paths.shards[r])
            subset = self._dataset_files(p["subset"])
            if method == "bliss":
                bilevel_inputs = [*shard, *valid, p0["proxy"]]
                bilevel_inputs += [prev["target"]] if c.bilevel.kl_coef > 0 else []
                bilevel_inputs += [prev["score"]] if r > 1 else []
                phases += [(phase_key(r, "bilevel"), lambda r=r: self.bilevel(r), bilevel_inputs),
                           (phase_key(r, "score"), lambda r=r: self.score(r),
                            [p["score"], *shard] + ([prev["score"]] if r > 1 else []))]
            elif method != "random":
                if method == "scores":
                    score_inputs = [self._user_scores(r), *shard]
                else:
                    score_inputs = ([p0["proxy"]] if method in PROXY_METHODS else []) + [*shard, *valid]
                phases.append((phase_key(r, "score"), lambda r=r: self.score(r), score_inputs))
            scores = [os.path.join(p["scores"], "scores.npy")] if method != "random" else []
            phases += [(phase_key(r, "select"), lambda r=r: self.select(r), scores + shard),
                       (phase_key(r, "target"), lambda r=r: self.round_target(r), [*subset, prev["target"], *valid]),
                       (phase_key(r, "eval"), lambda r=r: self.eval_branch(r), [p["target"], *subset, *valid])]
            phases += self._lm_eval_phases(r)
        return phases

    def _lm_eval_phases(self, r: int) -> list:
        """Round r's harness evaluation of its evaluation branch, when ``eval.tasks`` names any."""
        if not self.cfg.eval.tasks:
            return []
        return [(phase_key(r, "lm_eval"), lambda: self.lm_eval(r), [self._paths(r)["eval"]])]

    def _external_inputs(self) -> list[str]:
        """The files the run reads from outside its directory: the shards of its rounds and the validation set."""
        files = self._dataset_files(self.paths.valid_prefix)
        for prefix in self.paths.shards[:self.cfg.run.rounds + 1]:
            files += self._dataset_files(prefix)
        if self.cfg.run.method == "scores":
            files += [self._user_scores(r) for r in range(1, self.cfg.run.rounds + 1)]
        return files

    def _user_scores(self, r: int) -> str:
        """``run.method=scores``: the user's score file of round r."""
        return self.paths.scores[r - 1]

    @staticmethod
    def _dataset_files(prefix: str) -> list[str]:
        """The files of an indexed dataset (with a validation set's loss-mask spans, and the provenance sidecar of a
        preprocessed shard or subset where it has one)."""
        from megatron_bliss.data.origins import origins_files

        files = [prefix + ".bin", prefix + ".idx"]
        files += [prefix + ".targets.npy"] if os.path.exists(prefix + ".targets.npy") else []
        return files + origins_files(prefix)

    def run(self) -> str:
        """Runs every unfinished phase; returns the report directory."""
        from megatron_bliss.pipeline.report import write_report

        external = set(self._external_inputs())
        for key, phase, inputs in self.phases:
            if self.manifest.is_done(key):
                parallel.log_rank0("pipeline: %s already done", key)
                continue
            if parallel.is_rank0():
                self.manifest.check_inputs([path for path in inputs if path in external])
            parallel.log_rank0("pipeline: %s", key)
            start = time.time()
            info = phase()
            parallel.barrier()
            info["seconds"] = time.time() - start
            outputs = info.pop("outputs", [])
            self.manifest.mark_done(key, inputs=inputs, outputs=outputs, info=info)
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
                "proxy": os.path.join(d, "proxy"), "lm_eval": os.path.join(d, "lm_eval")}

    def warmup_subset(self) -> dict:
        from megatron_bliss.data.subsets import write_subset

        out = self._paths(0)["subset"]
        if parallel.is_rank0():
            # an unfinished phase's output is the pipeline's own to replace (a forced change, a kill mid-phase)
            write_subset(self.paths.shards[0], None, out, method="random",
                         fraction=self.cfg.data.warmup_fraction, seed=self.cfg.parallel.seed, overwrite=True)
        return {"outputs": [out + ".bin", out + ".idx"]}

    def warmup_target(self) -> dict:
        c, p = self.cfg, self._paths(0)
        metrics = self._pretrain(**self._training_phase("target", 0))
        return {"kind": "pretrain", "steps": c.steps.target_warmup_steps, "metrics": metrics,
                "flops": _lm_flops(c.target, c.steps.target_warmup_steps, c.train), "outputs": [p["target"]]}

    def warmup_proxy(self) -> dict:
        c, p = self.cfg, self._paths(0)
        metrics = self._pretrain(**self._training_phase("proxy", 0))
        return {"kind": "selection", "steps": c.steps.proxy_warmup_steps, "metrics": metrics,
                "flops": _lm_flops(c.proxy, c.steps.proxy_warmup_steps, c.proxy_train), "outputs": [p["proxy"]]}

    def bilevel(self, r: int) -> dict:
        from megatron_bliss.bilevel.trainer import run_bilevel

        bcfg, paths = self._bilevel_config(r)
        metrics = run_bilevel(bcfg, paths)
        b = bcfg.bilevel
        return {"kind": "selection", "steps": b.outer_steps, "metrics": metrics, "flops": self._bilevel_flops(b),
                "outputs": [self._paths(r)["score"]]}

    def _bilevel_config(self, r: int):
        """``(config, paths)`` of round r's bilevel phase."""
        from megatron_bliss.bilevel.config import BilevelPaths, BilevelRunConfig

        c, p, prev = self.cfg, self._paths(r), self._paths(r - 1)
        b = dataclasses.replace(c.bilevel, seed=c.parallel.seed + r)
        paths = BilevelPaths(train_prefix=self.paths.shards[r], val_prefix=self.paths.valid_prefix,
                             warmup_proxy=self._paths(0)["proxy"], target=prev["target"] if b.kl_coef > 0 else "",
                             init_score=prev["score"] if r > 1 else "", output_dir=p["bilevel"])
        bcfg = BilevelRunConfig(proxy=c.proxy, target=c.target if b.kl_coef > 0 else None,
                                parallel=_data_parallel(c), bilevel=b)
        return bcfg, paths

    def score(self, r: int) -> dict:
        """Round r's ``scores/scores.npy`` by the run's method (one float32 score per sequence of shard r)."""
        from megatron_bliss.pretrain.data import open_sequences
        from megatron_bliss.score.config import ScorePaths, ScoreRunConfig, ScoreRunSection
        from megatron_bliss.score.scoring import run_scoring, save_npy_atomic
        from megatron_bliss.selection import scorers

        c, p, method = self.cfg, self._paths(r), self.cfg.run.method
        path = os.path.join(p["scores"], "scores.npy")
        if method in ("dsir", "scores"):  # rank 0 computes or checks them on the CPU; no model
            if parallel.is_rank0():
                n = len(open_sequences(self.paths.shards[r], c.target.seq_length + 1))
                if method == "dsir":
                    values = scorers.dsir_scores(self.paths.shards[r], self.paths.valid_prefix, c.dsir,
                                                 work_dir=self.paths.run_dir)
                else:
                    values = scorers.check_user_scores(self._user_scores(r), n, f"paths.scores[{r - 1}]")
                os.makedirs(p["scores"], exist_ok=True)
                save_npy_atomic(path, values)
            parallel.barrier()
            return {"kind": "selection", "method": method, "sequences": len(np.load(path, mmap_mode="r")),
                    "flops": 0.0, "outputs": [path]}
        # chunks that match this round's shard and scorer resume; others are the pipeline's own to replace
        scfg = ScoreRunConfig(model=c.proxy, parallel=_data_parallel(c), scoring=c.scoring,
                              run=ScoreRunSection(overwrite=True))
        checkpoint = p["score"] if method == "bliss" else self._paths(0)["proxy"]
        scorer = {"bliss": None, "cosine": lambda: scorers.CosineScorer(self.paths.valid_prefix, c.cosine),
                  "gradsim": lambda: scorers.GradSimScorer(self.paths.valid_prefix, c.gradsim)}[method]
        path = run_scoring(scfg, ScorePaths(checkpoint=checkpoint, data_prefix=self.paths.shards[r],
                                            output_dir=p["scores"]), scorer() if scorer else None)
        n = len(np.load(path, mmap_mode="r"))
        outputs = [path]
        if method == "bliss" and r > 1:
            outputs.append(self._previous_model_scores(r))
        return {"kind": "selection", "method": method, "sequences": n, "flops": score_flops(c.proxy, method, n),
                "outputs": outputs}

    def _previous_model_scores(self, r: int) -> str:
        """``scores/previous_model.npy``: the first ``scoring.chunk_size`` sequences of shard r scored by round
        r-1's score model, beside round r's (the report's rank correlation between consecutive rounds)."""
        from megatron_bliss.checkpointing import load_model
        from megatron_bliss.models import build_score_model
        from megatron_bliss.pretrain.data import open_sequences
        from megatron_bliss.score.scoring import save_npy_atomic, score_sequences

        c, p = self.cfg, self._paths(r)
        path = os.path.join(p["scores"], "previous_model.npy")
        model = build_score_model(c.proxy)
        load_model(self._paths(r - 1)["score"], model, c.proxy, "score")  # collective: every rank loads it
        model.eval()
        if parallel.is_rank0():
            rows = open_sequences(self.paths.shards[r], c.proxy.seq_length + 1)[:c.scoring.chunk_size]
            save_npy_atomic(path, score_sequences(model.logit, rows, c.scoring.micro_batch_size, c.scoring.bf16))
        parallel.barrier()
        return path

    def select(self, r: int) -> dict:
        from megatron_bliss.data.sequences import read_sequences
        from megatron_bliss.data.subsets import write_subset
        from megatron_bliss.selection.select import select_indices

        c, p = self.cfg, self._paths(r)
        info = {"kind": "selection", "method": c.run.method}
        if parallel.is_rank0():
            selection = dataclasses.replace(c.selection, seed=c.parallel.seed + r)
            if c.run.method != "random":
                scores = np.load(os.path.join(p["scores"], "scores.npy"))
                indices = select_indices(scores, selection)
                info["threshold"] = float(scores[indices].min())
            else:
                n = len(read_sequences(self.paths.shards[r]))
                indices = select_indices(np.zeros(n), dataclasses.replace(selection, method="random"))
            write_subset(self.paths.shards[r], indices, p["subset"], kind="indices", overwrite=True)
            info["selected"] = int(len(indices))
        parallel.barrier()
        return {**info, "outputs": self._dataset_files(p["subset"])}

    def round_target(self, r: int) -> dict:
        c, p = self.cfg, self._paths(r)
        metrics = self._pretrain(**self._training_phase("target", r))
        return {"kind": "pretrain", "steps": c.steps.target_round_steps, "metrics": metrics,
                "flops": _lm_flops(c.target, c.steps.target_round_steps, c.train), "outputs": [p["target"]]}

    def eval_branch(self, r: int) -> dict:
        c, p = self.cfg, self._paths(r)
        metrics = self._pretrain(**self._training_phase("eval", r))
        return {"kind": "eval", "steps": c.steps.eval_branch_steps, "val_loss": metrics.get("val_loss"),
                "flops": _lm_flops(c.target, c.steps.eval_branch_steps, c.train), "outputs": [p["eval"]]}

    def lm_eval(self, r: int) -> dict:
        """Round r's evaluation branch on ``eval.tasks`` through lm-evaluation-harness, data-parallel over every
        rank (each holds the whole target); a killed evaluation resumes from its request cache."""
        from megatron_bliss.eval.run import EvalPaths, run_eval

        p = self._paths(r)
        parallel.initialize(_data_parallel(self.cfg))
        summary = run_eval(self.cfg.eval, EvalPaths(checkpoint=p["eval"], tokenizer=self._tokenizer(),
                                                    output_dir=p["lm_eval"],
                                                    include_path=self.paths.eval_include_path))
        return {"kind": "eval", "lm_eval": summary, "flops": 0.0,
                "outputs": [os.path.join(p["lm_eval"], name) for name in ("results.json", "results.md")]}

    def _tokenizer(self) -> str:
        """The tokenizer file the shards were made with (their manifest names it): the harness's text to ids."""
        from megatron_bliss.data.provenance import tokenizer_file

        return tokenizer_file(self.paths.shards[0], "paths.shards[0]", "eval.tasks (lm-evaluation-harness)")

    # ------------------------------------------------------------------------------------------------- checks
    def _preflight(self) -> None:
        """Builds every phase's configuration as the phase will and checks it, with the data, before any phase
        runs: a setting that would fail hours in (a batch that does not divide over the ranks, a shard too small
        for ``selection.top_k``, data from another tokenizer) fails now, naming the pipeline setting."""
        from megatron_bliss.data.provenance import check_datasets
        from megatron_bliss.data.subsets import subset_size
        from megatron_bliss.pretrain.data import open_sequences
        from megatron_bliss.score.config import ScoreRunConfig

        c, world = self.cfg, parallel.world_size()
        rounds = range(c.run.rounds + 1)
        datasets = {f"paths.shards[{r}]": self.paths.shards[r] for r in rounds}
        check_datasets({**datasets, "paths.valid_prefix": self.paths.valid_prefix}, c.target.vocab_size,
                       "target.vocab_size")
        sizes = [len(open_sequences(self.paths.shards[r], c.target.seq_length + 1)) for r in rounds]
        for r in rounds[1:]:
            try:
                subset_size(sizes[r], c.selection.fraction, c.selection.top_k)
            except ValueError as exc:
                raise ValueError(f"round{r}/select on paths.shards[{r}] ({self.paths.shards[r]}): {exc} (in the "
                                 "pipeline config: selection.top_k, selection.fraction)") from None
        phases = [("round0/target", "target", 0)] + [(f"round{r}/eval", "eval", r) for r in rounds]
        phases += [(f"round{r}/target", "target", r) for r in rounds[1:]]
        if c.run.method in PROXY_METHODS:
            phases.append(("round0/proxy", "proxy", 0))
        for key, phase, r in phases:
            try:
                run, _ = self._pretrain_config(**self._training_phase(phase, r))
                run.validate(world)
            except ValueError as exc:
                raise ValueError(_in_pipeline_terms(f"{key}: {exc}", proxy=phase == "proxy")) from None
        if c.run.method == "bliss":
            for r in rounds[1:]:
                try:
                    self._bilevel_config(r)[0].validate()
                except ValueError as exc:
                    raise ValueError(_in_pipeline_terms(f"round{r}/bilevel: {exc}", proxy=True)) from None
        if c.run.method in PROXY_METHODS:
            try:
                ScoreRunConfig(model=c.proxy, parallel=_data_parallel(c), scoring=c.scoring).validate()
            except ValueError as exc:
                raise ValueError(_in_pipeline_terms(f"round1/score: {exc}", proxy=True)) from None
        self._preflight_method(sizes)
        if c.eval.tasks:  # every task's dataset, from the local cache, before hours of training
            from megatron_bliss.eval.run import check_tasks

            self._tokenizer()
            check_tasks(c.eval.tasks, self.paths.eval_include_path, "eval.tasks")

    def _preflight_method(self, sizes: list) -> None:
        """The baselines' inputs, checked before any phase: the user's score files (length, dtype, NaN), the
        tokenizer DSIR decodes the texts with, the validation set the proxy baselines read."""
        from megatron_bliss.selection import scorers

        c, method = self.cfg, self.cfg.run.method
        rounds = range(1, c.run.rounds + 1)
        if method == "scores":
            for r in rounds:
                scorers.check_user_scores(self._user_scores(r), sizes[r], f"paths.scores[{r - 1}] (round {r}, "
                                          f"paths.shards[{r}] {self.paths.shards[r]})")
        elif method == "dsir":
            for r in rounds:
                scorers.check_texts(self.paths.shards[r], f"paths.shards[{r}]")
            scorers.check_texts(self.paths.valid_prefix, "paths.valid_prefix")
        elif method in ("cosine", "gradsim"):
            from megatron_bliss.data.validation import load_validation_set

            try:
                load_validation_set(self.paths.valid_prefix, max_length=c.proxy.seq_length + 1)
            except (OSError, ValueError) as exc:
                raise ValueError(f"paths.valid_prefix ({self.paths.valid_prefix}), read by run.method={method}: "
                                 f"{exc}") from None

    # ------------------------------------------------------------------------------------------------- helpers
    def _training_phase(self, phase: str, r: int) -> dict:
        """Arguments of :meth:`_pretrain_config` for a pretraining phase: ``target`` (round 0: the warm-up),
        ``proxy`` (the warm-up proxy) or ``eval`` (round r's evaluation branch)."""
        c, p = self.cfg, self._paths(r)
        if phase == "proxy":
            return {"model": c.proxy, "prefixes": [p["subset"]], "save_dir": p["proxy"],
                    "total_steps": c.steps.proxy_warmup_steps, "proxy": True}
        multiplier = c.steps.round_lr_factor ** r
        if phase == "eval":
            return {"model": c.target, "prefixes": [p["subset"]], "save_dir": p["eval"], "total_steps": 0,
                    "lr_multiplier": multiplier, "branch_from": p["target"]}
        if r == 0:
            return {"model": c.target, "prefixes": [p["subset"]], "save_dir": p["target"],
                    "total_steps": c.steps.target_warmup_steps}
        return {"model": c.target, "prefixes": [p["subset"]], "save_dir": p["target"],
                "total_steps": c.steps.target_warmup_steps + r * c.steps.target_round_steps,
                "lr_multiplier": multiplier, "load": self._paths(r - 1)["target"]}

    def _pretrain(self, **kwargs) -> dict:
        """Runs one target (or proxy warm-up) pretraining phase (:meth:`_pretrain_config`); returns its last
        metrics."""
        from megatron_bliss.pretrain.trainer import run_pretrain

        return run_pretrain(*self._pretrain_config(**kwargs))

    def _pretrain_config(self, *, model: ModelConfig, prefixes, save_dir: str, total_steps: int,
                         lr_multiplier: float = 1.0, load: str | None = None, branch_from: str | None = None,
                         proxy: bool = False):
        """``(config, paths)`` of one target (or proxy warm-up) pretraining phase."""
        from megatron_bliss.pretrain.config import (
            BranchConfig,
            CheckpointConfig,
            LoggingConfig,
            PretrainPaths,
            PretrainRunConfig,
        )
        from megatron_bliss.pretrain.data import PretrainDataConfig

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
        return run, paths

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

