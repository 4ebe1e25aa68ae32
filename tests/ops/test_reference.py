"""Reference losses: values against torch's own losses, twice differentiability (gradgradcheck, float64), masks,
and the vocabulary-parallel path (2 gloo processes) against the full-vocabulary result."""

import pytest
import torch
import torch.nn.functional as F

from megatron_bliss.data.loader import split_next_token
from megatron_bliss.ops import reference as ref

torch.manual_seed(0)


def _batch(b=3, n=6, v=11, dtype=torch.float64):
    logits = torch.randn(b, n, v, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, v, (b, n))
    return logits, labels


def test_split_next_token():
    seq = torch.arange(10).view(2, 5)
    mask = torch.tensor([[0, 0, 0, 1, 1], [1, 0, 1, 0, 1]])
    inputs, labels, m = split_next_token(seq, mask)
    assert inputs.tolist() == [[0, 1, 2, 3], [5, 6, 7, 8]] and labels.tolist() == [[1, 2, 3, 4], [6, 7, 8, 9]]
    assert m.tolist() == [[0, 0, 1, 1], [0, 1, 0, 1]]
    with pytest.raises(ValueError, match="loss_mask"):
        split_next_token(seq, mask[:, :4])


def test_sequence_cross_entropy_matches_torch():
    logits, labels = _batch()
    ce = ref.sequence_cross_entropy(logits, labels)
    expected = F.cross_entropy(logits.transpose(1, 2), labels, reduction="none").mean(dim=1)
    torch.testing.assert_close(ce, expected)


def test_masked_cross_entropy_counts_only_targets():
    logits, labels = _batch()
    mask = torch.zeros_like(labels)
    mask[0, -2:] = 1
    mask[2, 1] = 1
    ce = ref.sequence_cross_entropy(logits, labels, mask)
    per_tok = F.cross_entropy(logits.transpose(1, 2), labels, reduction="none")
    torch.testing.assert_close(ce[0], per_tok[0, -2:].mean())
    assert ce[1] == 0  # no target: 0, not NaN
    torch.testing.assert_close(ref.token_mean_cross_entropy(logits, labels, mask),
                               (per_tok[0, -2:].sum() + per_tok[2, 1]) / 3)


def test_kl_matches_torch_kl_div_and_direction():
    target = torch.randn(3, 6, 11, dtype=torch.float64)
    proxy = torch.randn(3, 6, 11, dtype=torch.float64, requires_grad=True)
    kl = ref.kl_target_proxy(target, proxy)
    # F.kl_div(input=log q, target=log p, log_target) = Σ p (log p - log q): KL(p_target ‖ q_proxy)
    expected = F.kl_div(F.log_softmax(proxy, -1), F.log_softmax(target, -1), log_target=True,
                        reduction="none").sum(-1).mean()
    torch.testing.assert_close(kl, expected)
    assert ref.kl_target_proxy(proxy.detach(), proxy.detach()).abs() < 1e-12
    torch.testing.assert_close(ref.kl_target_proxy(target, proxy, per_sequence=True).mean(), kl)
    grad, = torch.autograd.grad(kl, proxy)
    # d KL / d z_proxy = (softmax(z_proxy) - softmax(z_target)) / positions
    torch.testing.assert_close(grad, (proxy.softmax(-1) - target.softmax(-1)).detach() / 18)


def test_twice_differentiable():
    logits, labels = _batch(2, 4, 5)
    mask = torch.tensor([[0, 1, 1, 0], [0, 0, 1, 1]])
    target = torch.randn(2, 4, 5, dtype=torch.float64)
    w = torch.rand(2, dtype=torch.float64)

    def f(z):
        return ref.weighted_sum(w, ref.sequence_cross_entropy(z, labels, mask)) + 0.3 * ref.kl_target_proxy(target, z)

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
    logits, _ = _batch()
    with pytest.raises(ValueError, match="tokenizer"):
        ref.kl_target_proxy(torch.randn(3, 6, 12), logits)


_TP_SCRIPT = r'''
import warnings
import torch
warnings.filterwarnings("ignore", message=".*Apex.*|.*Transformer Engine.*")
from megatron_bliss import parallel
from megatron_bliss.ops import reference as ref
parallel.initialize(parallel.ParallelConfig(tensor_model_parallel_size=2))
tp = parallel.tensor_parallel_group()
r, n = parallel.group_rank(tp), parallel.group_size(tp)
assert n == 2
g = torch.Generator().manual_seed(0)
logits = torch.randn(2, 5, 8, dtype=torch.float64, generator=g)
target = torch.randn(2, 5, 8, dtype=torch.float64, generator=g)
labels = torch.randint(0, 8, (2, 5), generator=g)
def loss(z, t, group):
    return (ref.sequence_cross_entropy(z, labels, tp_group=group) * torch.tensor([0.3, 0.7], dtype=z.dtype)).sum() \
        + 0.5 * ref.kl_target_proxy(t, z, tp_group=group)
full = logits.clone().requires_grad_(True)
ref_loss = loss(full, target, None); ref_loss.backward()
shard = logits.chunk(n, dim=-1)[r].clone().requires_grad_(True)
tp_loss = loss(shard, target.chunk(n, dim=-1)[r], tp); tp_loss.backward()
assert abs(tp_loss.item() - ref_loss.item()) < 1e-12, (tp_loss.item(), ref_loss.item())
err = (shard.grad - full.grad.chunk(n, dim=-1)[r]).abs().max().item()
assert err < 1e-12, err
if r == 0:
    print("TP_OK", ref_loss.item(), err)
parallel.destroy()
'''


@pytest.mark.dist
def test_vocab_parallel_matches_full_vocab(tmp_path, torchrun):
    script = tmp_path / "tp_reference.py"
    script.write_text(_TP_SCRIPT)
    out = torchrun(str(script))
    assert "TP_OK" in out
