"""Claims between variants: paired bootstrap over prompts, seed spread, and a verdict only when decided."""

import json

import numpy as np
import optuna
import pytest

from evaluation.claims import Claim, claims_table, decide, load_per_prompt, variant_table
from src.errors import UserError
from src.sweep.report import claims
from src.sweep.spec import ObjectiveSpec, SamplerSpec, SweepSpec, VariantSpec, load_sweep

TASKS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")


def report(seed: int, student, teacher=None, psnr=None) -> dict:
    n = len(student)
    return {
        "world": "glyphs",
        "seed": seed,
        "images_per_prompt": 2,
        "prompts": [f"prompt {i}" for i in range(n)],
        "tags": [TASKS[i % 6] for i in range(n)],
        "teacher": list(teacher if teacher is not None else np.ones(n)),
        "student": list(student),
        "fidelity": {"psnr": list(psnr if psnr is not None else np.full(n, 30.0))},
    }


def accuracies(p: float, n: int = 120, seed: int = 0) -> np.ndarray:
    """Per-prompt accuracies of 2 images each with success probability p."""
    rng = np.random.default_rng(seed)
    return rng.binomial(2, p, size=n) / 2


def test_a_clear_difference_holds_its_reverse_fails_and_equal_models_are_undecided():
    strong = {"a": [report(s, accuracies(0.9, seed=s)) for s in range(3)]}
    weak = {"b": [report(s, accuracies(0.4, seed=10 + s)) for s in range(3)]}
    runs = strong | weak
    holds = decide(Claim("a beats b", better="a", worse="b"), runs)
    assert holds.verdict == "holds" and holds.delta.low > 0 and len(holds.seed_deltas) == 3
    assert decide(Claim("b beats a", better="b", worse="a"), runs).verdict == "fails"
    same = {"a": strong["a"], "c": [report(s, accuracies(0.9, seed=s)) for s in range(3)]}
    equal = decide(Claim("a vs its copy", better="a", worse="c"), same)
    assert equal.verdict == "undecided" and equal.delta.low == equal.delta.high == 0


def test_seeds_that_disagree_in_sign_leave_a_claim_undecided():
    n = 600
    a = [report(0, np.ones(n)), report(1, np.zeros(n)), report(2, np.ones(n))]
    b = [report(s, np.full(n, 0.5)) for s in range(3)]
    result = decide(Claim("a vs b", better="a", worse="b"), {"a": a, "b": b})
    assert result.delta.low > 0  # the prompt bootstrap alone would call it
    assert result.verdict == "undecided"
    assert "undecided" in claims_table([result])


def test_the_teacher_is_compared_inside_the_other_variants_runs():
    runs = {"pruned": [report(s, accuracies(0.3, seed=s), teacher=accuracies(0.8, seed=50 + s)) for s in range(2)]}
    result = decide(Claim("teacher vs pruned", better="teacher", worse="pruned"), runs)
    assert result.verdict == "holds" and result.seeds == (0, 1)
    assert 0.4 < result.delta.estimate < 0.6
    table = variant_table(runs)
    assert "| pruned | 2 |" in table


def test_fidelity_claims_compare_students_in_their_own_units():
    n = 60
    runs = {
        "a": [report(s, np.ones(n), psnr=np.full(n, 35.0) + s) for s in range(3)],
        "b": [report(s, np.ones(n), psnr=np.full(n, 30.0) + s) for s in range(3)],
    }
    result = decide(Claim("psnr", better="a", worse="b", metric="psnr"), runs)
    assert result.delta.estimate == pytest.approx(5.0) and result.verdict == "holds"
    assert "+5.0 [+5.0, +5.0]" in result.row()


def test_runs_that_do_not_pair_are_refused_with_the_reason():
    a = [report(0, np.ones(12))]
    b = [report(1, np.ones(12))]
    with pytest.raises(ValueError, match="no seed in common"):
        decide(Claim("x", better="a", worse="b"), {"a": a, "b": b})
    other = report(0, np.ones(12))
    other["prompts"] = other["prompts"][::-1]
    with pytest.raises(ValueError, match="different prompts"):
        decide(Claim("x", better="a", worse="b"), {"a": a, "b": [other]})
    with pytest.raises(ValueError, match="no finished run of variant 'b'"):
        decide(Claim("x", better="a", worse="b"), {"a": a})
    with pytest.raises(ValueError, match="both 'a'"):
        Claim("x", better="a", worse="a")
    with pytest.raises(ValueError, match="fidelity to the teacher"):
        Claim("x", better="teacher", worse="a", metric="psnr")
    with pytest.raises(ValueError, match="no report/per_prompt.json"):
        load_per_prompt("/nonexistent")


def test_a_sweep_file_claim_must_name_its_variants(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(
        "name: s\nbase: experiments/moe_l.yaml\nvariants: {a: {}, b: {}}\n"
        "objectives: {geneval_glyphs/overall: maximize}\nsampler: {name: grid}\n"
        "claims:\n  - {name: x, better: a, worse: c}\n"
    )
    with pytest.raises(UserError, match="names 'c'; allowed variants"):
        load_sweep(path)
    path.write_text(path.read_text().replace("worse: c", "worse: b, colour: red"))
    with pytest.raises(UserError, match="unknown key 'colour'"):
        load_sweep(path)


def test_the_sweep_report_decides_its_claims_from_the_trial_folders(tmp_path):
    spec = SweepSpec(
        name="s",
        base="experiments/moe_l.yaml",
        objectives=[ObjectiveSpec("geneval_glyphs/overall", "maximize")],
        variants=[VariantSpec(name="a"), VariantSpec(name="b")],
        sampler=SamplerSpec(name="grid"),
        claims=[Claim("a beats b", better="a", worse="b"), Claim("a vs teacher", better="teacher", worse="a")],
    )
    study = optuna.create_study(direction="maximize")
    dist = {"variant": optuna.distributions.CategoricalDistribution(["a", "b"])}
    for number, (variant, p) in enumerate([("a", 0.9), ("b", 0.3), ("a", 0.9), ("b", 0.3)]):
        folder = tmp_path / f"trial_{number}" / "run" / "report"
        folder.mkdir(parents=True)
        seed = number // 2
        (folder / "per_prompt.json").write_text(json.dumps(report(seed, accuracies(p, seed=number))))
        study.add_trial(
            optuna.trial.create_trial(
                params={"variant": variant},
                distributions=dist,
                value=p,
                user_attrs={"trial_dir": str(tmp_path / f"trial_{number}")},
            )
        )
    text = claims(study, spec)
    assert "| a beats b | a − b | overall |" in text and "**holds**" in text
    assert "| a | 2 |" in text and "| b | 2 |" in text
