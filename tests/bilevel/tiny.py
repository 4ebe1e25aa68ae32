"""Tiny float64 models, batches and dense (materialized) curvature matrices for the bilevel tests.

The dense references are independent of the engines under test: the Hessian is forward-over-reverse
(``torch.func.jacfwd(torch.func.grad(f))`` on a flattened-parameter functional), the Gauss-Newton matrix is
``Jᵀ ∇²ℓ J`` with J from ``torch.autograd.functional.jacobian`` and ∇²ℓ from ``torch.func.hessian`` of the
output-space loss; the linear systems are solved with ``torch.linalg.solve``.
"""

import torch

from megatron_bliss import compat
from megatron_bliss.bilevel import BilevelConfig
from megatron_bliss.bilevel.hypergradient import lower_level_objective
from megatron_bliss.models.gpt import build_gpt, gpt_logits
from megatron_bliss.models.presets import get_preset
from megatron_bliss.models.score_model import build_score_model

VOCAB, SEQ, BATCH = 32, 8, 4


def tiny_config(**overrides):
    """Preset "debug" shrunk to 1 layer, hidden 8, vocabulary 32 (about 1,900 proxy parameters), dropout off."""
    kw = dict(vocab_size=VOCAB, hidden_size=8, num_attention_heads=2, make_vocab_size_divisible_by=VOCAB,
              seq_length=SEQ, num_layers=1, attention_backend="local", hidden_dropout=0.0, attention_dropout=0.0)
    kw.update(overrides)
    return get_preset("debug", **kw)


def tiny_models(seed: int = 0, cfg=None):
    """(proxy, score_model, target) in float64; the score body starts from the proxy."""
    cfg = cfg or tiny_config()
    torch.manual_seed(seed)
    proxy = build_gpt(cfg).double()
    target = build_gpt(cfg).double()
    score = build_score_model(cfg, proxy, head_seed=seed).double()
    with torch.no_grad():  # a head large enough that the weights P differ visibly
        score.head.weight.mul_(50.0)
    return proxy, score, target


def tiny_batches(seed: int = 0, batch: int = BATCH, val_batch: int = 3):
    """Train tokens [batch, SEQ] and a validation dict with a last-3-tokens loss mask."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (batch, SEQ), generator=gen)
    val_tokens = torch.randint(0, VOCAB, (val_batch, SEQ), generator=gen)
    mask = torch.zeros(val_batch, SEQ, dtype=torch.long)
    mask[:, -3:] = 1
    return tokens, {"tokens": val_tokens, "loss_mask": mask}


def target_logits(target, tokens):
    with torch.no_grad():
        return gpt_logits(target, tokens[:, :-1])


def flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


def unflat(vector, like):
    out, offset = [], 0
    for t in like:
        out.append(vector[offset:offset + t.numel()].view_as(t))
        offset += t.numel()
    return out


def objective(proxy, tokens, weights, tl, gamma=0.1, reg=1e-3):
    return lower_level_objective(proxy, tokens, weights, tl, BilevelConfig(kl_coef=gamma, l2_coef=reg))


def dense_hessian(obj):
    compat.enable_forward_ad()
    params = list(obj.params)

    def f(vector):
        ts = unflat(vector, params)
        out = obj.output_loss(obj.forward(ts))
        return out + obj.param_loss(ts) if obj.param_loss else out

    h = torch.func.jacfwd(torch.func.grad(f))(flat([p.detach() for p in params]))
    assert torch.allclose(h, h.T, atol=1e-10)
    return h


def dense_gauss_newton(obj, reg):
    params = list(obj.params)
    x = flat([p.detach() for p in params])
    out = obj.forward(None).detach()
    jac = torch.autograd.functional.jacobian(lambda v: obj.forward(unflat(v, params)).reshape(-1), x,
                                             vectorize=True)
    h_out = torch.func.hessian(lambda o: obj.output_loss(o.view_as(out)))(out.reshape(-1))
    return jac.T @ h_out @ jac + 2 * reg * torch.eye(x.numel(), dtype=x.dtype)
