"""Reference losses: values against torch's own losses, twice differentiability (gradgradcheck, float64), masks,
and the vocabulary-parallel path (2 gloo processes) against the full-vocabulary result."""

import os

import pytest
import torch
import torch.nn.functional as F

from megatron_bliss.ops import reference as ref

torch.manual_seed(0)


def _batch(b=3, s=6, v=11, dtype=torch.float64):
    logits = torch.randn(b, s, v, dtype=dtype, requires_grad=True)
    tokens = torch.randint(0, v, (b, s))
    return logits, tokens


def test_sequence_cross_entropy_matches_torch():
    logits, tokens = _batch()
    ce = ref.sequence_cross_entropy(logits, tokens)
    expected = F.cross_entropy(logits[:, :-1].transpose(1, 2), tokens[:, 1:], reduction="none").mean(dim=1)
    torch.testing.assert_close(ce, expected)


def test_masked_cross_entropy_counts_only_targets():
    logits, tokens = _batch()
    mask = torch.zeros_like(tokens)
    mask[0, -2:] = 1
    mask[1, 0] = 1  # position 0 is never a target: sequence 1 has none and gets 0
    ce = ref.sequence_cross_entropy(logits, tokens, mask)
    per_tok = F.cross_entropy(logits[:, :-1].transpose(1, 2), tokens[:, 1:], reduction="none")
    torch.testing.assert_close(ce[0], per_tok[0, -2:].mean())
    assert ce[1] == 0 and ce[2] == 0
    torch.testing.assert_close(ref.masked_token_mean_cross_entropy(logits, tokens, mask), per_tok[0, -2:].mean())


def test_kl_matches_torch_kl_div_and_direction():
    _, _ = _batch()
    target = torch.randn(3, 6, 11, dtype=torch.float64)
    proxy = torch.randn(3, 6, 11, dtype=torch.float64, requires_grad=True)
    kl = ref.kl_target_proxy(target, proxy)
    # F.kl_div(input=log q, target=log p, log_target) = Σ p (log p - log q): KL(p_target ‖ q_proxy)
    expected = F.kl_div(F.log_softmax(proxy[:, :-1], -1), F.log_softmax(target[:, :-1], -1), log_target=True,
                        reduction="none").sum(-1).mean()
    torch.testing.assert_close(kl, expected)
    assert ref.kl_target_proxy(proxy.detach(), proxy.detach()).abs() < 1e-12
    per_seq = ref.kl_target_proxy(target, proxy, per_sequence=True)
    torch.testing.assert_close(per_seq.mean(), kl)


def test_twice_differentiable():
    logits, tokens = _batch(2, 4, 5)
    mask = torch.tensor([[0, 1, 1, 0], [0, 0, 1, 1]])
    target = torch.randn(2, 4, 5, dtype=torch.float64)
    w = torch.rand(2, dtype=torch.float64)

    def f(z):
        return ref.weighted_sum(w, ref.sequence_cross_entropy(z, tokens, mask)) + 0.3 * ref.kl_target_proxy(target, z)

    assert torch.autograd.gradcheck(f, (logits,))
    assert torch.autograd.gradgradcheck(f, (logits,))


def test_weighted_sum_and_norm():
    w = torch.tensor([0.25, 0.75])
    losses = torch.tensor([2.0, 4.0], dtype=torch.float64)
    assert ref.weighted_sum(w, losses).item() == pytest.approx(3.5)
    with pytest.raises(ValueError):
        ref.weighted_sum(w, torch.ones(3))
    assert ref.squared_norm([torch.ones(2, 2), torch.full((3,), 2.0)]).item() == pytest.approx(16.0)


def test_shape_errors():
    logits, tokens = _batch()
    with pytest.raises(ValueError, match="loss_mask"):
        ref.sequence_cross_entropy(logits, tokens, torch.ones(3, 5))
    with pytest.raises(ValueError, match="tokenizer"):
        ref.kl_target_proxy(torch.randn(3, 6, 12), logits)


_TP_SCRIPT = r'''
import sys, torch, torch.distributed as dist
from megatron_bliss.ops import reference as ref
dist.init_process_group("gloo")
r, n = dist.get_rank(), dist.get_world_size()
g = torch.Generator().manual_seed(0)
logits = torch.randn(2, 5, 8, dtype=torch.float64, generator=g)
target = torch.randn(2, 5, 8, dtype=torch.float64, generator=g)
tokens = torch.randint(0, 8, (2, 5), generator=g)
def loss(z, t, group):
    return (ref.sequence_cross_entropy(z, tokens, tp_group=group) * torch.tensor([0.3, 0.7], dtype=z.dtype)).sum() \
        + 0.5 * ref.kl_target_proxy(t, z, tp_group=group)
full = logits.clone().requires_grad_(True)
ref_loss = loss(full, target, None); ref_loss.backward()
shard = logits.chunk(n, dim=-1)[r].clone().requires_grad_(True)
tp_loss = loss(shard, target.chunk(n, dim=-1)[r], dist.group.WORLD); tp_loss.backward()
assert abs(tp_loss.item() - ref_loss.item()) < 1e-12, (tp_loss.item(), ref_loss.item())
err = (shard.grad - full.grad.chunk(n, dim=-1)[r]).abs().max().item()
assert err < 1e-12, err
if r == 0:
    print("TP_OK", ref_loss.item(), err)
dist.destroy_process_group()
'''


@pytest.mark.dist
def test_vocab_parallel_matches_full_vocab(tmp_path, torchrun):
    script = tmp_path / "tp_reference.py"
    script.write_text(_TP_SCRIPT)
    out = torchrun(str(script))
    assert "TP_OK" in out
