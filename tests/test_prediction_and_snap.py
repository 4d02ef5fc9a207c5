"""x-prediction teachers (JiT-style), the sampling shift that travels with the weights, the token-aligned and
cell-layout shapes worlds, and the teacher's learning-rate schedule."""

import numpy as np
import pytest
import torch
from conftest import dense_model  # noqa: E402

from evaluation.geneval import relative_position
from evaluation.shapes_detector import evaluate_shapes_image
from src.data.shapes import ShapesWorld
from src.models.convert import ConversionConfig, convert_flux_to_moe
from src.models.flow import image_ids, prediction_type, sampling_shift, text_ids, to_velocity
from src.models.loading import load_transformer
from src.models.pipeline import SamplingConfig, ShapesPipeline
from src.models.text_encoder import HashTextEncoder, TextEncoderConfig
from src.training.conditioning import FlowInputs, velocity
from src.training.schedules import lr_factor


def test_sample_prediction_converts_to_the_velocity():
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 5, 4, generator=g), torch.randn(3, 5, 4, generator=g)
    sigma = torch.tensor([0.2, 0.5, 0.9])
    x_t = (1 - sigma[:, None, None]) * x0 + sigma[:, None, None] * noise
    # A perfect x-predictor's output is x0; its implied velocity is exactly ε − x0.
    torch.testing.assert_close(to_velocity(x0, x_t, sigma, "sample"), noise - x0)
    assert to_velocity(x0, x_t, sigma, "velocity") is x0
    # Near σ = 0 the division is clamped, so the velocity stays finite.
    assert torch.isfinite(to_velocity(x0, x_t, torch.zeros(3), "sample")).all()


def test_prediction_type_survives_save_load_and_conversion(tmp_path):
    dense = dense_model()
    assert prediction_type(dense) == "velocity"
    dense.register_to_config(prediction_type="sample")
    dense.save_pretrained(tmp_path / "teacher")
    loaded = load_transformer(tmp_path / "teacher")
    assert prediction_type(loaded) == "sample"
    student = convert_flux_to_moe(loaded, ConversionConfig(split="random", router_init="normal"))
    assert prediction_type(student) == "sample"
    student.save_pretrained(tmp_path / "student")
    assert prediction_type(load_transformer(tmp_path / "student")) == "sample"


def test_both_transformer_calls_convert_a_sample_predictor():
    model = dense_model(in_channels=12).eval()
    cfg = model.config
    encoder = HashTextEncoder(TextEncoderConfig(dim=cfg.joint_attention_dim, pooled_dim=cfg.pooled_projection_dim))
    pipe = ShapesPipeline(model, encoder, image_size=16, patch_size=2, sampling=SamplingConfig(steps=2))
    x_BLD = torch.randn(2, pipe.tokens_per_side**2, cfg.in_channels)
    sigma = torch.tensor([0.3, 0.7])
    tokens, pooled = pipe.encode_prompts(["a photo of a circle", "a photo of two squares"])
    with torch.no_grad():
        raw = pipe.velocity(x_BLD, sigma, tokens, pooled)
        model.register_to_config(prediction_type="sample")
        converted = pipe.velocity(x_BLD, sigma, tokens, pooled)
        n = pipe.tokens_per_side
        inputs = FlowInputs(x_BLD, tokens, pooled, image_ids(n, n), text_ids(tokens.shape[1]))
        via_conditioning = velocity(model, x_BLD, sigma, inputs, guidance=3.5)
    torch.testing.assert_close(converted, (x_BLD - raw) / sigma[:, None, None])
    torch.testing.assert_close(via_conditioning, converted)


def test_unknown_prediction_type_is_refused():
    model = dense_model()
    model.register_to_config(prediction_type="epsilon")
    with pytest.raises(ValueError, match="prediction_type='epsilon'"):
        prediction_type(model)


def renders_of_heldout_prompts(world: ShapesWorld, rng_seed: int, draw_seed: int):
    """(metadata, objects) of 20 held-out prompts per task; every render must place position tasks' objects in
    their relation and be judged correct by the evaluator."""
    generator = np.random.Generator(np.random.PCG64(rng_seed))
    for md in world.heldout_metadata({t: 20 for t in world._pools["heldout"]}, seed=draw_seed):
        image, objects = world.render(md, generator)
        if md["tag"] == "position":
            reference, subject = objects
            assert relative_position(list(subject.box), list(reference.box)) == {md["include"][1]["position"][0]}
        assert evaluate_shapes_image(image, md)[0], md["prompt"]
        yield md, objects


def test_snapped_world_puts_objects_on_the_grid_and_stays_valid():
    for _, objects in renders_of_heldout_prompts(ShapesWorld(snap=4), rng_seed=5, draw_seed=2):
        for o in objects:
            assert all(c % 4 == 0 for c in o.box), o


@pytest.mark.parametrize("snap", [0, 3, 8])
def test_bad_snap_is_refused(snap):
    with pytest.raises(ValueError, match="snap="):
        ShapesWorld(snap=snap)


def test_cell_world_puts_one_object_per_cell_and_stays_valid():
    for _, objects in renders_of_heldout_prompts(ShapesWorld(snap=8, cells=True), rng_seed=7, draw_seed=3):
        cells = set()
        for o in objects:
            x1, y1, x2, y2 = o.box
            assert (x2 - x1, y2 - y1) == (6, 6) and x1 % 8 == 1 and y1 % 8 == 1, o
            cells.add((x1 // 8, y1 // 8))
        assert len(cells) == len(objects)


@pytest.mark.parametrize("snap", [4, 5, 16])
def test_bad_cell_size_is_refused(snap):
    with pytest.raises(ValueError, match="snap="):
        ShapesWorld(snap=snap, cells=True)


def test_sampling_shift_travels_with_the_weights_and_an_explicit_one_wins(tmp_path):
    dense = dense_model()
    assert sampling_shift(dense) is None and SamplingConfig().shift_for(dense) == 1.0
    dense.register_to_config(sampling_shift=3.0)
    dense.save_pretrained(tmp_path / "teacher")
    loaded = load_transformer(tmp_path / "teacher")
    student = convert_flux_to_moe(loaded, ConversionConfig(split="random", router_init="normal"))
    student.save_pretrained(tmp_path / "student")
    for model in (loaded, student, load_transformer(tmp_path / "student")):
        assert SamplingConfig().shift_for(model) == 3.0
        assert SamplingConfig(shift=1.5).shift_for(model) == 1.5
    with pytest.raises(ValueError, match="sampling.shift=0"):
        SamplingConfig(shift=0)


def test_cosine_schedule_warms_up_then_anneals_to_a_tenth():
    assert lr_factor(0, 10, "cosine", 110) == pytest.approx(0.1)
    assert lr_factor(9, 10, "cosine", 110) == 1.0 and lr_factor(10, 10, "cosine", 110) == 1.0
    assert lr_factor(60, 10, "cosine", 110) == pytest.approx(0.55)
    assert lr_factor(110, 10, "cosine", 110) == pytest.approx(0.1) == lr_factor(500, 10, "cosine", 110)
    assert lr_factor(60, 10, "none", 110) == 1.0
