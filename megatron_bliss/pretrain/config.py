"""Configuration of target pretraining: one dataclass per concern, composed by :class:`PretrainRunConfig`.

Sections (each a YAML mapping and a ``--section.key=value`` prefix): ``model`` (:class:`ModelConfig`, ``preset:``
fills the shape), ``parallel`` (:class:`ParallelConfig`), ``data`` (:class:`PretrainDataConfig`), ``train``,
``optim``, ``schedule`` (:class:`ScheduleConfig`), ``checkpoint``, ``branch`` and ``logging``; the files a run
reads and writes are the separate ``paths`` section (:class:`PretrainPaths`). Checks within one section run in its
``__post_init__``; checks across sections (heads vs tensor-parallel size, batch sizes vs data-parallel size) run in
:meth:`PretrainRunConfig.validate`, and those that need the files (stored sequence length vs model, an evaluation
branch writing elsewhere) in :meth:`PretrainPaths.check`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from megatron_bliss.models.presets import ModelConfig
from megatron_bliss.parallel import ParallelConfig
from megatron_bliss.pretrain.data import PretrainDataConfig
from megatron_bliss.pretrain.schedule import ScheduleConfig

PRECISIONS = ("auto", "bf16", "fp32")


@dataclass
class TrainConfig:
    """Batch sizes, length of the run, numerics and validation cadence."""

    micro_batch_size: int = 4
    """Sequences per micro-batch (per data-parallel rank per forward/backward)."""
    global_batch_size: int = 512
    """Sequences per optimizer step over all data-parallel ranks; the rest is gradient accumulation."""
    train_steps: int = 10000
    """Optimizer steps of the run (the step counter continues across resumes)."""
    precision: str = "auto"
    """'bf16' (bf16 weights and activations, fp32 main params and grads), 'fp32', or 'auto' (bf16 on CUDA)."""
    eval_interval: int | None = 1000
    """Validation loss every this many steps (and at the end); None disables validation."""
    eval_batches: int | None = None
    """Global batches of the validation set per evaluation; None evaluates all of it."""
    recompute_activations: bool = False
    """Full activation recomputation (saves memory at about a third more compute)."""

    def __post_init__(self):
        for name in ("micro_batch_size", "global_batch_size", "train_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"train.precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.eval_interval is not None and self.eval_interval < 1:
            raise ValueError(f"train.eval_interval must be >= 1 or null, got {self.eval_interval}")


@dataclass
class OptimConfig:
    """AdamW through megatron-core's ``get_megatron_optimizer`` (BLISS/MATES target recipe by default)."""

    lr: float = 1e-3
    """Peak learning rate (before schedule.lr_multiplier)."""
    weight_decay: float = 0.1
    """Decoupled weight decay (not applied to biases and norms)."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.95
    """AdamW beta2."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    clip_grad: float = 1.0
    """Global gradient-norm clipping threshold; 0 disables clipping."""
    use_distributed_optimizer: bool = False
    """Shard optimizer state and fp32 main params over data-parallel ranks (ZeRO-1)."""
    overlap_grad_reduce: bool = False
    """Overlap the data-parallel gradient reduction with the backward pass."""
    overlap_param_gather: bool = False
    """With the distributed optimizer: overlap the parameter all-gather with the next forward."""
    bucket_size: int | None = None
    """Elements per gradient-reduction bucket; None lets megatron-core choose."""

    def __post_init__(self):
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")
        if self.clip_grad < 0:
            raise ValueError(f"optim.clip_grad must be >= 0, got {self.clip_grad}")
        if self.overlap_param_gather and not self.use_distributed_optimizer:
            raise ValueError("optim.overlap_param_gather needs optim.use_distributed_optimizer")


@dataclass
class CheckpointConfig:
    """How often checkpoints are saved, how many are kept, and what a new run takes from ``paths.load``."""

    save_interval: int | None = 1000
    """Save every this many steps (and at the end); None saves only at the end."""
    load_weights_only: bool = False
    """Take only the weights from ``paths.load`` (any layout): fresh optimizer, schedule, data position, step 0."""
    keep_last: int | None = None
    """Keep only the newest this many checkpoints; None keeps all."""
    save_initial: bool = False
    """Also save the starting weights (only) as iter_0000000 before step 1, for other runs to start from with
    load_weights_only (with pipeline parallelism each stage draws its initial weights from its own stream)."""

    def __post_init__(self):
        if self.save_interval is not None and self.save_interval < 1:
            raise ValueError(f"checkpoint.save_interval must be >= 1 or null, got {self.save_interval}")
        if self.keep_last is not None and self.keep_last < 1:
            raise ValueError(f"checkpoint.keep_last must be >= 1 or null, got {self.keep_last}")


@dataclass
class BranchConfig:
    """Evaluation branch (on when ``paths.branch_from`` is set): fork a checkpoint, train a few more steps with
    exponential decay, save elsewhere."""

    steps: int = 200
    """Steps the branch trains after the fork."""
    half_life: float = 200.0
    """Learning-rate half-life of the branch's decay (lr · 0.5^(t / half_life))."""

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"branch.steps must be >= 1, got {self.steps}")
        if self.half_life <= 0:
            raise ValueError(f"branch.half_life must be > 0, got {self.half_life}")


@dataclass
class LoggingConfig:
    """Metrics, TensorBoard, progress bar and the peak FLOP/s used for MFU."""

    log_interval: int = 1
    """Write metrics every this many steps."""
    tensorboard: bool = True
    """Also write TensorBoard event files."""
    progress_bar: bool = True
    """tqdm progress bar on rank 0."""
    peak_flops: float | None = None
    """Peak FLOP/s of one accelerator for MFU; None detects it from the GPU name (H100 bf16 dense: 989e12); MFU is
    left empty on CPU."""
    level: str = "INFO"
    """Log level of rank 0."""

    def __post_init__(self):
        if self.log_interval < 1:
            raise ValueError(f"logging.log_interval must be >= 1, got {self.log_interval}")


@dataclass
class PretrainPaths:
    """The files a pretraining run reads and writes (the ``paths`` section; the pipeline sets them per phase)."""

    lock_field = "save_dir"
    """The directory a launch locks while it runs (a second launch on it is refused, naming the holder)."""

    train_prefixes: list[str] = field(default_factory=list)
    """Sequences-mode indexed-dataset prefixes (``PREFIX.bin/.idx``) to train on (blended by data.train_weights)."""
    valid_prefix: str | None = None
    """Validation prefix (``tools/prepare_validation.py`` output: loss on the target spans only; any other
    indexed dataset: loss on every token)."""
    save_dir: str | None = None
    """Directory of ``iter_NNNNNNN`` checkpoints and ``latest_checkpointed_iteration.txt``; a run whose save_dir
    has a latest marker resumes from it. None saves nothing."""
    load: str | None = None
    """Checkpoint directory (or a save_dir, meaning its latest) to start from when save_dir has none yet."""
    branch_from: str | None = None
    """Evaluation branch: the main run's checkpoint (or save_dir, meaning its latest) to fork; only read."""
    run_dir: str | None = None
    """Where metrics.jsonl, tensorboard/ and config.yaml go; None uses save_dir."""

    def __post_init__(self):
        if isinstance(self.train_prefixes, str):
            self.train_prefixes = [self.train_prefixes]

    def metrics_dir(self) -> str | None:
        """Directory for metrics and the resolved config."""
        return self.run_dir or self.save_dir

    def check(self, cfg: PretrainRunConfig) -> None:
        """Checks against the run's config, before any model is built; raises ValueError naming the settings."""
        from megatron_bliss.data.indexed import exists
        from megatron_bliss.pretrain.data import open_sequences

        weights = cfg.data.train_weights
        if weights is not None and len(weights) != len(self.train_prefixes):
            raise ValueError(f"data.train_weights has {len(weights)} entries but paths.train_prefixes has "
                             f"{len(self.train_prefixes)}")
        from megatron_bliss.data.provenance import check_datasets

        for prefix in self.train_prefixes:
            if exists(prefix):  # missing files are reported when the run opens them
                open_sequences(prefix, cfg.model.seq_length + 1)
        datasets = {f"paths.train_prefixes[{i}]": prefix for i, prefix in enumerate(self.train_prefixes)}
        check_datasets({**datasets, "paths.valid_prefix": self.valid_prefix or ""}, cfg.model.vocab_size,
                       "model.vocab_size")
        if self.branch_from is None:
            return
        if self.save_dir is None:
            raise ValueError("paths.branch_from needs paths.save_dir (the branch's own directory)")
        source, target = os.path.realpath(self.branch_from), os.path.realpath(self.save_dir)
        if target in (source, os.path.dirname(source)) or source.startswith(target + os.sep):
            raise ValueError(f"paths.save_dir ({self.save_dir}) is the main run's directory: an evaluation "
                             f"branch must write elsewhere so the main run stays untouched")
        if self.load is not None:
            raise ValueError("set either paths.branch_from or paths.load, not both")


@dataclass
class PretrainRunConfig:
    """Everything one target-pretraining run needs (``torchrun -m megatron_bliss.pretrain --config FILE``)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """Model shape (``preset:`` plus overrides)."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Tensor/pipeline layout and seed; data-parallel size is what is left of the world."""
    data: PretrainDataConfig = field(default_factory=PretrainDataConfig)
    """Training blend and validation set."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Batches, steps, numerics, validation cadence."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer."""
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    """Learning-rate schedule."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Saving and loading."""
    branch: BranchConfig = field(default_factory=BranchConfig)
    """Evaluation branch settings (the branch is on when paths.branch_from is set)."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Metrics and progress output."""

    def validate(self, world_size: int | None = None) -> None:
        """Cross-section checks; raises ValueError naming the settings.

        Args:
            world_size: number of processes (default: ``WORLD_SIZE`` or 1), to check batch divisibility.
        """
        p, t = self.parallel, self.train
        self.model.check_layout(p.tensor_model_parallel_size, p.pipeline_model_parallel_size,
                                p.virtual_pipeline_model_parallel_size)
        world_size = world_size or int(os.environ.get("WORLD_SIZE", "1"))
        dp = p.data_parallel_size(world_size)
        if t.global_batch_size % (t.micro_batch_size * dp):
            raise ValueError(
                f"train.global_batch_size ({t.global_batch_size}) is not divisible by train.micro_batch_size "
                f"({t.micro_batch_size}) x data-parallel size ({dp} = {world_size} ranks / (tp "
                f"{p.tensor_model_parallel_size} x pp {p.pipeline_model_parallel_size}))")
        num_micro = t.global_batch_size // (t.micro_batch_size * dp)
        if p.virtual_pipeline_model_parallel_size and num_micro % p.pipeline_model_parallel_size:
            raise ValueError(f"the interleaved pipeline schedule needs the number of micro-batches per step "
                             f"({num_micro}) to be a multiple of parallel.pipeline_model_parallel_size "
                             f"({p.pipeline_model_parallel_size})")
        o = self.optim
        if o.use_distributed_optimizer and o.overlap_param_gather and p.pipeline_model_parallel_size > 1:
            raise ValueError("optim.overlap_param_gather is not supported with pipeline parallelism here")
