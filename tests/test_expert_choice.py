"""Expert-choice routing: grouped dispatch vs an expert-by-expert reference, full capacity = the dense mixture,
per-sample pools, load statistics, compile, errors, and the conversion and DiT configs that pass it on."""

import math

import pytest
import torch
import torch.nn.functional as F

from src.models.moe import MoEConfig, MoEFeedForward

D = 16
E, K = 8, 2


def _act(h, activation):
    if activation == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up
    return F.gelu(h, approximate="tanh")


def _expert(layer, e, x_D):
    hidden = x_D @ layer.w_up[e] + (layer.b_up[e] if layer.b_up is not None else 0)
    return _act(hidden, layer.cfg.activation) @ layer.w_down[e]


def reference_forward(layer: MoEFeedForward, x: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Pool by pool, expert by expert, then token by token: the definition the grouped dispatch must reproduce.
    Returns the output and the share of tokens no expert took."""
    cfg = layer.cfg
    x_TD = x.reshape(-1, layer.dim)
    T = x_TD.shape[0]
    L = x.shape[-2] if cfg.pool == "sample" and x.dim() >= 3 else T
    capacity = min(L, math.ceil(cfg.capacity_factor * L * layer.top_k / layer.num_experts))
    scores = []
    for x_D in x_TD:
        logits_E = layer.router.weight @ x_D
        scores.append(logits_E.softmax(-1) if cfg.gate == "softmax" else logits_E.sigmoid())
    picks = {t: [] for t in range(T)}  # token → [(expert, score)]
    for start in range(0, T, L):
        for e in range(layer.num_experts):
            pool = sorted(range(start, start + L), key=lambda t: -scores[t][e].item())
            for t in pool[:capacity]:
                picks[t].append((e, scores[t][e]))
    rows = []
    for t, x_D in enumerate(x_TD):
        y_D = layer.out_bias if layer.out_bias is not None else torch.zeros(layer.dim)
        if layer.num_shared:
            y_D = y_D + layer.shared_down(_act(layer.shared_up(x_D), cfg.activation))
        gates = [score for _, score in picks[t]]
        if cfg.renormalize and gates:
            total = sum(gates)
            gates = [g / total for g in gates]
        for (e, _), gate in zip(picks[t], gates):
            y_D = y_D + gate * cfg.route_scale * _expert(layer, e, x_D)
        rows.append(y_D)
    dropped = sum(not picks[t] for t in range(T)) / T
    return torch.stack(rows).view(x.shape), dropped


def _layer(seed=0, **cfg) -> MoEFeedForward:
    torch.manual_seed(seed)
    base = dict(num_experts=E, top_k=K, num_shared=1, expert_width=8, shared_width=16, router_init="normal")
    base |= dict(routing="expert_choice", balance="none")
    layer = MoEFeedForward(D, MoEConfig(**{**base, **cfg}))
    with torch.no_grad():  # a router strong enough that no two tokens tie for an expert's last place
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


@pytest.mark.parametrize("pool", ["batch", "sample"])
@pytest.mark.parametrize("capacity_factor", [0.5, 1.0, 2.0, 4.0])  # 4.0 = E/K: C = L, every expert every token
@pytest.mark.parametrize("gate,renormalize,route_scale,activation", [
    ("softmax", False, 1.0, "gelu_tanh"), ("sigmoid", True, 2.5, "swiglu"), ("sigmoid", False, 1.0, "swiglu"),
])  # fmt: skip
@pytest.mark.parametrize("use_grouped_mm", [True, False])
def test_grouped_dispatch_matches_the_expert_by_expert_reference(
    pool, capacity_factor, gate, renormalize, route_scale, activation, use_grouped_mm
):
    layer = _layer(
        pool=pool,
        capacity_factor=capacity_factor,
        gate=gate,
        renormalize=renormalize,
        route_scale=route_scale,
        activation=activation,
    )
    layer.use_grouped_mm = use_grouped_mm
    x = torch.randn(3, 10, D, requires_grad=True)
    g = torch.randn(3, 10, D)

    out = layer(x)
    expected, dropped = reference_forward(layer, x)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)
    L = 10 if pool == "sample" else 30
    capacity = min(L, math.ceil(capacity_factor * L * K / E))
    assert layer.last_counts.tolist() == [30 // L * capacity] * E
    assert layer.load_stats()["dropped_share"].item() == pytest.approx(dropped)
    assert layer.load_stats()["max_over_mean_load"].item() == 1.0
    with torch.no_grad():  # the inference path gates in place
        torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=1e-6)

    grads, expected_grads = _grads(layer, x, out, g), _grads(layer, x, expected, g)
    assert grads.keys() == expected_grads.keys()
    assert {"x", "router.weight", "w_up", "w_down", "out_bias", "shared_up.weight"} <= grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], expected_grads[name], atol=1e-6, rtol=1e-5, msg=name)


def test_a_small_capacity_drops_tokens_to_the_shared_expert():
    layer = _layer(capacity_factor=0.25)  # C = ceil(0.25·30·2/8) = 2 per expert: at most 16 of 30 tokens
    x = torch.randn(1, 30, D)
    with torch.no_grad():
        layer(x)
        assert layer.load_stats()["dropped_share"].item() >= 14 / 30
        picked = torch.zeros(30, dtype=torch.bool)
        picked[layer.last_token_idx_EM.flatten()] = True
        shared_only = layer.shared_down(_act(layer.shared_up(x[0]), "gelu_tanh")) + layer.out_bias
        torch.testing.assert_close(layer(x)[0, ~picked], shared_only[~picked])


def test_full_capacity_is_the_dense_mixture_weighted_by_the_scores():
    layer = _layer(capacity_factor=E / K)
    x = torch.randn(2, 5, D)
    with torch.no_grad():
        x_TD = x.reshape(-1, D)
        scores_TE = (x_TD @ layer.router.weight.T).softmax(-1)
        mixture_TD = sum(scores_TE[:, e : e + 1] * _expert(layer, e, x_TD) for e in range(E))
        expected = layer.shared_down(_act(layer.shared_up(x_TD), "gelu_tanh")) + layer.out_bias + mixture_TD
        torch.testing.assert_close(layer(x).reshape(-1, D), expected, atol=1e-6, rtol=1e-6)
        assert layer.load_stats()["dropped_share"].item() == 0.0


def test_per_sample_pools_keep_samples_independent_and_batch_pools_do_not():
    x = torch.randn(2, 12, D)
    x_other = x.clone()
    x_other[1] = 3 * torch.randn(12, D)  # another second sample (e.g. CFG's unconditional half)
    with torch.no_grad():
        per_sample = _layer(pool="sample")
        assert torch.equal(per_sample(x)[0], per_sample(x_other)[0])
        per_batch = _layer(pool="batch")
        assert not torch.equal(per_batch(x)[0], per_batch(x_other)[0])
        # a 2-D input is one sample
        torch.testing.assert_close(per_sample(x[0]), per_sample(x[:1])[0])


def test_top_k_zero_runs_the_shared_expert_only():
    layer = _layer()
    layer.top_k = 0
    x = torch.randn(2, 4, D)
    with torch.no_grad():
        expected = layer.shared_down(_act(layer.shared_up(x), "gelu_tanh")) + layer.out_bias
        torch.testing.assert_close(layer(x), expected)


def test_the_expert_choice_layer_compiles_forward_and_backward_as_one_graph():
    torch.manual_seed(0)
    cfg = MoEConfig(
        router_init="normal", expert_width=16, shared_width=64, routing="expert_choice", balance="none", pool="sample"
    )
    layer = MoEFeedForward(64, cfg).to(torch.bfloat16)
    x = torch.randn(2, 32, 64, dtype=torch.bfloat16, requires_grad=True)
    eager = layer(x)
    eager.float().square().mean().backward()
    grads = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    out.float().square().mean().backward()
    torch.testing.assert_close(out, eager)
    for p, g in zip(layer.parameters(), grads):
        torch.testing.assert_close(p.grad, g)


@pytest.mark.parametrize("field,value,message", [
    ("capacity_factor", 0.0, "capacity_factor=0.0"),
    ("capacity_factor", -1.0, "capacity_factor=-1.0"),
    ("capacity_factor", float("nan"), "capacity_factor=nan"),
    ("capacity_factor", "1", "capacity_factor='1'"),
    ("routing", "experts_choose", "routing='experts_choose': allowed values are token_choice, expert_choice"),
    ("pool", "image", "pool='image': allowed values are batch, sample"),
    ("balance", "aux_free", "balance='aux_free' with routing='expert_choice'"),
])  # fmt: skip
def test_bad_routing_fields_are_one_error_naming_the_field(field, value, message):
    from src.models.convert import ConversionConfig

    fields = {"routing": "expert_choice", "balance": "none", field: value}
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")) as err:
        MoEConfig(**fields)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ConversionConfig(split="random", **fields)


def test_the_conversion_and_the_dit_recipe_pass_expert_choice_on():
    from src.models.convert import ConversionConfig
    from src.models.dit import DiT
    from src.models.dit_presets import dit_config

    conversion = ConversionConfig(routing="expert_choice", balance="none", capacity_factor=1.5, pool="sample")
    moe = conversion.moe_config(64)
    assert (moe.routing, moe.capacity_factor, moe.pool) == ("expert_choice", 1.5, "sample")

    cfg = dit_config("dsmoe-s-e48-mini", moe={"routing": "expert_choice", "balance": "none"})
    assert (cfg.moe.routing, cfg.moe.num_experts, cfg.moe.gate) == ("expert_choice", 48, "sigmoid")
    torch.manual_seed(0)
    model = DiT(cfg)
    x = torch.randn(2, cfg.in_channels, cfg.image_size, cfg.image_size)
    out = model(x, torch.rand(2), torch.tensor([0, 1]))
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_the_load_callback_buckets_expert_choice_assignments_and_logs_the_dropped_share():
    from types import SimpleNamespace

    from torch import nn

    from src.training.callbacks import ExpertLoadCallback

    class Module(nn.Module):  # the parts of a LightningModule the callback reads
        def __init__(self) -> None:
            super().__init__()
            self.student = nn.Sequential(_layer(capacity_factor=0.5), _layer(seed=1, pool="sample"))
            self.last_sigma_B = torch.tensor([0.1, 0.9])
            self.logged: dict = {}

        def log_dict(self, metrics: dict) -> None:
            self.logged |= metrics

    module = Module().train()
    trainer = SimpleNamespace(accumulate_grad_batches=1, global_step=1, log_every_n_steps=1, max_steps=2)
    callback = ExpertLoadCallback()
    callback.on_train_start(trainer, module)
    module.student(torch.randn(2, 12, D))
    callback.on_train_batch_end(trainer, module, None, None, 0)
    callback.on_train_end(SimpleNamespace(logger=None), module)
    layers = list(module.student)
    # every assignment lands in the bucket of its sample: σ 0.1 → bucket 0, σ 0.9 → bucket 3
    expected_UE = torch.zeros(4, E, dtype=torch.long)
    for layer in layers:
        for e, tokens in enumerate(layer.last_token_idx_EM.tolist()):
            for t in tokens:
                expected_UE[0 if t < 12 else 3, e] += 1
    assert torch.equal(callback.bucket_UE, expected_UE)
    assert torch.equal(callback.load_LE, torch.stack([layer.last_counts for layer in layers]))
    dropped = [layer.last_dropped_share.item() for layer in layers]
    assert module.logged["experts/layer00/dropped_share"] == pytest.approx(dropped[0]) and dropped[0] > 0
    assert module.logged["experts/dropped_share"] == pytest.approx(sum(dropped) / 2)
    assert module.logged["experts/max_over_mean_load"] == 1.0
