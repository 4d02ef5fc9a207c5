"""The one student builder: meta-device construction, host memory near the student's own size."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, dense_model

from src.data.worlds import model_world
from src.models.convert import ConversionConfig
from src.models.flux_moe import dense_ffns
from src.models.loading import load_transformer
from src.models.mob import MoBConfig, mob_groups
from src.models.moe import moe_layers
from src.models.student import StudentRecipe, build_student, dense_ffn_width, with_mob
from src.training.experiment import PruneSpec

# A mid-size FLUX (hidden 768 = 6 heads of 128, FFN 3072, 2 double + 4 single blocks, guidance embeds): ≈ 82 M
# parameters, large enough that a second copy of the student would show in the peak RSS.
MEASURE = """
import json, sys, torch
torch.set_num_threads(1)
from diffusers import FluxTransformer2DModel
from src.models.convert import ConversionConfig
from src.models.mob import MoBConfig
from src.models.student import StudentRecipe, build_student, tensor_bytes
cfg = dict(in_channels=64, num_layers=2, num_single_layers=4, attention_head_dim=128, num_attention_heads=6,
           joint_attention_dim=1024, pooled_projection_dim=256, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
teacher = FluxTransformer2DModel(**cfg).to(getattr(torch, sys.argv[1])).eval()
def status(key):
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(key))
before = status("VmRSS:")
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
recipe = StudentRecipe(ConversionConfig(split="random", assignment="random"),
                       mob=MoBConfig(stream="single", group_size=2, active=1))
student = build_student(teacher, recipe)
print(json.dumps({"student": tensor_bytes(student), "peak": status("VmHWM:") - before}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_converting_and_mob_wrapping_a_mid_size_flux_peaks_near_the_student_size(dtype):
    out = subprocess.run(
        [sys.executable, "-c", MEASURE, dtype],
        cwd=ROOT,
        env={"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
    )
    measured = json.loads(out.stdout.strip().splitlines()[-1])
    # measured on this machine: 1.09x alone (fp32 and bf16), once 1.36x inside a full-suite run (the allocator's
    # state differs); a from_config MoB student alone would add 1x, so 1.6x still catches a second copy
    assert measured["peak"] <= 1.6 * measured["student"], measured


def test_meta_teacher_gives_meta_student_with_the_real_structure():
    recipe = StudentRecipe(ConversionConfig(split="contiguous"), mob=MoBConfig(stream="single", group_size=2))
    real = build_student(dense_model(), recipe, scores=_scores(dense_model()))
    with torch.device("meta"):
        teacher = type(dense_model())(**dict(dense_model().config))
    meta = build_student(teacher, recipe, scores=_scores(teacher))
    assert all(p.is_meta for p in meta.parameters())
    assert {k: v.shape for k, v in meta.state_dict().items()} == {k: v.shape for k, v in real.state_dict().items()}
    assert len(mob_groups(meta)) == 1 and len(moe_layers(meta)) == len(moe_layers(real))


def test_with_mob_takes_the_student_tensors_without_copying():
    student = build_student(dense_model(), StudentRecipe(ConversionConfig(split="random")))
    pointers = {k: v.data_ptr() for k, v in student.state_dict().items()}
    grouped = with_mob(student, MoBConfig(stream="single", group_size=2))
    assert all(grouped.state_dict()[k].data_ptr() == p for k, p in pointers.items())


def test_dense_ffn_width_is_read_off_the_model():
    assert dense_ffn_width(dense_model()) == 128


def _scores(model):
    from src.models.flux_moe import dense_ffns

    return {name: torch.arange(ffn.up.out_features, 0, -1.0) for name, ffn in dense_ffns(model).items()}


@pytest.mark.parametrize("recipe", ["moe", "dense", "width"])
def test_a_glyph_teachers_student_keeps_its_world_through_save_and_load(tmp_path, recipe):
    teacher = dense_model()
    teacher.register_to_config(world="glyphs")
    recipes = {
        "moe": StudentRecipe(conversion=ConversionConfig(layout="1S4E2A", split="random", assignment="random")),
        "dense": StudentRecipe(),
        "width": StudentRecipe(prune=PruneSpec(kind="width", ffn_fraction=0.5)),
    }
    scores = {name: torch.arange(float(ffn.up.out_features)) for name, ffn in dense_ffns(teacher).items()}
    student = build_student(teacher, recipes[recipe], scores=scores)
    assert model_world(student) == "glyphs"
    student.save_pretrained(tmp_path / "student")
    assert model_world(load_transformer(tmp_path / "student")) == "glyphs"
    assert model_world(dense_model()) == "shapes"  # no key: the default world
