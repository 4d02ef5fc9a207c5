"""`evaluate --model <transformer folder>` (the shapes world) on a tiny random teacher: defaults, files, MLflow."""

import json
import os

import mlflow
import pytest
from conftest import TINY_FLUX

from src.cli import main


def test_shapes_world_evaluate_defaults_to_heldout_prompts_and_shapes_detector(workdir, capsys):
    from diffusers import FluxTransformer2DModel

    FluxTransformer2DModel(**TINY_FLUX).save_pretrained(workdir / "teacher_tiny")
    out = workdir / "outputs" / "eval" / "teacher_tiny"
    main(["evaluate", "--model", str(workdir / "teacher_tiny"), "--limit", "3", "--images_per_prompt", "2",
          "--steps", "1"])  # fmt: skip

    summary = json.loads((out / "summary.json").read_text())
    assert summary["detector"] == "shapes" and summary["images"] == 6
    assert set(summary) >= {"overall", "tasks", "cost", "latency", "provenance"}
    protocol = summary["provenance"]["protocol"]
    assert protocol["prompts_count"] == 3 and protocol["images_per_prompt"] == 2 and protocol["sampler.steps"] == 1
    assert protocol["detector_weights_sha256"].startswith("source:") and protocol["threshold"] == 0.3
    assert summary["provenance"]["sources"]["detector"] == "shapes-classical"
    lines = (out / "results.jsonl").read_text().splitlines()
    assert len(lines) == 6 and json.loads(lines[0])["tag"] == "single_object"
    assert json.loads((out / "generation.json").read_text())["images_per_prompt"] == 2
    assert "Overall score (avg. over tasks)" in capsys.readouterr().out

    client = mlflow.MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    (run,) = client.search_runs([client.get_experiment_by_name("evaluation").experiment_id])
    assert run.info.run_name == "teacher_tiny"
    assert {"geneval_shapes/overall", "geneval_shapes/single_object", "params/activated", "flops"} <= set(
        run.data.metrics
    )
    assert run.data.params["steps"] == "1" and run.data.params["detector"] == "shapes"
    assert run.data.tags["dense2moe.geneval_protocol_id"] == summary["provenance"]["protocol_id"]
    assert json.loads(run.data.tags["dense2moe.geneval_protocol"]) == protocol
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"summary.json", "geneval_tasks.md", "provenance.json"} <= artifacts
    if not all(json.loads(line)["correct"] for line in lines):
        assert {"worst_failures.png", "worst_failures.txt"} <= artifacts

    # The folder holds this model's images at 1 step: another setting must not resume into it.
    with pytest.raises(SystemExit):
        main(["evaluate", "--model", str(workdir / "teacher_tiny"), "--limit", "3", "--steps", "2"])
    assert "holds images made with other settings (steps 1 → 2)" in capsys.readouterr().err


def test_relative_checkpoint_paths_are_not_mistaken_for_hub_ids(workdir, capsys):
    from evaluation.generate import is_hub_id

    (workdir / "checkpoints").mkdir()
    assert not is_hub_id("checkpoints/teacher_tiny") and is_hub_id("black-forest-labs/FLUX.1-dev")
    with pytest.raises(SystemExit):
        main(["evaluate", "--model", "checkpoints/teacher_tiny", "--log_mlflow", "false"])
    assert "checkpoint checkpoints/teacher_tiny: no diffusers config.json" in capsys.readouterr().err


def test_a_glyph_world_model_is_judged_on_genevals_prompts_by_the_glyph_detector(workdir, capsys):
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel(**TINY_FLUX)
    model.register_to_config(world="glyphs")
    model.save_pretrained(workdir / "teacher_glyphs")
    main(["evaluate", "--model", str(workdir / "teacher_glyphs"), "--limit", "2", "--images_per_prompt", "1",
          "--steps", "1", "--log_mlflow", "false"])  # fmt: skip
    summary = json.loads((workdir / "outputs" / "eval" / "teacher_glyphs" / "summary.json").read_text())
    assert summary["detector"] == "glyphs" and summary["provenance"]["sources"]["detector"] == "glyphs-classical"
    assert summary["provenance"]["sources"]["prompts"] == "geneval"
    meta = json.loads((workdir / "outputs" / "eval" / "teacher_glyphs" / "00000" / "metadata.jsonl").read_text())
    assert meta["prompt"] == "a photo of a bench"  # GenEval's first prompt, unchanged

    (workdir / "prompts.jsonl").write_text(
        json.dumps({"tag": "single_object", "include": [{"class": "unicorn", "count": 1}], "prompt": "a unicorn"})
    )
    with pytest.raises(SystemExit):
        main(["evaluate", "--model", str(workdir / "teacher_glyphs"), "--prompts", str(workdir / "prompts.jsonl"),
              "--log_mlflow", "false"])  # fmt: skip
    err = capsys.readouterr().err
    assert "class 'unicorn' is not in the glyph world's vocabulary" in err and "Traceback" not in err
