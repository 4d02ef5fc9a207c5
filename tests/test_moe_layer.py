"""MoE layer: grouped dispatch vs a per-token reference, balance losses, bias updates, layouts."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from src.models.moe import (
    MoEConfig,
    MoEFeedForward,
    layout_widths,
    moe_layers,
    parse_layout,
    total_aux_loss,
)
from src.models.moe import (
    set_layers_top_k as set_top_k,
)

D = 16


def _act(h, activation):
    if activation == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up
    return F.gelu(h, approximate="tanh") if activation == "gelu_tanh" else F.gelu(h)


def reference_forward(layer: MoEFeedForward, x: torch.Tensor) -> torch.Tensor:
    """Token by token, expert by expert: the definition the grouped dispatch must reproduce."""
    cfg = layer.cfg
    rows = []
    for x_D in x.reshape(-1, layer.dim):
        y_D = layer.out_bias if layer.out_bias is not None else torch.zeros(layer.dim)
        if layer.num_shared:
            y_D = y_D + layer.shared_down(_act(layer.shared_up(x_D), cfg.activation))
        if layer.top_k:
            logits_E = layer.router.weight @ x_D
            scores_E = logits_E.softmax(-1) if cfg.gate == "softmax" else logits_E.sigmoid()
            choice_E = scores_E + layer.expert_bias if cfg.balance == "aux_free" else scores_E
            chosen = sorted(range(layer.num_experts), key=lambda e: -choice_E[e].item())[: layer.top_k]
            gates = scores_E[chosen]
            if cfg.renormalize:
                gates = gates / gates.sum()
            gates = gates * cfg.route_scale
            if layer.constant_gates:
                gates = torch.ones_like(gates)
            for gate, e in zip(gates, chosen):
                hidden = _act(x_D @ layer.w_up[e] + layer.b_up[e], cfg.activation)
                y_D = y_D + gate * (hidden @ layer.w_down[e])
        rows.append(y_D)
    return torch.stack(rows).view(x.shape)


def _layer(seed=0, dim=D, **cfg) -> MoEFeedForward:
    torch.manual_seed(seed)
    base = dict(num_experts=8, top_k=2, num_shared=1, expert_width=8, shared_width=16, router_init="normal")
    layer = MoEFeedForward(dim, MoEConfig(**{**base, **cfg}))
    with torch.no_grad():  # a router strong enough that the top-k choice is not a near-tie
        layer.router.weight.normal_(std=1.0)
        layer.out_bias.normal_()
    return layer


def _grads(layer, x, out, g):
    layer.zero_grad()
    x.grad = None
    out.backward(g)
    grads = {name: p.grad.clone() for name, p in layer.named_parameters() if p.grad is not None}
    grads["x"] = x.grad.clone()
    return grads


@pytest.mark.parametrize("use_grouped_mm", [True, False])
@pytest.mark.parametrize("activation", ["gelu_tanh", "swiglu"])
@pytest.mark.parametrize("gate,renormalize,route_scale", [
    ("softmax", False, 1.0), ("softmax", True, 1.0), ("sigmoid", True, 2.5), ("sigmoid", False, 1.0),
])  # fmt: skip
@pytest.mark.parametrize("tokens", [3, 24])
def test_grouped_dispatch_matches_reference(use_grouped_mm, activation, gate, renormalize, route_scale, tokens):
    layer = _layer(activation=activation, gate=gate, renormalize=renormalize, route_scale=route_scale)
    layer.use_grouped_mm = use_grouped_mm
    x = torch.randn(1, tokens, D, requires_grad=True)
    g = torch.randn(1, tokens, D)

    out = layer(x)
    if tokens == 3:  # 3 tokens x top-2 leave at least 2 of 8 experts without tokens
        assert (layer.last_counts == 0).any()
    assert int(layer.last_counts.sum()) == tokens * 2
    expected = reference_forward(layer, x)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # the inference path gates in place
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)

    grads, expected_grads = _grads(layer, x, out, g), _grads(layer, x, expected, g)
    assert grads.keys() == expected_grads.keys()
    assert {"x", "router.weight", "w_up", "b_up", "w_down", "out_bias", "shared_up.weight"} <= grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], expected_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_aux_free_selection_uses_bias_but_gates_use_raw_scores():
    layer = _layer(balance="aux_free")
    layer.expert_bias.copy_(torch.linspace(-1.0, 1.0, 8))
    x = torch.randn(2, 5, D)
    torch.testing.assert_close(layer(x), reference_forward(layer, x), atol=1e-5, rtol=1e-5)


def test_sum_backward_with_expanded_grad_works():
    # grouped_mm rejects stride-0 grads; the index_select in index_add_'s backward must make them contiguous.
    layer = _layer()
    x = torch.randn(4, 6, D, requires_grad=True)
    assert layer.expert_matmul_path(torch.float32) == "torch.nn.functional.grouped_mm"
    layer(x).sum().backward()
    assert layer.w_down.grad.abs().sum() > 0


def test_misaligned_width_falls_back_to_split_loop():
    layer = _layer(dim=6, expert_width=3, shared_width=5)
    assert layer.expert_matmul_path(torch.float32) == "split loop over experts (fallback)"
    x = torch.randn(7, 6)
    torch.testing.assert_close(layer(x), reference_forward(layer, x), atol=1e-5, rtol=1e-5)


def test_top_k_zero_is_shared_mlp_plus_out_bias_and_top_k_is_settable():
    layer = _layer()
    x = torch.randn(3, 5, D)
    layer.top_k = 0
    shared = layer.shared_down(F.gelu(layer.shared_up(x), approximate="tanh")) + layer.out_bias
    torch.testing.assert_close(layer(x), shared)
    assert layer.last_counts.sum() == 0
    layer.top_k = 3
    assert layer.activated_width == 16 + 3 * 8
    torch.testing.assert_close(layer(x), reference_forward(layer, x), atol=1e-5, rtol=1e-5)
    assert int(layer.last_counts.sum()) == 15 * 3


def test_shared_free_layer_and_no_out_bias():
    torch.manual_seed(0)
    cfg = MoEConfig(num_shared=0, num_experts=4, top_k=1, expert_width=8, router_init="normal")
    layer = MoEFeedForward(D, cfg, out_bias=False)
    assert layer.shared_up is None and layer.out_bias is None
    x = torch.randn(9, D)
    torch.testing.assert_close(layer(x), reference_forward(layer, x), atol=1e-5, rtol=1e-5)
    layer.top_k = 0
    assert torch.equal(layer(x), torch.zeros(9, D))


def test_invalid_values_raise_value_errors_naming_the_field():
    with pytest.raises(ValueError, match="top_k"):
        MoEConfig(num_experts=4, top_k=5)
    for field, bad in (("gate", "relu"), ("activation", "tanh"), ("balance", "sinkhorn"), ("router_init", "x")):
        with pytest.raises(ValueError, match=field):
            MoEConfig(**{field: bad})
    layer = _layer()
    with pytest.raises(ValueError, match="top_k"):
        layer.top_k = 9
    with pytest.raises(ValueError, match="top_k"):
        layer.top_k = -1
    with pytest.raises(ValueError, match="num_experts"):
        layout_widths(100, 1, 12)  # 25 shared, 75 left for 12 experts
    with pytest.raises(ValueError, match="shared_fraction"):
        layout_widths(10, 1, 12)  # a quarter of 10 is not a whole width
    with pytest.raises(ValueError, match="layout"):
        parse_layout("12E2A")
    with pytest.raises(ValueError, match="num_experts"):
        MoEFeedForward(100, MoEConfig.from_layout("1S12E2A"), ffn_width=100)


def test_layouts():
    assert parse_layout("1S12E2A") == (1, 12, 2)
    assert parse_layout("2S48E5A") == (2, 48, 5)
    assert layout_widths(256, 1, 12) == (64, 16)
    assert layout_widths(12288, 1, 12) == (3072, 768)  # FLUX.1-dev FFN (docs/design.md §2.2)
    layer = MoEFeedForward(64, MoEConfig.from_layout("1S12E2A"), ffn_width=256)
    assert (layer.shared_width, layer.expert_width) == (64, 16)
    assert layer.total_width == 256
    assert layer.activated_width / layer.total_width == pytest.approx(0.375)


def test_all_experts_with_constant_gates_equal_the_concatenated_dense_mlp():
    layer = _layer(num_experts=4, top_k=4)
    layer.constant_gates = True
    x = torch.randn(2, 7, D)
    w_up = torch.cat([layer.shared_up.weight.T, *layer.w_up], dim=1)
    b_up = torch.cat([layer.shared_up.bias, *layer.b_up])
    w_down = torch.cat([layer.shared_down.weight.T, *layer.w_down], dim=0)
    dense = F.gelu(x @ w_up + b_up, approximate="tanh") @ w_down + layer.out_bias
    torch.testing.assert_close(layer(x), dense, atol=1e-5, rtol=1e-5)


def test_router_gets_gradients_from_aux_loss_and_through_gates():
    layer = _layer()
    layer.train()
    x = torch.randn(4, 6, D)
    layer(x)
    layer.aux_loss.backward()
    assert layer.router.weight.grad.abs().sum() > 0

    layer = _layer(aux_loss_weight=0.0)
    layer(x).square().sum().backward()
    assert layer.aux_loss == 0
    assert layer.router.weight.grad.abs().sum() > 0


def _logit_layer(logits, gate, **cfg):
    """A router whose logits on the one-hot tokens x = I are exactly ``logits`` (T = E = D = 3)."""
    layer = MoEFeedForward(3, MoEConfig(num_experts=3, top_k=1, num_shared=0, expert_width=4, gate=gate, **cfg))
    with torch.no_grad():
        layer.router.weight.copy_(torch.tensor(logits).T)
    return layer


@pytest.mark.parametrize("gate", ["softmax", "sigmoid"])
def test_balance_and_z_losses_match_hand_computed_values(gate):
    logits = [[2.0, 0.0, 0.0], [1.5, 1.0, 0.0], [1.0, 0.0, 3.0]]  # top-1 picks experts 0, 0, 2
    layer = _logit_layer(logits, gate, aux_loss_weight=0.1, z_loss_weight=0.01)
    layer.train()
    layer(torch.eye(3))

    def probs(row):
        s = [math.exp(v) for v in row] if gate == "softmax" else [1 / (1 + math.exp(-v)) for v in row]
        return [v / sum(s) for v in s]

    p_mean = [sum(probs(row)[e] for row in logits) / 3 for e in range(3)]
    f = [2 / 3, 0.0, 1 / 3]
    aux = 0.1 * 3 * sum(fi * pi for fi, pi in zip(f, p_mean))
    z = 0.01 * sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in logits) / 3
    assert layer.last_counts.tolist() == [2, 0, 1]
    assert layer.aux_loss.item() == pytest.approx(aux + z, rel=1e-5)

    layer.eval()
    layer(torch.eye(3))
    assert layer.aux_loss.item() == 0.0  # losses only in training mode


def test_aux_free_bias_update_balances_a_skewed_router():
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=4, top_k=1, num_shared=0, expert_width=8, balance="aux_free", bias_update_rate=0.01)
    layer = MoEFeedForward(D, cfg)
    x = torch.randn(256, D)
    x[:, 0] = 1.0  # a constant feature that the router weighs heavily for expert 0
    with torch.no_grad():
        layer.router.weight.normal_(std=0.5)
        layer.router.weight[0, 0] = 3.0

    layer(x)
    skewed = layer.load_stats()["max_over_mean_load"].item()
    layer.pending_counts.zero_()
    for _ in range(60):
        layer(x)
        layer.update_expert_bias()
    assert layer.pending_counts.sum() == 0
    layer(x)
    balanced = layer.load_stats()["max_over_mean_load"].item()
    assert skewed > 3.0
    assert balanced < 1.3
    assert layer.expert_bias[0] < 0  # the overloaded expert was pushed down

    # Explicit (e.g. all-reduced) counts are used as given; other balance modes leave the bias alone.
    before = layer.expert_bias.clone()
    layer.update_expert_bias(torch.tensor([0, 10, 10, 10]))
    assert layer.expert_bias[0] - before[0] == pytest.approx(0.01)
    aux_layer = _layer()
    aux_layer(x)
    aux_layer.update_expert_bias(torch.tensor([0, 0, 0, 0, 0, 0, 0, 9]))
    assert torch.equal(aux_layer.expert_bias, torch.zeros(8))


def test_load_stats_and_model_helpers():
    model = nn.Sequential(_layer(seed=1), nn.GELU(), _layer(seed=2))
    assert len(moe_layers(model)) == 2
    assert total_aux_loss(nn.Linear(2, 2)).item() == 0.0
    model.train()
    model(torch.randn(5, D))
    expected = sum(layer.aux_loss for layer in moe_layers(model))
    torch.testing.assert_close(total_aux_loss(model), expected)
    stats = moe_layers(model)[0].load_stats()
    assert stats["counts"].sum() == 10
    torch.testing.assert_close(stats["load_fraction"].sum(), torch.tensor(1.0))
    assert stats["max_over_mean_load"] >= 1.0
    assert 0 < stats["router_entropy"] <= math.log(8) + 1e-6
    set_top_k(model, 0)
    assert [layer.top_k for layer in moe_layers(model)] == [0, 0]
    assert "0.expert_bias" in model.state_dict()
    assert not any("pending_counts" in key for key in model.state_dict())


def test_bf16_autocast_routes_in_fp32_and_stays_close():
    layer = _layer()
    x = torch.randn(32, D)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    assert layer.last_probs_mean.dtype == torch.float32
    torch.testing.assert_close(out.float(), layer(x), atol=0.1, rtol=0.05)


def test_bf16_module_runs_grouped_mm_and_keeps_the_selection_bias_in_fp32():
    layer = _layer(balance="aux_free")
    x = torch.randn(8, D)
    expected = layer(x)
    layer.to(torch.bfloat16)
    assert layer.expert_bias.dtype == torch.float32 and layer.w_up.dtype == torch.bfloat16
    assert layer.expert_matmul_path(torch.bfloat16) == "torch.nn.functional.grouped_mm"
    out = layer(x.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, atol=0.1, rtol=0.05)


def test_the_cpu_and_cuda_combines_agree_and_both_pass_gradients():
    """The CUDA path (permutation gather + sum in choice order) is dead code on a CPU run: test it here."""
    from src.models.moe import combine

    torch.manual_seed(0)
    T, K, D, E = 64, 2, 8, 6
    expert_N = torch.randint(E, (T * K,))
    order_N = torch.argsort(expert_N, stable=True)
    token_N = torch.div(order_N, K, rounding_mode="floor")
    y_ND = torch.randn(T * K, D, requires_grad=True)
    base_TD = torch.randn(T, D)
    outs, grads = [], []
    for gather in (False, True):
        out = combine(base_TD.clone(), y_ND, token_N, order_N, K, gather)
        (g,) = torch.autograd.grad((out * torch.arange(D)).sum(), y_ND)
        outs.append(out.detach())
        grads.append(g)
    reference = base_TD.clone().index_add_(0, token_N, y_ND.detach())
    assert torch.allclose(outs[0], reference) and torch.allclose(outs[1], reference, atol=1e-6)
    assert torch.equal(grads[0], grads[1])
