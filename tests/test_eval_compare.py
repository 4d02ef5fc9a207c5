"""compare: the runs table, the Pareto front (hand example), the plot, and its MLflow run."""

import csv
import os

import mlflow
import pytest
from PIL import Image

from evaluation.compare import compare, pareto_front
from src.cli import main
from src.errors import UserError


def test_pareto_front_on_a_hand_example():
    points = [(1, 0.2), (2, 0.5), (2, 0.4), (3, 0.5), (4, 0.9), (0.5, 0.1), (4, 0.9)]
    # (2, 0.4) and (3, 0.5) are beaten by (2, 0.5); equal points do not beat each other.
    assert pareto_front(points) == [5, 0, 1, 4, 6]
    # Lower is better (e.g. LPIPS): the cheapest run is also the best one here.
    assert pareto_front([(1, 0.3), (2, 0.1), (3, 0.2)], maximize=False) == [0, 1]


def log_run(name, **metrics):
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])  # the fluent URI is global; this test's store
    with mlflow.start_run(run_name=name):
        mlflow.log_metrics(metrics)


def test_compare_writes_table_plot_and_logs_a_compare_run(workdir, capsys):
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    mlflow.set_experiment("sizes")
    log_run("moe_s", **{"params/activated": 10e6, "geneval_shapes/overall": 0.5, "geneval_shapes/colors": 0.4,
                        "clip_score": 21.0, "flops": 1e9, "fidelity/psnr": 30.0, "latency/generate_s_per_image": 0.2})  # fmt: skip
    log_run("moe_m", **{"params/activated": 20e6, "geneval_shapes/overall": 0.4, "flops": 2e9})
    log_run("dense", **{"params/activated": 30e6, "geneval_shapes/overall": 0.7, "flops": 3e9})
    log_run("fit-without-eval", **{"train/loss": 0.1})

    rows = compare("sizes", out=str(workdir / "cmp"))
    assert [r["run"] for r in rows] == ["moe_s", "moe_m", "dense"]
    assert [r["pareto"] for r in rows] == [True, False, True]
    with (workdir / "cmp" / "compare.csv").open() as f:
        table = list(csv.DictReader(f))
    assert list(table[0])[:5] == ["run", "run_id", "params/activated", "flops", "geneval_shapes/overall"]
    assert {"geneval_shapes/colors", "clip_score", "fidelity/psnr", "latency/generate_s_per_image"} <= set(table[0])
    assert table[1]["clip_score"] == "" and "train/loss" not in table[0]
    markdown = (workdir / "cmp" / "compare.md").read_text()
    assert markdown.startswith("| run | run_id | params/activated |") and markdown.count("✓") == 2
    assert Image.open(workdir / "cmp" / "compare.png").size[0] > 300
    assert "Pareto front (geneval_shapes/overall): moe_s, dense" in capsys.readouterr().out

    client = mlflow.MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("sizes").experiment_id])
    (logged,) = [r for r in runs if r.data.tags.get("dense2moe.kind") == "compare"]
    assert {a.path for a in client.list_artifacts(logged.info.run_id)} == {"compare.csv", "compare.md", "compare.png"}
    # A second compare ignores the first compare run.
    assert len(compare("sizes", out=str(workdir / "cmp2"), metric="flops", maximize=False)) == 3


def test_compare_errors_are_one_clear_line(workdir, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["compare", "--experiment", "nope"])
    assert exc.value.code == 2
    assert "MLflow experiment 'nope' does not exist" in capsys.readouterr().err
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    mlflow.set_experiment("empty-metrics")
    log_run("a", **{"train/loss": 1.0})
    with pytest.raises(UserError, match="no run has any of the metrics"):
        compare("empty-metrics", out=str(workdir / "x"))
    log_run("b", **{"geneval/overall": 0.3})
    with pytest.raises(UserError, match="also has 'params/activated'"):
        compare("empty-metrics", out=str(workdir / "x"))


def test_compare_shows_intervals_vs_the_teacher_and_a_baseline(workdir, tmp_path):

    import numpy as np

    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    mlflow.set_experiment("claims")
    tags = [("single_object", "two_object", "counting", "colors", "position", "color_attr")[i % 6] for i in range(120)]
    rng = np.random.default_rng(0)
    teacher = list(rng.binomial(2, 0.8, 120) / 2)

    def fit_run(name, p, seed=0):
        student = list(rng.binomial(2, p, 120) / 2)
        report = {"world": "glyphs", "seed": seed, "images_per_prompt": 2, "prompts": [str(i) for i in range(120)],
                  "tags": tags, "teacher": teacher, "student": student, "fidelity": {"psnr": [30.0] * 120}}  # fmt: skip
        with mlflow.start_run(run_name=name):
            mlflow.log_metrics({"params/activated": 1e6, "geneval_glyphs/overall": float(np.mean(student)),
                                "delta/geneval_glyphs/overall": -0.1, "delta/geneval_glyphs/overall/low": -0.15,
                                "delta/geneval_glyphs/overall/high": 0.02})  # fmt: skip
            mlflow.log_dict(report, "report/per_prompt.json")

    fit_run("moe_l", 0.78)
    fit_run("prune_width", 0.3)
    fit_run("other_seed", 0.3, seed=1)
    rows = {r["run"]: r for r in compare("claims", out=str(tmp_path / "c"), baseline="prune_width", log_mlflow=False)}
    assert rows["moe_l"]["Δ vs teacher [95% CI]"] == "−10.0 [−15.0, +2.0] (undecided)"
    assert rows["moe_l"]["Δ vs prune_width [95% CI]"].startswith("+")
    assert "undecided" not in rows["moe_l"]["Δ vs prune_width [95% CI]"]
    assert rows["prune_width"]["Δ vs prune_width [95% CI]"] == "+0.0 [+0.0, +0.0] (undecided)"
    assert rows["other_seed"]["Δ vs prune_width [95% CI]"].startswith("not paired")
    with pytest.raises(UserError, match="baseline='nope': no run of that name"):
        compare("claims", out=str(tmp_path / "d"), baseline="nope", log_mlflow=False)
