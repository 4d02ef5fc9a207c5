"""Provenance of GenEval numbers: the record's fields, compare's protocol check, the model card."""

import hashlib
import os

import mlflow
import pytest
from conftest import TINY_FLUX

from evaluation import provenance
from evaluation.compare import compare
from evaluation.generate import GENEVAL_METADATA, image_seed
from src.cli import main
from src.errors import UserError


def record(**sampler):
    return provenance.geneval_provenance(
        prompts=provenance.prompts_record("geneval", [{}] * 553),
        detector="facebook/mask2former-swin-small-coco-instance",
        detector_weights_sha256="d" * 64,
        colour_model="ViT-L-14-quickgelu (openai)",
        colour_weights_sha256="c" * 64,
        rules=provenance.rules_record(),
        images_per_prompt=4,
        sampler={"steps": 28, "guidance": 3.5, "shift": "dynamic", **sampler},
        sources={"prompts": "geneval", "seed": 0},
        device="cpu",
    )


def test_record_holds_every_field_of_the_protocol_and_environment():
    prov = record()
    protocol = prov["protocol"]
    assert protocol["prompts_sha256"] == hashlib.sha256(GENEVAL_METADATA.read_bytes()).hexdigest()
    assert protocol["prompts_count"] == 553 and protocol["images_per_prompt"] == 4
    assert protocol["detector_weights_sha256"] == "d" * 64 and protocol["colour_weights_sha256"] == "c" * 64
    assert (protocol["threshold"], protocol["counting_threshold"], protocol["max_objects"]) == (0.3, 0.9, 16)
    assert (protocol["nms_iou"], protocol["position_threshold"]) == (1.0, 0.1)
    assert protocol["numerics"] == provenance.NUMERICS
    assert (protocol["sampler.steps"], protocol["sampler.guidance"], protocol["sampler.shift"]) == (28, 3.5, "dynamic")
    assert protocol["seed_rule"] == provenance.SEED_RULE
    assert prov["sources"]["detector"].startswith("facebook/") and prov["sources"]["colour_model"].startswith("ViT")
    assert {"torch", "transformers", "open_clip_torch", "diffusers", "numpy", "pillow"} <= set(prov["environment"])
    assert prov["environment"]["torch"] and prov["environment"]["device"] == "cpu"
    assert prov["protocol_id"] == provenance.protocol_id(protocol) and len(prov["protocol_id"]) == 12
    # The environment and the sources do not change the protocol.
    assert record()["protocol_id"] == prov["protocol_id"] != record(steps=50)["protocol_id"]
    assert provenance.protocol_differences(prov["protocol"], record(steps=50)["protocol"]) == [
        "sampler.steps: 28 vs 50"
    ]


def test_seed_rule_describes_image_seed():
    seed, i, k = 7, 12, 3
    assert image_seed(seed, i, k) == (seed * 1000003 + i) * 1009 + k
    assert "(seed * 1000003 + i) * 1009 + k" in provenance.SEED_RULE


def test_hashes_of_prompt_files_weights_and_sources(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a cat", "tag": "custom"}\n')
    got = provenance.prompts_record(str(prompts), [{"prompt": "a cat", "tag": "custom"}])
    assert got == {"prompts_sha256": hashlib.sha256(prompts.read_bytes()).hexdigest(), "prompts_count": 1}
    generated = provenance.prompts_record("shapes-heldout", [{"prompt": "a"}, {"prompt": "b"}])
    assert generated["prompts_sha256"].startswith("metadata:") and generated["prompts_count"] == 2

    folder = tmp_path / "weights"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"abc")
    assert provenance.weights_sha256(folder) == hashlib.sha256(b"abc").hexdigest()  # one file: its own sha256
    (folder / "extra.bin").write_bytes(b"xyz")
    two = provenance.weights_sha256(folder)
    assert two != provenance.weights_sha256(folder / "model.safetensors") and len(two) == 64
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no weights file"):
        provenance.weights_sha256(tmp_path / "empty")

    from evaluation import shapes_detector

    assert provenance.source_sha256(shapes_detector).startswith("source:")


def log_eval(name, metrics, prov=None):
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    with mlflow.start_run(run_name=name):
        mlflow.log_metrics(metrics)
        if prov is not None:
            mlflow.set_tags(provenance.mlflow_tags(prov))


def test_compare_refuses_mixed_protocols_in_one_line_unless_allowed(workdir, capsys):
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    mlflow.set_experiment("protocols")
    log_eval("flux-dev", {"params/activated": 12e9, "geneval/overall": 0.66}, record())
    log_eval("moe-l", {"params/activated": 5e9, "geneval/overall": 0.57}, record())
    rows = compare("protocols", out=str(workdir / "same"), log_mlflow=False)
    assert [r["protocol"] for r in rows] == [record()["protocol_id"]] * 2

    log_eval("moe-50-steps", {"params/activated": 5e9, "geneval/overall": 0.6}, record(steps=50))
    with pytest.raises(SystemExit) as exc:
        main(["compare", "--experiment", "protocols", "--out", str(workdir / "mixed"), "--log_mlflow", "false"])
    assert exc.value.code == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]  # (above it: MLflow's own log of the setup)
    assert line.startswith("error: geneval/* of runs 'flux-dev' and 'moe-50-steps' come from different GenEval")
    assert "sampler.steps: 28 vs 50" in line and "--allow_mixed_protocols" in line
    rows = compare("protocols", out=str(workdir / "mixed"), log_mlflow=False, allow_mixed_protocols=True)
    assert len({r["protocol"] for r in rows}) == 2


def test_runs_without_provenance_are_unknown_and_only_warned_about(workdir, capsys):
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    mlflow.set_experiment("legacy")
    log_eval("old", {"params/activated": 1e6, "geneval_shapes/overall": 0.5})
    log_eval("new", {"params/activated": 2e6, "geneval_shapes/overall": 0.6}, record())
    rows = compare("legacy", out=str(workdir / "cmp"), log_mlflow=False)
    assert [r["protocol"] for r in rows] == ["unknown", record()["protocol_id"]]
    assert "warning: geneval_shapes/* of old: protocol unknown" in capsys.readouterr().out
    log_eval("newer", {"params/activated": 3e6, "geneval_shapes/overall": 0.7}, record(steps=1))
    with pytest.raises(UserError, match="different GenEval protocols"):
        compare("legacy", out=str(workdir / "cmp"), log_mlflow=False)


def test_model_card_shows_the_protocol_or_says_it_is_unknown():
    from diffusers import FluxTransformer2DModel

    from src.export import model_card

    model = FluxTransformer2DModel(**TINY_FLUX)
    card = model_card(model, None, "x", {"student/geneval_shapes/overall": 0.5, "provenance": record()})
    assert f"| protocol id | `{record()['protocol_id']}` |" in card
    assert "| prompts_count | 553 |" in card and "| sampler.steps | 28 |" in card and "| torch |" in card
    card = model_card(model, None, "x", {"student/geneval_shapes/overall": 0.5})
    assert "GenEval protocol: unknown" in card
    assert "GenEval protocol" not in model_card(model, None, "x", {"student/loss": 0.1})


def test_a_huge_model_folder_is_fingerprinted_by_its_safetensors_headers(tmp_path, monkeypatch):
    import torch
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(4, 4)}, str(tmp_path / "model.safetensors"))
    full = provenance.model_fingerprint(tmp_path)
    assert full == provenance.weights_sha256(tmp_path / "model.safetensors")
    monkeypatch.setattr(provenance, "FULL_HASH_BYTES", 10)  # as if it were FLUX.1-dev's 24 GB
    header = provenance.model_fingerprint(tmp_path)
    assert header.startswith("headers:")
    save_file({"w": torch.ones(4, 4)}, str(tmp_path / "model.safetensors"))
    assert provenance.model_fingerprint(tmp_path) == header  # same layout: same header fingerprint
    save_file({"w": torch.ones(4, 5)}, str(tmp_path / "model.safetensors"))
    assert provenance.model_fingerprint(tmp_path) != header
