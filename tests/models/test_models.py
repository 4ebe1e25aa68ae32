"""Forward/backward of tiny target, proxy and score models on CPU; score-model initialization; checkpoints."""

import os

import pytest
import torch

from megatron_bliss.checkpointing import CheckpointError, load_model, model_config, save_model
from megatron_bliss.models import build_gpt, build_score_model, get_preset, gpt_logits
from megatron_bliss.models.gpt import resolve_attention_backend
from tests.conftest import REPO_ROOT, run_torchrun


def _lm_loss(model, tokens):
    logits = gpt_logits(model, tokens[:, :-1])
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


@pytest.mark.parametrize("role", ["target", "proxy"])
def test_gpt_forward_backward(single_process, role):
    cfg = get_preset("debug", num_layers=2 if role == "proxy" else 3)
    model = build_gpt(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.seq_length + 1))
    loss = _lm_loss(model, tokens)
    loss.backward()
    assert abs(loss.item() - torch.log(torch.tensor(float(cfg.vocab_size))).item()) < 0.5
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_sdpa_matches_local_attention(single_process):
    cfg = get_preset("debug")
    local = build_gpt(cfg, attention_backend="local")
    sdpa = build_gpt(cfg, attention_backend="sdpa")
    sdpa.load_state_dict(local.state_dict())
    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.seq_length))
    torch.testing.assert_close(gpt_logits(sdpa, tokens), gpt_logits(local, tokens), rtol=1e-5, atol=1e-5)
    assert resolve_attention_backend("auto") == ("local" if not torch.cuda.is_available() else
                                                 resolve_attention_backend("auto"))


def test_score_model_in_unit_interval_and_body_equals_proxy(single_process):
    cfg = get_preset("debug")
    proxy = build_gpt(cfg)
    score = build_score_model(cfg, proxy)
    proxy_state = proxy.state_dict()
    for name, value in score.body.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, proxy_state[name]), name
    assert torch.equal(score.final_layernorm.weight, proxy_state["decoder.final_layernorm.weight"])
    assert not any(k.startswith("output_layer") for k in score.body.state_dict())
    tokens = torch.randint(0, cfg.vocab_size, (5, cfg.seq_length))
    s = score(tokens)
    assert s.shape == (5,) and bool(((s > 0) & (s < 1)).all())
    s.sum().backward()
    assert score.head.weight.grad.abs().sum() > 0
    assert score.body.embedding.word_embeddings.weight.grad.abs().sum() > 0
    # mean-pool: the score equals the head applied to the mean of the normed hidden states, by hand
    with torch.no_grad():
        b, n = tokens.shape
        from megatron_bliss.models.gpt import causal_attention_mask, position_ids
        hidden = score.body(tokens, position_ids(b, n), causal_attention_mask(n))
        manual = torch.sigmoid(score.head(score.final_layernorm(hidden).mean(0))).squeeze(-1)
    torch.testing.assert_close(s.detach(), manual)


def test_checkpoint_roundtrip_and_preset_mismatch(single_process, tmp_path):
    cfg = get_preset("debug")
    model = build_gpt(cfg)
    path = str(tmp_path / "proxy")
    save_model(path, model, cfg, "proxy")
    assert not os.path.exists(path + ".tmp")
    other = build_gpt(cfg)
    load_model(path, other, cfg, "proxy")
    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.seq_length + 1))
    assert _lm_loss(other, tokens).item() == _lm_loss(model, tokens).item()
    assert model_config(path) == cfg  # the full config travels with the weights
    bigger = get_preset("debug", hidden_size=32)
    with pytest.raises(CheckpointError, match="preset 'debug'.*hidden_size: checkpoint 16 vs config 32"):
        load_model(path, build_gpt(bigger), bigger, "proxy")
    with pytest.raises(CheckpointError, match="holds a proxy model, expected a target"):
        load_model(path, other, cfg, "target")
    with pytest.raises(CheckpointError, match="not a megatron_bliss checkpoint"):
        load_model(str(tmp_path), other, cfg)


def test_score_model_checkpoint_roundtrip(single_process, tmp_path):
    cfg = get_preset("debug")
    score = build_score_model(cfg, build_gpt(cfg))
    score.reset_head(3)
    save_model(str(tmp_path / "score"), score, cfg, "score")
    other = build_score_model(cfg)
    load_model(str(tmp_path / "score"), other, cfg, "score")
    tokens = torch.randint(0, cfg.vocab_size, (3, cfg.seq_length))
    assert torch.equal(other(tokens), score(tokens))


@pytest.mark.dist
@pytest.mark.parametrize("layout", [("2", "1"), ("1", "2"), ("1", "2", "2")], ids=["tp2", "pp2", "pp2_vpp2"])
def test_parallel_layouts_match_one_process(tmp_path_factory, layout):
    """TP=2, PP=2 and interleaved PP=2 (2 gloo processes) give the 1-process loss and gradient norm."""
    base = tmp_path_factory.getbasetemp() / "layout_ref"
    ckpt, ref = str(base / "ckpt"), str(base / "ref.json")
    script = os.path.join(REPO_ROOT, "tests", "models", "dist_layouts.py")
    if not os.path.exists(ref):
        base.mkdir(exist_ok=True)
        run_torchrun(script, "save_ref", ckpt, ref, nproc=1)
    out = run_torchrun(script, "check", ckpt, ref, *layout)
    assert '"ref"' in out


def test_gpt_features_equal_the_models_own_forward(single_process):
    """The bilevel round's logits (the forward stopped at the output layer, which is applied in [b, s] order) equal
    megatron-core's, with the same gradients; ``logits=False`` returns h alone."""
    from megatron_bliss.models.gpt import gpt_features

    cfg = get_preset("debug")
    model = build_gpt(cfg, attention_backend="local")
    tokens = torch.randint(0, cfg.vocab_size, (3, cfg.seq_length))
    h, logits = gpt_features(model, tokens)
    expected = gpt_logits(model, tokens)
    assert h.shape == (3, cfg.seq_length, cfg.hidden_size) and logits.is_contiguous()
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits, h @ model.output_layer.weight.t(), rtol=1e-5, atol=1e-5)
    probe = torch.randn_like(expected)
    params = list(model.parameters())
    ours = torch.autograd.grad((logits * probe).sum(), params)
    theirs = torch.autograd.grad((expected * probe).sum(), params)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    alone, none = gpt_features(model, tokens, logits=False)
    assert none is None
    torch.testing.assert_close(alone, h)
    assert not model.output_layer._forward_pre_hooks  # the hook is removed
