"""FID's clear errors when its Inception weights or package are missing; class accuracy of the DiT samples."""

import importlib.util

import numpy as np
import pytest
import torch
from conftest import ROOT

from evaluation.fid import FID_WEIGHTS_URL, check_fid_available, class_accuracy, class_correct, fid_input, fid_metric
from src.cli import main
from src.data.classes import CLASS_METADATA, CLASSES, ClassShapesDataModule
from src.data.shapes import BACKGROUND, ShapeObject, render_scene
from src.errors import UserError

HAS_TORCH_FIDELITY = importlib.util.find_spec("torch_fidelity") is not None


def test_missing_weights_name_the_path_and_where_to_get_them(tmp_path):
    path = tmp_path / "nowhere" / "inception.pth"
    with pytest.raises(UserError) as err:
        check_fid_available(path)
    assert str(path) in str(err.value) and FID_WEIGHTS_URL in str(err.value) and "null" in str(err.value)


@pytest.mark.skipif(HAS_TORCH_FIDELITY, reason="torch-fidelity is installed")
def test_missing_torch_fidelity_is_one_clear_error(tmp_path):
    weights = tmp_path / "weights.pth"
    weights.write_bytes(b"")
    with pytest.raises(UserError, match="pip install torch-fidelity"):
        check_fid_available(weights)


def test_fit_with_missing_weights_fails_before_training(workdir, capsys):
    config = ROOT / "experiments" / "dsmoe_s_e48.yaml"
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", str(config), "--model.init_args.fid_weights", "weights/inception.pth"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "Traceback" not in err
    (line,) = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert "weights/inception.pth" in line
    assert not (workdir / "runs").exists()


def test_fid_input_is_channels_first_uint8():
    images = np.zeros((2, 32, 32, 3), dtype=np.uint8)
    images[1, 3, 4] = (1, 2, 3)
    out = fid_input(images)
    assert out.shape == (2, 3, 32, 32) and out.dtype == torch.uint8
    assert out[1, :, 3, 4].tolist() == [1, 2, 3]
    with pytest.raises(ValueError, match="uint8"):
        fid_input(images.astype(np.float32))


def test_reference_renders_are_recognised_as_their_class():
    data = ClassShapesDataModule()
    images = data.reference_images(per_class=2)
    labels = [c for c in range(len(CLASSES)) for _ in range(2)]
    scores = class_accuracy(images, labels)
    assert scores["accuracy"] == 1.0 and len(scores) == 1 + 24
    shifted = [(c + 1) % 24 for c in labels]  # every image judged against another class
    assert class_accuracy(images, shifted)["accuracy"] == 0.0


def test_class_accuracy_needs_exactly_one_object_of_the_class():
    label = CLASSES.index(("circle", "red"))
    one = render_scene([ShapeObject("circle", "red", (8, 8, 20, 20))], 32)
    wrong_colour = render_scene([ShapeObject("circle", "blue", (8, 8, 20, 20))], 32)
    two = render_scene(
        [ShapeObject("circle", "red", (2, 2, 12, 12)), ShapeObject("square", "green", (18, 18, 28, 28))], 32
    )
    blank = np.full((32, 32, 3), BACKGROUND, dtype=np.uint8)
    assert class_correct(one, label)
    assert not class_correct(wrong_colour, label) and not class_correct(two, label) and not class_correct(blank, label)


def test_training_stream_is_deterministic_and_covers_the_classes():
    a = ClassShapesDataModule(batch_size=48).train_stream.batch(3)
    b = ClassShapesDataModule(batch_size=48).train_stream.batch(3)
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    assert a["image"].shape == (48, 3, 32, 32) and -1 <= a["image"].min() and a["image"].max() <= 1
    assert len(set(a["label"].tolist())) > 12
    for image, label in zip(a["image"][:8], a["label"][:8]):
        uint8 = ((image.permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()
        assert class_correct(uint8, int(label)), CLASS_METADATA[int(label)]["prompt"]


@pytest.mark.skipif(not HAS_TORCH_FIDELITY, reason="torch-fidelity is not installed")
def test_fid_end_to_end_with_a_local_randomly_initialised_inception(tmp_path, monkeypatch):
    """No weights can be downloaded here: a random Inception-v3 of the real architecture, saved to a local file,
    drives the same FrechetInceptionDistance path (identical sets score ~0, different ones clearly more)."""
    import torch_fidelity.feature_extractor_inceptionv3 as tf_inception

    torch.manual_seed(0)
    # Build the architecture once with its own random init (the weights loader returns the model's own state).
    monkeypatch.setattr(tf_inception.torch.nn.Module, "load_state_dict", lambda self, state, *a, **k: None)
    monkeypatch.setattr(tf_inception, "load_state_dict_from_url", lambda *a, **k: {})
    random_net = tf_inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    monkeypatch.undo()
    weights = tmp_path / "inception.pth"
    torch.save(random_net.state_dict(), weights)
    check_fid_available(weights)

    from src.data.shapes import ShapesWorld, task_compositions

    world = ShapesWorld(snap=4)
    prompts = task_compositions("colors")
    rng = np.random.default_rng(0)
    real = np.stack([world.render(prompts[i % len(prompts)], rng)[0] for i in range(16)])
    noise = rng.integers(0, 256, size=real.shape, dtype=np.uint8)
    metric = fid_metric(weights, feature=64)
    metric.update(fid_input(real), real=True)
    metric.update(fid_input(real), real=False)
    same = float(metric.compute())
    metric.reset()  # keeps the real statistics
    metric.update(fid_input(noise), real=False)
    different = float(metric.compute())
    # Random features are small in scale: compare the two against each other.
    assert abs(same) < 1e-6 and different > 1e-2 and different > 1e4 * abs(same)
