"""The arithmetic of an outer step: the matmul FLOPs of each of its passes, next to a plain proxy forward+backward.

FLOPs are counted as :func:`megatron_bliss.models.presets.model_flops_per_token` counts a training step (matmuls
and attention scores, a backward twice its forward). Per token, B is the forward FLOPs of the transformer body
(what the score model's body costs too), H = 2 · vocabulary · hidden those of the output layer, and F = B + H a
proxy forward; a plain forward+backward is 3F. The outer step, as :class:`~megatron_bliss.bilevel.trainer.
BilevelTrainer` runs it:

===================== ================================================================================
inner steps           each: the score model's forward (B) and the proxy's forward+backward of G (3F)
validation gradient   the body's forward+backward on the validation micro-batch (3B), and the output
                      layer's at the scored positions only (3H each)
score forward         B, with its graph kept for the score backward
kept forward          the forward every product of the solve shares (F); the exact Hessian also builds
                      ∇G with its graph once (2F)
curvature products    Gauss-Newton, exact: J_h·v by forward-mode AD (3B: the primal again and two tangent
                      matmuls per matmul), J·v of the output layer (2H), Jᵀ (2B + 2H); by finite
                      differences J_h·v is two body forwards (2B). Hessian, exact: a backward through the
                      backward graph (about 4F); by finite differences two gradients (6F)
mixed term            none when the amortized Gauss-Newton product hands over its J·z; else one J·z: from
                      the kept graph (Gauss-Newton: forward mode 3B + 2H; Hessian: the double-backward
                      trick, about 4F), a forward-mode pass (3F) or two forwards (2F); or the per-sample
                      loop (3F)
score backward        2B
target forwards       F of the target per micro-batch the KL term needs (γ > 0)
===================== ================================================================================

Elementwise work (the softmax passes of the fused loss, the optimizers) and per-operator overheads are not counted:
they are what a measurement adds to this floor. ``python bench/bilevel_step.py`` prints both side by side.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megatron_bliss.bilevel.config import BilevelConfig
from megatron_bliss.models.presets import ModelConfig, model_flops_per_token


@dataclass
class StepCost:
    """FLOPs of one outer step on one micro-batch, by part, and of a plain proxy forward+backward on it."""

    parts: dict[str, float] = field(default_factory=dict)
    plain: float = 0.0

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    @property
    def ratio(self) -> float:
        """The outer step in plain forward+backward steps."""
        return self.total / self.plain


def _per_token(cfg: ModelConfig, seq_length: int) -> tuple[float, float]:
    """``(B, H)``: forward FLOPs per token of the body and of the output layer."""
    body = model_flops_per_token(cfg, seq_length, output_layer=False) / 3
    return body, 2.0 * cfg.padded_vocab_size() * cfg.hidden_size


def _product(engine: str, curvature: str, body: float, head: float) -> float:
    forward = body + head
    if curvature == "gauss_newton":
        return (3 * body if engine == "exact" else 2 * body) + 2 * head + 2 * (body + head)
    return 4 * forward if engine == "exact" else 6 * forward


def _products(b: BilevelConfig) -> float:
    """Curvature products per outer step: the solver's (at most ``solver_steps``) and the residual measurement's
    share (one every ``residual_interval`` steps)."""
    return b.solver_steps + (1.0 / b.residual_interval if b.residual_interval > 0 else 0.0)


def outer_step_flops(proxy: ModelConfig, b: BilevelConfig, *, engine: str, mixed_term: str,
                     val_scored: int | None = None, target: ModelConfig | None = None,
                     micro_batch_size: int | None = None, val_micro_batch_size: int | None = None) -> StepCost:
    """FLOPs of one outer step as the trainer runs it (the module's table), per micro-batch.

    Args:
        proxy: the proxy's shape (its ``seq_length`` is the tokens the model sees per sequence).
        b: the bilevel settings (inner steps, solver, curvature, products, shared inner step, KL weight).
        engine, mixed_term: the resolved choices (:func:`megatron_bliss.bilevel.hvp.resolve_engine`).
        val_scored: positions the validation loss scores per validation sequence (None: every position, an upper
            bound; the method's final-word objective scores one or two).
        target: the frozen target's shape, for the KL term's forwards (γ > 0).
        micro_batch_size, val_micro_batch_size: sequences per micro-batch (default: ``b``'s).
    """
    seq = proxy.seq_length
    tokens = (micro_batch_size or b.micro_batch_size) * seq
    val_sequences = val_micro_batch_size or b.val_micro_batch_size
    body, head = _per_token(proxy, seq)
    forward = body + head
    shared = b.share_inner_step
    inner = b.inner_steps - (1 if shared else 0)
    amortized_gn = b.solver == "amortized" and b.curvature == "gauss_newton" and mixed_term != "loop"
    parts = {
        "inner steps": inner * (body + 3 * forward) * tokens,
        "validation gradient": 3 * body * val_sequences * seq + 3 * head * val_sequences * (val_scored or seq),
        "score forward": body * tokens,
        "kept forward": (forward + (2 * forward if b.curvature == "hessian" and engine == "exact" else 0.0))
        * tokens,
        "curvature products": _products(b) * _product(engine, b.curvature, body, head) * tokens,
    }
    if shared:  # the inner gradient is a backward through the kept forward (its scores are the score forward's)
        parts["inner steps"] += 2 * forward * tokens
    if amortized_gn:
        mixed = 0.0
    elif mixed_term == "loop":
        mixed = 3 * forward
    elif mixed_term == "jvp" and engine == "exact":  # from the operator's kept graph
        mixed = 3 * body + 2 * head if b.curvature == "gauss_newton" else 4 * forward
    elif mixed_term == "jvp":
        mixed = 3 * forward
    else:
        mixed = 2 * forward
    parts["mixed term"] = mixed * tokens
    parts["score backward"] = 2 * body * tokens
    if b.kl_coef > 0 and target is not None:
        target_forward = model_flops_per_token(target, seq) / 3
        parts["target forwards"] = (inner + 1) * target_forward * tokens
    return StepCost(parts=parts, plain=3 * forward * tokens)
