"""Dense LoRAs on converted students: converting (teacher + LoRA) equals mapping the LoRA onto the converted teacher."""

import copy
import json

import pytest
import torch
from conftest import D, F, dense_model
from safetensors.torch import save_file
from test_convert import all_experts_on, inputs, run

from src.cli import main
from src.models.convert import ConversionConfig, convert_flux_to_moe
from src.models.flux_moe import FluxMoETransformer2DModel
from src.models.lora import fuse_lora, lora_factors, read_lora
from src.models.mob import MoBConfig
from src.models.moe import moe_layers
from src.models.prune import depth_prune
from src.models.student import with_mob

# Every kind of target: the converted FFNs (up and down of ff / ff_context, a single block's proj_mlp and fused
# proj_out) and modules the conversion copies (attention, modulation, the model's proj_out).
TARGETS = [
    *(f"transformer_blocks.{i}.{loc}.net.{p}" for i in (0, 1) for loc in ("ff", "ff_context") for p in ("0.proj", "2")),
    *(f"single_transformer_blocks.{i}.{m}" for i in (0, 1) for m in ("proj_mlp", "proj_out")),
    "transformer_blocks.0.attn.to_q",
    "transformer_blocks.1.attn.to_add_out",
    "single_transformer_blocks.1.attn.to_k",
    "single_transformer_blocks.0.norm.linear",
    "proj_out",
]


def random_lora(model, rank: int = 4, seed: int = 0, targets=TARGETS) -> dict[str, torch.Tensor]:
    """A diffusers-format LoRA state dict (transformer.<module>.lora_A/B.weight) for `model`'s Linears."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name in targets:
        linear = model.get_submodule(name)
        state[f"transformer.{name}.lora_A.weight"] = 0.3 * torch.randn(rank, linear.in_features, generator=g)
        state[f"transformer.{name}.lora_B.weight"] = 0.3 * torch.randn(linear.out_features, rank, generator=g)
    return state


def assert_same_model(a, b, tol: float = 1e-5) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        assert (sa[key].double() - sb[key].double()).abs().max() <= tol, key


def fused_dense(dense, lora):
    model = copy.deepcopy(dense)
    fuse_lora(model, lora_factors(lora))
    return model


@pytest.mark.parametrize("split", ["random", "taylor"])
def test_mapping_equals_converting_the_lora_fused_teacher(split, one_thread):
    dense = dense_model()
    lora = random_lora(dense)
    scores = {k: torch.rand(F, generator=torch.Generator().manual_seed(i)) for i, k in enumerate(_ffn_names())}
    cfg = ConversionConfig(split=split, assignment="random", router_init="normal", seed=3)
    expected = convert_flux_to_moe(fused_dense(dense, lora), cfg, scores if split == "taylor" else None)
    student = convert_flux_to_moe(dense, cfg, scores if split == "taylor" else None)
    counts = fuse_lora(student, lora_factors(lora))
    assert counts == {"modules": len(TARGETS), "moe_layers": 12, "skipped_removed_blocks": 0}
    assert_same_model(student, expected)

    x = inputs()
    lora_dense = fused_dense(dense, lora)
    assert (run(lora_dense, **x) - run(dense, **x)).abs().max() > 0.1  # the LoRA changes the function
    all_experts_on(student)
    assert (run(student, **x) - run(lora_dense, **x)).abs().max() <= 1e-5


def test_fused_dense_weight_is_w_plus_scaled_b_a():
    dense = dense_model()
    lora = random_lora(dense, targets=["single_transformer_blocks.1.proj_out"])
    lora["transformer.single_transformer_blocks.1.proj_out.alpha"] = torch.tensor(8.0)  # rank 4: scale 2
    fused = fused_dense(dense, lora)
    a, b = (lora[f"transformer.single_transformer_blocks.1.proj_out.lora_{x}.weight"] for x in "AB")
    want = dense.single_transformer_blocks[1].proj_out.weight + 2.0 * b @ a
    assert torch.allclose(fused.single_transformer_blocks[1].proj_out.weight, want, atol=1e-6)


def test_saved_student_keeps_its_split(tmp_path, one_thread):
    """The split travels with the student (a trained one too): k-means + centroid routers, saved and reloaded."""
    dense = dense_model()
    lora = random_lora(dense, seed=1)
    student = convert_flux_to_moe(dense, ConversionConfig(split="random", assignment="kmeans"))
    student.save_pretrained(tmp_path / "student")
    half = FluxMoETransformer2DModel.from_pretrained(tmp_path / "student", torch_dtype=torch.bfloat16)
    assert all(layer.dense_neurons.dtype == torch.long for layer in moe_layers(half))
    loaded = FluxMoETransformer2DModel.from_pretrained(tmp_path / "student").eval()
    fuse_lora(loaded, lora_factors(lora))
    all_experts_on(loaded)
    x = inputs()
    assert (run(loaded, **x) - run(fused_dense(dense, lora), **x)).abs().max() <= 1e-5


def test_depth_pruned_and_mob_students(one_thread):
    dense = dense_model(num_single_layers=4)
    targets = [*TARGETS, "single_transformer_blocks.3.proj_mlp", "single_transformer_blocks.2.proj_out"]
    lora = random_lora(dense, seed=2, targets=targets)
    cfg = ConversionConfig(split="random", router_init="normal")
    expected = convert_flux_to_moe(depth_prune(fused_dense(dense, lora), remove_single=[1]), cfg)
    student = convert_flux_to_moe(depth_prune(dense, remove_single=[1]), cfg)
    counts = fuse_lora(student, lora_factors(lora))
    assert counts["skipped_removed_blocks"] == 3  # single block 1's proj_mlp, proj_out and attn.to_k
    assert_same_model(student, expected)

    mob = MoBConfig(stream="single", group_size=3, active=2)
    grouped = with_mob(convert_flux_to_moe(depth_prune(dense, remove_single=[1]), cfg), mob)
    fuse_lora(grouped, lora_factors(lora))
    assert_same_model(grouped, with_mob(expected, mob))


def test_formats_alpha_metadata_and_kohya(tmp_path):
    dense = dense_model()
    name = "transformer_blocks.0.ff.net.0.proj"
    lora = random_lora(dense, targets=[name])
    assert lora_factors(lora)[name].scale == 1.0
    assert lora_factors(lora | {f"transformer.{name}.alpha": torch.tensor(2.0)})[name].scale == 0.5
    meta = {"transformer.r": 4, "transformer.lora_alpha": 16, "transformer.alpha_pattern": {"ff.net.0.proj": 2}}
    save_file(lora, tmp_path / "peft.safetensors", metadata={"lora_adapter_metadata": json.dumps(meta)})
    assert read_lora(tmp_path / "peft.safetensors")[name].scale == 0.5
    meta["transformer.use_rslora"] = True
    meta["transformer.alpha_pattern"] = {}
    save_file(lora, tmp_path / "rs.safetensors", metadata={"lora_adapter_metadata": json.dumps(meta)})
    assert read_lora(tmp_path / "rs.safetensors")[name].scale == 8.0

    # kohya / BFL naming: diffusers renames it and folds alpha / rank into the factors.
    g = torch.Generator().manual_seed(0)
    down, up = torch.randn(4, D, generator=g), torch.randn(F, 4, generator=g)
    down2, up2 = torch.randn(4, D + F, generator=g), torch.randn(D, 4, generator=g)
    kohya = {
        "lora_unet_double_blocks_1_txt_mlp_0.lora_down.weight": down,
        "lora_unet_double_blocks_1_txt_mlp_0.lora_up.weight": up,
        "lora_unet_double_blocks_1_txt_mlp_0.alpha": torch.tensor(8.0),
        "lora_unet_single_blocks_0_linear2.lora_down.weight": down2,
        "lora_unet_single_blocks_0_linear2.lora_up.weight": up2,
    }
    factors = lora_factors(kohya)
    assert set(factors) == {"transformer_blocks.1.ff_context.net.0.proj", "single_transformer_blocks.0.proj_out"}
    assert torch.allclose(factors["transformer_blocks.1.ff_context.net.0.proj"].delta(), 2.0 * up @ down, atol=1e-4)
    assert torch.allclose(factors["single_transformer_blocks.0.proj_out"].delta(), up2 @ down2, atol=1e-4)


def _ffn_names():
    return [f"transformer_blocks.{i}.{loc}" for i in (0, 1) for loc in ("ff", "ff_context")] + [
        f"single_transformer_blocks.{i}.mlp" for i in (0, 1)
    ]


# --- the command line ----------------------------------------------------------------------------------------------
@pytest.fixture
def student_dir(tmp_path):
    student = convert_flux_to_moe(dense_model(), ConversionConfig(split="random", router_init="normal"))
    student.save_pretrained(tmp_path / "student")
    return tmp_path / "student"


def one_error_line(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


def test_cli_writes_the_student_with_the_lora(student_dir, tmp_path, capsys, one_thread):
    dense = dense_model()
    lora = random_lora(dense)
    save_file(lora, tmp_path / "lora.safetensors")
    out = tmp_path / "with_lora"
    main(["lora", "--student", str(student_dir), "--lora", str(tmp_path / "lora.safetensors"), "--out", str(out)])
    assert f"{len(TARGETS)} modules" in capsys.readouterr().out
    expected = convert_flux_to_moe(fused_dense(dense, lora), ConversionConfig(split="random", router_init="normal"))
    assert_same_model(FluxMoETransformer2DModel.from_pretrained(out), expected)

    args = ["lora", "--student", str(student_dir), "--lora", str(tmp_path / "lora.safetensors"), "--out", str(out)]
    assert "exists" in one_error_line(capsys, args)


def pair(module: str, a_shape: tuple, b_shape: tuple) -> dict[str, torch.Tensor]:
    return {
        f"transformer.{module}.lora_A.weight": torch.zeros(a_shape),
        f"transformer.{module}.lora_B.weight": torch.zeros(b_shape),
    }


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.zeros(4, 8)}, "not a FLUX transformer LoRA"),
        (pair("transformer_blocks.9.attn.to_q", (4, D), (D, 4)), "has 2 transformer_blocks"),
        (pair("transformer_blocks.0.ff.net.2", (4, 4 * F), (D, 4)), "another model size"),  # a wider FLUX
        (pair("transformer_blocks.0.attn.to_q", (4, 3 * D), (D, 4)), "another model size"),
        (pair("proj_out", (4, D), (16, 8)), "one rank"),
        (pair("transformer_blocks.0.no_such", (4, D), (D, 4)), "no module"),
        ({"transformer.proj_out.lora_A.weight": torch.zeros(4, D)}, "no lora_B"),
        (pair("proj_out", (4, D), (16, 4)) | {"transformer.proj_out.lora_magnitude_vector": torch.zeros(16)}, "DoRA"),
        ({"transformer.transformer_blocks.0.attn.norm_q.weight": torch.zeros(8)}, "not a LoRA factor"),
        ({"text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_A.weight": torch.zeros(4, 8)}, "text-encoder"),
    ],
)
def test_bad_lora_is_one_error_line_and_writes_nothing(student_dir, tmp_path, capsys, bad, match):
    save_file(bad, tmp_path / "bad.safetensors")
    out = tmp_path / "out"
    args = ["lora", "--student", str(student_dir), "--lora", str(tmp_path / "bad.safetensors"), "--out", str(out)]
    err = one_error_line(capsys, args)
    assert match in err and not out.exists()


def test_student_without_a_neuron_record_is_refused_for_ffn_keys(tmp_path, capsys):
    student = convert_flux_to_moe(dense_model(), ConversionConfig(split="random", locations=["ff"]))
    config = dict(student.config)
    config["moe"] = {**config["moe"], "record_neurons": False}  # as converted before the record existed
    old = FluxMoETransformer2DModel.from_config(config)
    old.load_state_dict({k: v for k, v in student.state_dict().items() if "dense_neurons" not in k})
    old.save_pretrained(tmp_path / "old")
    lora = random_lora(dense_model(), targets=["transformer_blocks.0.ff.net.2", "transformer_blocks.0.attn.to_q"])
    save_file(lora, tmp_path / "lora.safetensors")
    args = ["lora", "--student", str(tmp_path / "old"), "--lora", str(tmp_path / "lora.safetensors"), "--out"]
    assert "re-convert" in one_error_line(capsys, [*args, str(tmp_path / "out")])
    attention_only = {k: v for k, v in lora.items() if "attn" in k}
    save_file(attention_only, tmp_path / "attn.safetensors")
    main([*args[:4], str(tmp_path / "attn.safetensors"), "--out", str(tmp_path / "out")])  # attention maps anyway
    assert (tmp_path / "out" / "config.json").is_file()


def test_python_path_into_flux_pipeline(tmp_path, one_thread):
    """README's path: load the student, read and fuse the LoRA, hand it to FluxPipeline."""
    from diffusers import FluxTransformer2DModel
    from test_flux_pipeline import generate

    from src.models.tiny_pipeline import build_tiny_pipeline, tiny_transformer_config

    torch.manual_seed(0)
    dense = FluxTransformer2DModel(**tiny_transformer_config(guidance_embeds=True)).eval()
    save_file(random_lora(dense, rank=2), tmp_path / "lora.safetensors")
    convert_flux_to_moe(dense, ConversionConfig(split="random")).save_pretrained(tmp_path / "student")

    student = FluxMoETransformer2DModel.from_pretrained(tmp_path / "student")
    fuse_lora(student, read_lora(tmp_path / "lora.safetensors"))
    images = generate(build_tiny_pipeline(student, seed=1))
    assert images.shape == (2, 32, 48, 3)
    all_experts_on(student)
    fuse_lora(dense, read_lora(tmp_path / "lora.safetensors"))
    dense_images = generate(build_tiny_pipeline(dense, seed=1))
    assert abs(generate(build_tiny_pipeline(student, seed=1)) - dense_images).max() <= 1e-4
