"""Configuration of a whole BLISS run: data shards, the three models, and the per-phase settings.

The sections reuse each phase's own config classes (``train``/``optim``/``schedule`` from pretraining, ``bilevel``
from the bilevel round, ``scoring`` and ``selection``). The pipeline passes each phase its paths and never rewrites
a field the user set: the few per-phase values it sets itself (:attr:`PipelineRunConfig.reserved_keys`) are refused
in a pipeline config, naming the field.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from megatron_bliss.bilevel.config import BilevelConfig
from megatron_bliss.eval.run import HarnessConfig
from megatron_bliss.models.presets import ModelConfig
from megatron_bliss.parallel import ParallelConfig
from megatron_bliss.pretrain.config import OptimConfig, TrainConfig
from megatron_bliss.pretrain.schedule import ScheduleConfig
from megatron_bliss.score.config import ScoringConfig
from megatron_bliss.selection.config import CosineConfig, DsirConfig, GradSimConfig, SelectionConfig

METHODS = ("bliss", "random", "dsir", "cosine", "gradsim", "scores")
PROXY_METHODS = ("bliss", "cosine", "gradsim")
"""Methods that need the warm-up proxy (BLISS's starting point; the cosine and gradsim baselines score with it)."""


@dataclass
class RunSection:
    """The run as a whole."""

    method: str = "bliss"
    """How each round's subset is chosen, on the same schedule: 'bliss' (the bilevel score model), 'random' (a
    random subset of the same size, no scoring), 'dsir' (hashed n-gram importance toward the validation text, the
    ``dsir`` section), 'cosine' (similarity to the validation centroid under the warm-up proxy, ``cosine``),
    'gradsim' (one-step gradient similarity at the warm-up proxy, ``gradsim``) or 'scores' (the user's own score
    files, ``paths.scores``). Every scoring method then keeps the top of its scores by ``selection``."""
    rounds: int = 4
    """Selection rounds after the warm-up (BLISS: 4, one per shard 1..4)."""
    force: bool = False
    """Resume a run directory that was started with another configuration."""
    save_interval: int = 1000
    """Target and proxy checkpoints every this many steps within a phase (and at its end); a killed phase resumes
    from its latest."""


@dataclass
class PipelinePaths:
    """The files a run reads and the directory it writes (the ``paths`` section)."""

    lock_field = "run_dir"
    """The directory a launch locks while it runs (a second launch on it is refused, naming the holder)."""

    run_dir: str = "runs/bliss"
    """Directory of every output and of ``manifest.json``; a rerun resumes there."""
    shards: list[str] = field(default_factory=list)
    """Sequences-mode prefixes: shard 0 for the warm-up, shard r for round r (tools/preprocess_c4.py --shards)."""
    valid_prefix: str = ""
    """Validation prefix with its loss mask (tools/prepare_validation.py): the upper objective and the eval loss."""
    scores: list[str] = field(default_factory=list)
    """``run.method=scores``: one ``.npy`` per round (round 1 first), float scores aligned with that round's shard."""
    eval_include_path: str | None = None
    """Directory of extra lm-evaluation-harness task YAMLs that ``eval.tasks`` may name (local datasets, or stock
    tasks pointed at local files)."""

    def check(self, cfg: PipelineRunConfig) -> None:
        """Checks against the run's config; raises ValueError naming the settings."""
        if len(self.shards) < cfg.run.rounds + 1:
            raise ValueError(f"paths.shards lists {len(self.shards)} prefixes; run.rounds={cfg.run.rounds} needs "
                             f"{cfg.run.rounds + 1} (shard 0 for the warm-up, one per round)")
        if not self.valid_prefix:
            raise ValueError("paths.valid_prefix is required (tools/prepare_validation.py writes it)")
        named = [(f"paths.shards[{r}]", prefix) for r, prefix in enumerate(self.shards[:cfg.run.rounds + 1])]
        for name, prefix in named + [("paths.valid_prefix", self.valid_prefix)]:
            missing = [path for path in (prefix + ".bin", prefix + ".idx") if not os.path.isfile(path)]
            if missing:
                raise ValueError(f"{name}: {' and '.join(missing)} not found (run.rounds={cfg.run.rounds} reads "
                                 f"shards 0..{cfg.run.rounds} and the validation set)")
        if cfg.run.method == "scores" and len(self.scores) < cfg.run.rounds:
            raise ValueError(f"paths.scores lists {len(self.scores)} files; run.method=scores with "
                             f"run.rounds={cfg.run.rounds} needs one per round (round 1 first)")
        if cfg.run.method != "scores" and self.scores:
            raise ValueError(f"paths.scores is set but run.method={cfg.run.method}: only run.method=scores reads it")
        if self.eval_include_path and not os.path.isdir(self.eval_include_path):
            raise ValueError(f"paths.eval_include_path: {self.eval_include_path} is not a directory")
        if self.eval_include_path and not cfg.eval.tasks:
            raise ValueError("paths.eval_include_path is set but eval.tasks is empty: only eval.tasks reads it")


@dataclass
class PipelineDataConfig:
    """How the warm-up subset is drawn from shard 0."""

    warmup_fraction: float = 0.2
    """Fraction of shard 0 drawn at random for the warm-up."""

    def __post_init__(self):
        if not 0.0 < self.warmup_fraction <= 1.0:
            raise ValueError(f"data.warmup_fraction must be in (0, 1], got {self.warmup_fraction}")


@dataclass
class ScheduleSection:
    """Steps of each phase and the per-round learning rate."""

    target_warmup_steps: int = 10000
    """Target steps on the warm-up subset (round 0)."""
    proxy_warmup_steps: int = 10000
    """Proxy steps on the warm-up subset."""
    target_round_steps: int = 10000
    """Target steps on each round's selected subset."""
    round_lr_factor: float = 0.5
    """Peak learning rate of round r is optim.lr x round_lr_factor^r (BLISS halves it each round; MATES keeps 1)."""
    eval_branch_steps: int = 200
    """Steps of each round's evaluation branch (a decayed copy of the target; the main run continues undecayed)."""
    eval_branch_half_life: float = 200.0
    """Learning-rate half-life of the evaluation branch."""

    def __post_init__(self):
        for name in ("target_warmup_steps", "proxy_warmup_steps", "target_round_steps", "eval_branch_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"steps.{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.round_lr_factor:
            raise ValueError(f"steps.round_lr_factor must be > 0, got {self.round_lr_factor}")
        if not 0 < self.eval_branch_half_life:
            raise ValueError(f"steps.eval_branch_half_life must be > 0, got {self.eval_branch_half_life}")


@dataclass
class PipelineRunConfig:
    """``torchrun ... -m megatron_bliss.pipeline --config FILE``: warm-up, then rounds of select-and-train."""

    reserved_keys = {
        "train.train_steps": "the pipeline sets it per phase from steps.target_warmup_steps and "
                             "steps.target_round_steps",
        "proxy_train.train_steps": "the pipeline sets it from steps.proxy_warmup_steps",
        "schedule.lr_multiplier": "the pipeline sets it per round to steps.round_lr_factor ** round",
        "bilevel.seed": "the pipeline sets it per round to parallel.seed + round",
        "selection.seed": "the pipeline sets it per round to parallel.seed + round",
    }
    """Fields of the phases' sections that the pipeline sets itself; a config that sets one is refused."""

    run: RunSection = field(default_factory=RunSection)
    """Run directory, method and number of rounds."""
    data: PipelineDataConfig = field(default_factory=PipelineDataConfig)
    """The warm-up subset's size."""
    target: ModelConfig = field(default_factory=lambda: ModelConfig(preset="tiny"))
    """Target shape."""
    proxy: ModelConfig = field(default_factory=lambda: ModelConfig(preset="tiny"))
    """Proxy shape (also the score model's body)."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Target layout (TP/PP); proxy, bilevel and scoring phases run data-parallel with its seed."""
    steps: ScheduleSection = field(default_factory=ScheduleSection)
    """Phase lengths and the per-round learning rate."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Target batches and numerics (train_steps is set per phase)."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Target optimizer."""
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    """Target WSD schedule (lr_multiplier is set per round)."""
    proxy_train: TrainConfig = field(default_factory=TrainConfig)
    """Proxy warm-up batches."""
    proxy_optim: OptimConfig = field(default_factory=OptimConfig)
    """Proxy warm-up optimizer."""
    bilevel: BilevelConfig = field(default_factory=BilevelConfig)
    """Bilevel round settings (data and checkpoint paths are filled in per round)."""
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    """Scoring batches (paths are filled in per round)."""
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    """How each round's subset is chosen from its scores (the random baseline takes only its size)."""
    dsir: DsirConfig = field(default_factory=DsirConfig)
    """``run.method=dsir``: the n-gram features."""
    cosine: CosineConfig = field(default_factory=CosineConfig)
    """``run.method=cosine``: the validation centroid."""
    gradsim: GradSimConfig = field(default_factory=GradSimConfig)
    """``run.method=gradsim``: the validation gradient and the directional derivative."""
    eval: HarnessConfig = field(default_factory=HarnessConfig)
    """lm-evaluation-harness accuracy of every round's evaluation branch (``eval.tasks``; empty: none)."""

    def validate(self) -> None:
        """Cross-section checks, naming the settings."""
        if self.run.method not in METHODS:
            raise ValueError(f"run.method must be one of {METHODS}, got {self.run.method!r}")
        if self.run.rounds < 1:
            raise ValueError(f"run.rounds must be >= 1, got {self.run.rounds}")
        if self.target.padded_vocab_size() != self.proxy.padded_vocab_size():
            raise ValueError(f"target.vocab_size ({self.target.vocab_size}) and proxy.vocab_size "
                             f"({self.proxy.vocab_size}) differ: both read the same tokenized shards")
        if self.target.seq_length != self.proxy.seq_length:
            raise ValueError(f"target.seq_length ({self.target.seq_length}) and proxy.seq_length "
                             f"({self.proxy.seq_length}) differ: both read the same stored sequences")
        self.target.check_layout(self.parallel.tensor_model_parallel_size, self.parallel.pipeline_model_parallel_size,
                                 self.parallel.virtual_pipeline_model_parallel_size)

    def fingerprint(self) -> dict:
        """What decides the outputs of this run's phases (the manifest's config hash).

        Left out: settings no phase reads for this method (only BLISS has a bilevel phase; dsir, scores and random
        have no proxy; dsir and scores do not run ``scoring``'s batches; each baseline reads only its own section;
        the random baseline takes only the subset size from ``selection``), and settings that change no output
        (where the forcing, checkpoint and logging cadence, the number of rounds: round r never depends on later
        rounds, so a run can be extended), and ``eval`` while it names no task. The input files come in through
        :func:`manifest_hash`.
        """
        from megatron_bliss.config import to_dict

        d = to_dict(self)
        for key in ("force", "save_interval", "rounds"):
            d["run"].pop(key)
        for key in ("log_interval", "tensorboard", "save_interval", "keep_checkpoints"):
            d["bilevel"].pop(key)
        if not self.eval.tasks:
            d.pop("eval")
        method = self.run.method
        for section in ("dsir", "cosine", "gradsim"):
            if section != method:
                d.pop(section)
        if method != "bliss":
            d.pop("bilevel")
        if method not in PROXY_METHODS:
            for section in ("proxy", "proxy_train", "proxy_optim"):
                d.pop(section)
            d["steps"].pop("proxy_warmup_steps")
        if method not in ("bliss", "cosine", "gradsim"):
            d.pop("scoring")
        if method == "random":
            d["selection"] = {"fraction": self.selection.fraction, "top_k": self.selection.top_k}
        return d


def manifest_hash(cfg: PipelineRunConfig, paths: PipelinePaths) -> str:
    """The hash a run directory's manifest keeps: the config's :meth:`~PipelineRunConfig.fingerprint` and the input
    files the phases read (not where the run lives)."""
    from megatron_bliss.config import config_hash

    record = {"config": cfg.fingerprint(), "shards": list(paths.shards), "valid_prefix": paths.valid_prefix}
    if paths.scores:
        record["scores"] = list(paths.scores)
    if paths.eval_include_path:
        record["eval_include_path"] = paths.eval_include_path
    return config_hash(record)
