"""Learning the score model θs by bilevel optimization (the BLISS objectives G and F and their hypergradient).

- :mod:`.losses`: the lower-level loss G (softmax-weighted CE + γ KL + λ‖θp‖²) and the validation objective F.
- :mod:`.hvp`: curvature-vector products (exact / finite-difference engines; Hessian or Gauss-Newton curvature).
- :mod:`.solvers`: z ≈ (C + μI)⁻¹ ∇f by the method's SGD or by conjugate gradient.
- :mod:`.hypergradient`: the score model's hypergradient (batched mixed term, one score backward).
- :mod:`.trainer`: the round: inner proxy steps, hypergradient, score update; checkpoints, resume, metrics.
"""

from megatron_bliss.bilevel.config import BilevelConfig, BilevelRunConfig
from megatron_bliss.bilevel.hvp import EngineChoice, Objective, build_operator, hessian_vector_product, resolve_engine
from megatron_bliss.bilevel.hypergradient import HypergradResult, score_hypergradient
from megatron_bliss.bilevel.losses import (
    LowerLevelLoss,
    Normalizer,
    lower_level_loss,
    sequence_weights,
    validation_loss,
)
from megatron_bliss.bilevel.solvers import SolveResult, solve_cg, solve_sgd

__all__ = [
    "BilevelConfig", "BilevelRunConfig", "EngineChoice", "HypergradResult", "LowerLevelLoss", "Normalizer",
    "Objective", "SolveResult", "build_operator", "hessian_vector_product", "lower_level_loss", "resolve_engine",
    "score_hypergradient",
    "sequence_weights", "solve_cg", "solve_sgd", "validation_loss",
]
