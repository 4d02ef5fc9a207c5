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
    main(["evaluate", "--model", str(workdir / "teacher_tiny"), "--limit", "7", "--images_per_prompt", "2",
          "--steps", "1"])  # fmt: skip

    summary = json.loads((out / "summary.json").read_text())
    assert summary["detector"] == "shapes" and summary["images"] == 14
    assert set(summary) >= {"overall", "tasks", "cost", "latency", "provenance"}
    assert len(summary["tasks"]) == 6  # --limit spreads its prompts over every task
    protocol = summary["provenance"]["protocol"]
    assert protocol["prompts_count"] == 7 and protocol["images_per_prompt"] == 2 and protocol["sampler.steps"] == 1
    assert protocol["detector_weights_sha256"].startswith("source:") and protocol["threshold"] == 0.3
    assert summary["provenance"]["sources"]["detector"] == "shapes-classical"
    lines = (out / "results.jsonl").read_text().splitlines()
    assert len(lines) == 14 and json.loads(lines[0])["tag"] == "single_object"
    tags = [json.loads(line)["tag"] for line in lines[::2]]
    assert tags.count("single_object") == 2 and len(set(tags)) == 6  # the first task gets the seventh prompt
    assert json.loads((out / "generation.json").read_text())["images_per_prompt"] == 2
    assert "Overall score (avg. over tasks)" in capsys.readouterr().out

    client = mlflow.MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    (run,) = client.search_runs([client.get_experiment_by_name("evaluation").experiment_id])
    assert run.info.run_name == "teacher_tiny"
    assert {"geneval_shapes/overall", "geneval_shapes/single_object", "params/activated", "flops"} <= set(
        run.data.metrics
    )
    assert run.data.params["steps"] == "1" and run.data.params["detector"] == "shapes"
    assert len(run.data.params["sha256"]) == 64 and run.data.tags["kind"] == "evaluation"
    assert client.get_experiment(run.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    assert run.data.tags["dense2moe.geneval_protocol_id"] == summary["provenance"]["protocol_id"]
    assert json.loads(run.data.tags["dense2moe.geneval_protocol"]) == protocol
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"summary.json", "geneval_tasks.md", "provenance.json", "config.yaml"} <= artifacts
    if not all(json.loads(line)["correct"] for line in lines):
        assert {"worst_failures.png", "worst_failures.txt"} <= artifacts

    # The folder holds this model's images at 1 step: another setting must not resume into it.
    with pytest.raises(SystemExit):
        main(["evaluate", "--model", str(workdir / "teacher_tiny"), "--limit", "7", "--steps", "2"])
    assert "holds images made with other settings (steps 1 → 2)" in capsys.readouterr().err


def test_a_limit_below_the_number_of_tasks_is_refused_in_one_line(workdir, capsys):
    from diffusers import FluxTransformer2DModel

    FluxTransformer2DModel(**TINY_FLUX).save_pretrained(workdir / "teacher_tiny")
    with pytest.raises(SystemExit):
        main(["evaluate", "--model", str(workdir / "teacher_tiny"), "--limit", "3", "--log_mlflow", "false"])
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "limit=3: prompt set shapes-heldout has 6 tasks" in err


def test_limit_takes_each_tasks_first_prompts_in_file_order():
    from evaluation.generate import across_tasks

    metadata = [{"tag": t, "prompt": f"{t}{i}"} for i, t in enumerate("aaaabbc")]
    assert [m["prompt"] for m in across_tasks(metadata, 5, "x")] == ["a0", "a1", "b4", "b5", "c6"]
    assert [m["prompt"] for m in across_tasks(metadata, 6, "x")] == ["a0", "a1", "a2", "b4", "b5", "c6"]
    assert across_tasks(metadata, None, "x") == metadata == across_tasks(metadata, 7, "x")


def test_relative_checkpoint_paths_are_not_mistaken_for_hub_ids(workdir, capsys):
    from src.hub import is_hub_id

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
    main(["evaluate", "--model", str(workdir / "teacher_glyphs"), "--limit", "6", "--images_per_prompt", "1",
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
