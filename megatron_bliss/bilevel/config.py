"""BilevelConfig: every setting of one BLISS bilevel round (the ``bilevel`` section of a run's YAML).

Symbols follow the BLISS paper (Hao et al., ICML 2026): γ = ``kl_coef``, λ = ``l2_coef``, μ = ``damping``,
η_z = ``solver_lr``, K = ``solver_steps``.
Per-field checks live in ``__post_init__``; checks that need the model or the parallel layout (which HVP engine can
run on which attention backend and tensor-parallel size) are in :mod:`megatron_bliss.bilevel.hvp`
(``resolve_engine``) and in :class:`BilevelRunConfig.validate`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from megatron_bliss.models.presets import ModelConfig
from megatron_bliss.parallel import ParallelConfig

HVP_ENGINES = ("auto", "exact", "finite_difference")
CURVATURES = ("hessian", "gauss_newton")
SOLVERS = ("sgd", "cg", "amortized")
SOLVER_INITS = ("one_over_numel", "warm", "zero")
Z_REDUCTIONS = ("global", "average_z")
MIXED_TERMS = ("auto", "jvp", "finite_difference", "loop")


@dataclass
class BilevelConfig:
    """Objectives, hypergradient numerics, optimizers, schedule, inputs and outputs of one bilevel round."""

    # --- objectives ---
    kl_coef: float = 1e-2
    """γ: weight of KL(p_target ‖ p_proxy) in the lower-level loss G (0 drops the target entirely)."""
    l2_coef: float = 1e-7
    """λ: weight of ‖θp‖² in G."""

    # --- hypergradient ---
    hvp_engine: str = "auto"
    """'exact' (double backward / forward-mode AD; local attention, TP=1), 'finite_difference' (central differences
    in fp32+ weights; fused kernels and TP>1), or 'auto' (exact where it can run, with the reason logged)."""
    curvature: str = "hessian"
    """'hessian' (∇²G, the method's; may be indefinite) or 'gauss_newton' (Jᵀ ∇²_logits G J + 2λI, PSD)."""
    fd_eps: float = 1e-2
    """Finite differences: norm of the parameter perturbation ε·v/‖v‖ (fp32 needs about 1e-2; fp64 1e-4)."""
    solver: str = "sgd"
    """Inverse-HVP solver for z ≈ (H + μI)⁻¹ ∇f: 'sgd' (the method's K damped steps), 'cg' (conjugate gradient), or
    'amortized' (z kept across outer steps and advanced by K curvature products on each step's batch, the first at
    the kept z, which also gives the mixed term: the warm-started stochastic scheme of SOBA/AmIGO; use it with
    Gauss-Newton curvature and K = 1)."""
    solver_steps: int = 3
    """K: SGD steps, the most CG iterations, or the amortized solver's curvature products per outer step."""
    solver_lr: float = 1e-2
    """η_z: SGD step size."""
    damping: float = 1e-2
    """μ: ridge added to the curvature."""
    solver_normalize: bool = True
    """SGD: rescale each tensor of the residual direction to unit norm when its norm exceeds 1 (the method's)."""
    solver_init: str = "one_over_numel"
    """z at the start of a solve: 'one_over_numel' (the method's cold start), 'warm' (previous outer step's z) or
    'zero' (CG's usual start)."""
    cg_tol: float = 1e-3
    """CG: stop when ‖(H + μI)z − ∇f‖ / ‖∇f‖ falls below this."""
    z_reduction: str = "global"
    """'global': every H·v and ∇f is averaged over data-parallel ranks, so z solves the global system (DP-invariant);
    'average_z': each rank solves on its own micro-batch and z is averaged afterwards (the authors' recipe)."""
    mixed_term: str = "auto"
    """How c_i = ⟨∇CE_i, z⟩ is computed: 'jvp' (one forward-mode pass), 'finite_difference' (two forwards),
    'loop' (per-sample backward passes, reference only) or 'auto' (jvp where forward AD can run)."""
    clip_hypergrad: bool = True
    """Rescale each tensor of the hypergradient to unit norm when its norm exceeds 1 (the method's)."""
    residual_interval: int = 1
    """Measure the solver's true relative residual every this many outer steps (one extra H·v; 0 = never)."""

    share_inner_step: bool = False
    """A documented deviation from the method's order, off by default: the hypergradient is taken at the proxy
    *before* the outer step's last inner step, on that step's micro-batch, so that one proxy forward serves the
    inner gradient, the curvature products and the mixed term, and one score forward serves both; the inner update
    is applied afterwards. The method takes it after the update, on a fresh micro-batch."""

    # --- optimization ---
    inner_steps: int = 1
    """Proxy AdamW steps on G per outer step."""
    outer_steps: int = 100
    """Score-model updates in the round."""
    micro_batch_size: int = 4
    """Training sequences per data-parallel rank, for each inner step and for the outer (hypergradient) batch."""
    val_micro_batch_size: int = 4
    """Validation examples per data-parallel rank per outer step."""
    proxy_lr: float = 1e-5
    """Peak learning rate of the proxy."""
    score_lr: float = 1e-5
    """Peak learning rate of the score model (the fragile setting: 1e-4..1e-3 for very small models)."""
    min_lr_ratio: float = 0.1
    """Cosine schedules decay to this fraction of the peak."""
    warmup_fraction: float = 0.1
    """Linear warm-up as a fraction of the schedule's steps."""
    adam_beta1: float = 0.9
    """AdamW β1 (proxy and score model)."""
    adam_beta2: float = 0.95
    """AdamW β2 (proxy and score model)."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay (proxy and score model)."""
    proxy_grad_clip: float = 1.0
    """Global gradient-norm clip of the proxy's inner steps (0 disables)."""

    score_head_seed: int = 0
    """Seed of a fresh score head (round 1)."""

    # --- bookkeeping ---
    log_interval: int = 1
    """Write metrics every this many outer steps."""
    eval_interval: int = 10
    """Evaluate the validation loss over ``eval_batches`` every this many outer steps (0 = never)."""
    eval_batches: int = 4
    """Validation micro-batches per evaluation."""
    save_interval: int = 50
    """Checkpoint every this many outer steps (and at the end)."""
    keep_checkpoints: int = 2
    """Finished step checkpoints to keep."""
    max_skipped_steps: int = 10
    """Abort after this many consecutive non-finite steps (each is skipped and counted)."""
    tensorboard: bool = True
    """Write TensorBoard event files beside metrics.jsonl."""
    seed: int = 1234
    """Seed of data order and the score head."""

    def __post_init__(self):
        choices = {"hvp_engine": HVP_ENGINES, "curvature": CURVATURES, "solver": SOLVERS,
                   "solver_init": SOLVER_INITS, "z_reduction": Z_REDUCTIONS, "mixed_term": MIXED_TERMS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"bilevel.{name} must be one of {'|'.join(allowed)}, got {getattr(self, name)!r}")
        for name in ("kl_coef", "l2_coef", "damping", "weight_decay", "proxy_grad_clip"):
            if getattr(self, name) < 0:
                raise ValueError(f"bilevel.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("fd_eps", "solver_lr", "cg_tol", "proxy_lr", "score_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"bilevel.{name} must be > 0, got {getattr(self, name)}")
        for name in ("solver_steps", "inner_steps", "outer_steps", "micro_batch_size", "val_micro_batch_size",
                     "log_interval", "save_interval", "eval_batches", "keep_checkpoints", "max_skipped_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"bilevel.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("residual_interval", "eval_interval"):
            if getattr(self, name) < 0:
                raise ValueError(f"bilevel.{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ValueError(f"bilevel.warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"bilevel.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.micro_batch_size < 2:
            raise ValueError("bilevel.micro_batch_size must be >= 2: the weights are a softmax over the batch")



@dataclass
class BilevelPaths:
    """The files a round reads and writes (the ``paths`` section; the pipeline sets them per round)."""

    lock_field = "output_dir"
    """The directory a launch locks while it runs (a second launch on it is refused, naming the holder)."""

    train_prefix: str = ""
    """Indexed dataset (sequences mode) of candidate training sequences."""
    val_prefix: str = ""
    """Validation set prefix (tokens + continuation-only loss mask)."""
    warmup_proxy: str = ""
    """Checkpoint of the warm-up proxy: the proxy is reset to it at the start of the round."""
    target: str = ""
    """Checkpoint of the target at the start of the round (needed when kl_coef > 0)."""
    init_score: str = ""
    """Score-model checkpoint of the previous round; empty initializes the body from the warm-up proxy."""
    output_dir: str = "runs/bilevel"
    """Run directory: checkpoints, metrics.jsonl, TensorBoard events, resolved config, final score model."""


@dataclass
class BilevelRunConfig:
    """Root of ``python -m megatron_bliss.bilevel``: proxy and target shapes, parallel layout, bilevel settings."""

    proxy: ModelConfig = field(default_factory=lambda: ModelConfig(preset="tiny"))
    """Shape of the proxy (and of the score model's body)."""
    target: ModelConfig | None = None
    """Shape of the target; None when kl_coef = 0 (no target is loaded)."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Parallel layout (data parallelism for the proxy-sized models; TP needs hvp_engine=finite_difference)."""
    bilevel: BilevelConfig = field(default_factory=BilevelConfig)
    """The round's settings."""

    def validate(self) -> None:
        """Cross-section checks: target needed for the KL, shared vocabulary, exact engine's requirements."""
        b = self.bilevel
        if b.kl_coef > 0:
            if self.target is None:
                raise ValueError("bilevel.kl_coef > 0 needs a target section (its shape) and bilevel.target "
                                 "(its checkpoint); set bilevel.kl_coef=0 to train without the KL term")
            if self.target.padded_vocab_size() != self.proxy.padded_vocab_size():
                raise ValueError(f"target vocabulary ({self.target.vocab_size}) and proxy vocabulary "
                                 f"({self.proxy.vocab_size}) differ: the KL needs one tokenizer")
        if self.parallel.pipeline_model_parallel_size != 1:
            raise ValueError("the bilevel round runs proxy-sized models without pipeline parallelism: "
                             "set parallel.pipeline_model_parallel_size=1")
        tp = self.parallel.tensor_model_parallel_size
        if b.hvp_engine == "exact":  # refused here, before any model is built, by the engine choice's own rule
            from megatron_bliss.bilevel.hvp import resolve_engine
            from megatron_bliss.models.gpt import resolve_attention_backend

            resolve_engine("exact", "finite_difference", b.curvature, tp_size=tp, params_dtype=torch.float32,
                           attention_backend=resolve_attention_backend(self.proxy.attention_backend))
