"""The outer step's FLOP arithmetic (megatron_bliss.bilevel.cost) against a hand count."""

from megatron_bliss.bilevel import BilevelConfig
from megatron_bliss.bilevel.cost import outer_step_flops
from megatron_bliss.models.presets import get_preset, model_flops_per_token


def test_amortized_gauss_newton_step_by_hand():
    proxy = get_preset("tiny", seq_length=128)
    b = BilevelConfig(kl_coef=0.0, solver="amortized", solver_steps=1, curvature="gauss_newton", residual_interval=0,
                      micro_batch_size=4, val_micro_batch_size=4)
    cost = outer_step_flops(proxy, b, engine="exact", mixed_term="jvp", val_scored=2)
    body = model_flops_per_token(proxy, output_layer=False) / 3
    head = 2 * proxy.padded_vocab_size() * proxy.hidden_size
    t = 4 * 128
    # inner (B + 3F), val (3B over all positions, 3H at 2 of them), score fwd B, kept F, product 5B + 4H, bwd 2B
    expected = ((body + 3 * (body + head)) * t + 3 * body * t + 3 * head * 4 * 2 + body * t + (body + head) * t
                + (5 * body + 4 * head) * t + 2 * body * t)
    assert abs(cost.total - expected) < 1e-9 * expected
    assert cost.parts["mixed term"] == 0.0 and abs(cost.plain - 3 * (body + head) * t) < 1
    shared = outer_step_flops(proxy, BilevelConfig(**{**b.__dict__, "share_inner_step": True}), engine="exact",
                              mixed_term="jvp", val_scored=2)
    fd = outer_step_flops(proxy, b, engine="finite_difference", mixed_term="finite_difference", val_scored=2)
    assert shared.ratio < cost.ratio and fd.ratio < cost.ratio
    # the method's K = 3 SGD solve with a separate mixed term costs more than one amortized product
    sgd = outer_step_flops(proxy, BilevelConfig(**{**b.__dict__, "solver": "sgd", "solver_steps": 3}),
                           engine="exact", mixed_term="jvp", val_scored=2)
    assert sgd.parts["mixed term"] > 0 and sgd.ratio > cost.ratio + 2
