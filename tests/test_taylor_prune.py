"""Taylor scores, neuron split/assignment policies, width and depth pruning."""

import copy

import pytest
import torch
from conftest import TINY, D, F, dense_model  # noqa: E402,F401

from src.models.convert import ConversionConfig, convert_flux_to_moe
from src.models.flux_moe import FluxMoETransformer2DModel
from src.models.moe import moe_layers
from src.models.prune import block_importance_mse, blocks_to_remove, depth_prune, width_prune
from src.models.taylor import ASSIGNMENTS, SPLITS, load_scores, save_scores, split_neurons, taylor_scores


def batch(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(2, 16, 16, generator=g),
        encoder_hidden_states=torch.randn(2, 8, 32, generator=g),
        pooled_projections=torch.randn(2, 16, generator=g),
        timestep=torch.rand(2, generator=g),
        img_ids=torch.randint(0, 4, (16, 3), generator=g).float(),
        txt_ids=torch.zeros(8, 3),
    )


def output_loss(model, b) -> torch.Tensor:
    return model(**b).sample.square().mean()


def test_taylor_scores_match_hand_computation():
    model = dense_model()
    for p in model.parameters():
        p.requires_grad_(False)
    batches = [batch(1), batch(2)]
    scores = taylor_scores(model, batches, output_loss)
    assert len(scores) == 2 * 2 + 2 and scores["transformer_blocks.1.ff_context"].shape == (F,)
    # The model is left as it was: no .grad written, requires_grad restored.
    assert all(not p.requires_grad and p.grad is None for p in model.parameters())

    # By hand: backward per batch, |w * grad| per weight, summed over each neuron's row, bias and column.
    ref = copy.deepcopy(model)
    for p in ref.parameters():
        p.requires_grad_(True)
    expected = {"transformer_blocks.0.ff": torch.zeros(F), "single_transformer_blocks.1.mlp": torch.zeros(F)}
    ff, single = ref.transformer_blocks[0].ff, ref.single_transformer_blocks[1]
    for b in batches:
        ref.zero_grad()
        output_loss(ref, b).backward()
        up, down = ff.net[0].proj, ff.net[2]
        expected["transformer_blocks.0.ff"] += (
            (up.weight * up.weight.grad).abs().sum(1)
            + (up.bias * up.bias.grad).abs()
            + (down.weight * down.weight.grad).abs().sum(0)
        )
        w, g = single.proj_out.weight[:, D:], single.proj_out.weight.grad[:, D:]
        expected["single_transformer_blocks.1.mlp"] += (
            (single.proj_mlp.weight * single.proj_mlp.weight.grad).abs().sum(1)
            + (single.proj_mlp.bias * single.proj_mlp.bias.grad).abs()
            + (w * g).abs().sum(0)
        )
    for name, value in expected.items():
        assert value.max() > 0
        torch.testing.assert_close(scores[name], value.detach(), rtol=1e-5, atol=1e-9)


def test_scores_save_load(tmp_path):
    scores = {"transformer_blocks.0.ff": torch.rand(F), "single_transformer_blocks.0.mlp": torch.rand(F)}
    save_scores(tmp_path / "s.safetensors", scores)
    loaded = load_scores(tmp_path / "s.safetensors")
    assert loaded.keys() == scores.keys() and all(torch.equal(loaded[k], scores[k]) for k in scores)


def test_shared_expert_gets_top_scoring_neurons():
    dense = dense_model()
    g = torch.Generator().manual_seed(0)
    scores = {name: torch.rand(F, generator=g) for name in ("transformer_blocks.0.ff", "transformer_blocks.1.ff")}
    moe = convert_flux_to_moe(dense, ConversionConfig(locations=["ff"]), scores=scores)
    for i in range(2):
        top = scores[f"transformer_blocks.{i}.ff"].topk(F // 4).indices.sort().values
        dense_ff, layer = dense.transformer_blocks[i].ff, moe.transformer_blocks[i].ff
        assert torch.equal(layer.shared_up.weight, dense_ff.net[0].proj.weight[top])
        assert torch.equal(layer.shared_up.bias, dense_ff.net[0].proj.bias[top])
        assert torch.equal(layer.shared_down.weight, dense_ff.net[2].weight[:, top])


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("assignment", ASSIGNMENTS)
def test_policies_partition_the_neurons(split, assignment):
    g = torch.Generator().manual_seed(0)
    scores, up = torch.rand(F, generator=g), torch.randn(F, D, generator=g)
    shared, experts = split_neurons(
        F, 32, 12, 8, split, assignment, scores_F=scores, up_weight_FD=up, generator=torch.Generator()
    )
    assert shared.shape == (32,) and experts.shape == (12, 8)
    assert torch.equal(torch.cat([shared, experts.flatten()]).sort().values, torch.arange(F))


def test_assignment_orders():
    scores = torch.arange(F, 0, -1).float()  # neuron 0 is the most important
    _, interleave = split_neurons(F, 32, 12, 8, "taylor", "interleave", scores_F=scores)
    assert interleave[0].tolist() == list(range(32, F, 12))
    _, contiguous = split_neurons(F, 32, 12, 8, "taylor", "contiguous", scores_F=scores)
    assert contiguous[0].tolist() == list(range(32, 40))


def test_kmeans_recovers_clusters():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, D, generator=g) * 5
    truth = torch.arange(48) % 4
    up = centres[truth] + 0.1 * torch.randn(48, D, generator=g)
    _, experts = split_neurons(48, 0, 4, 12, "random", "kmeans", up_weight_FD=up, generator=g)
    assert all(len(set(truth[row].tolist())) == 1 for row in experts)


def test_width_prune_keeps_top_neurons():
    dense = dense_model()
    g = torch.Generator().manual_seed(0)
    names = [f"transformer_blocks.{i}.{loc}" for i in range(2) for loc in ("ff", "ff_context")]
    scores = {n: torch.rand(F, generator=g) for n in names + [f"single_transformer_blocks.{i}.mlp" for i in range(2)]}
    pruned = width_prune(dense, scores, width=48)
    assert isinstance(pruned, FluxMoETransformer2DModel)
    assert pruned.config.ffn_widths == {"ff": 48, "ff_context": 48, "single": 48}
    keep = scores["transformer_blocks.1.ff_context"].topk(48).indices.sort().values
    assert torch.equal(
        pruned.transformer_blocks[1].ff_context.net[0].proj.weight,
        dense.transformer_blocks[1].ff_context.net[0].proj.weight[keep],
    )
    keep = scores["single_transformer_blocks.0.mlp"].topk(48).indices.sort().values
    dense_out = dense.single_transformer_blocks[0].proj_out.weight
    assert torch.equal(
        pruned.single_transformer_blocks[0].proj_out.weight, torch.cat([dense_out[:, :D], dense_out[:, D + keep]], 1)
    )
    x = batch(5)
    with torch.no_grad():
        assert pruned(**x).sample.shape == x["hidden_states"].shape
        # Keeping every neuron is the identity transformation.
        full = width_prune(dense, scores, width=F)
        assert (full(**x).sample - dense(**x).sample).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="width"):
        width_prune(dense, scores, width=F + 1)


def test_depth_prune_keeps_blocks_and_runs():
    dense = dense_model(num_layers=3, num_single_layers=4)
    importance = block_importance_mse(dense, [batch(1), batch(2)])
    assert importance["double"].shape == (3,) and importance["single"].shape == (4,)
    assert (importance["single"] > 0).all()
    remove_single = blocks_to_remove(4, 2, importance["single"])
    kept_single = sorted(set(range(4)) - set(remove_single))
    assert set(kept_single) == set(importance["single"].topk(2).indices.tolist())

    pruned = depth_prune(dense, remove_double=[1], remove_single=remove_single)
    assert pruned.config.num_layers == 2 and pruned.config.kept_double == [0, 2]
    assert pruned.config.kept_single == kept_single
    assert torch.equal(pruned.transformer_blocks[1].attn.to_q.weight, dense.transformer_blocks[2].attn.to_q.weight)
    x = batch(3)
    with torch.no_grad():
        assert pruned(**x).sample.shape == x["hidden_states"].shape
        assert torch.equal(depth_prune(dense)(**x).sample, dense(**x).sample)
    # Pruning a pruned model maps back to teacher indices.
    again = depth_prune(pruned, remove_double=[0])
    assert again.config.kept_double == [2] and again.config.kept_single == kept_single
    with pytest.raises(ValueError, match="remove_double"):
        depth_prune(dense, remove_double=[0, 1, 2, 0])
    with pytest.raises(ValueError, match="remove_single"):
        depth_prune(dense, remove_single=[4])


def test_fixed_removal_pattern():
    removed = blocks_to_remove(19, 9)
    kept = sorted(set(range(19)) - set(removed))
    assert len(kept) == 9 and kept[0] == 0 and kept[-1] == 18
    assert blocks_to_remove(4, 4) == [] and blocks_to_remove(3, 0) == [0, 1, 2]
    with pytest.raises(ValueError, match="keep"):
        blocks_to_remove(4, 5)


def test_converting_a_pruned_model_keeps_its_record():
    dense = dense_model()
    pruned = depth_prune(dense, remove_single=[0])
    moe = convert_flux_to_moe(pruned, ConversionConfig(split="random"))
    assert moe.config.kept_single == [1] and len(moe.single_transformer_blocks) == 1
    for layer in moe_layers(moe):
        layer.top_k, layer.constant_gates = layer.num_experts, True
    x = batch(4)
    with torch.no_grad():
        assert (moe(**x).sample - pruned(**x).sample).abs().max() <= 1e-5


def test_pruned_models_round_trip(tmp_path):
    dense = dense_model()
    scores = {name: torch.rand(F) for name in ("transformer_blocks.0.ff", "transformer_blocks.1.ff")}
    pruned = depth_prune(width_prune(dense, scores, width=40, locations=["ff"]), remove_double=[0])
    assert pruned.config.ffn_widths == {"ff": 40} and pruned.config.kept_double == [1]
    pruned.save_pretrained(tmp_path)
    loaded = FluxMoETransformer2DModel.from_pretrained(tmp_path).eval()
    assert loaded.transformer_blocks[0].ff.net[2].in_features == 40 and loaded.config.kept_double == [1]
    x = batch(6)
    with torch.no_grad():
        assert torch.equal(loaded(**x).sample, pruned(**x).sample)
