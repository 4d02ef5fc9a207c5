"""Paired bootstrap intervals: zero for identical models, decided for large differences, honest coverage."""

import numpy as np
import pytest

from evaluation.bootstrap import (
    Interval,
    geneval_differences,
    mean_difference,
    mean_interval,
    per_prompt_accuracy,
    seed_spread,
)

TASKS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")


def test_identical_models_give_a_zero_interval():
    rng = np.random.default_rng(0)
    a = rng.random(120)
    interval = mean_difference(a, a)
    assert (interval.estimate, interval.low, interval.high) == (0.0, 0.0, 0.0)
    assert not interval.decided


def test_interval_format_and_decision():
    assert Interval(-0.063, -0.081, -0.044).format() == "−6.3 [−8.1, −4.4]"
    assert Interval(0.01, -0.01, 0.03).format() == "+1.0 [−1.0, +3.0]"
    assert Interval(-0.063, -0.081, -0.044).decided
    assert not Interval(0.01, -0.01, 0.03).decided


def test_overall_is_the_mean_of_tasks_and_stratified():
    rng = np.random.default_rng(1)
    tags = [t for t in TASKS for _ in range(40)]
    a = rng.integers(0, 2, len(tags)).astype(float)
    b = np.clip(a - (rng.random(len(tags)) < 0.3), 0, 1)  # b loses ~30% of a's hits
    out = geneval_differences(tags, a, b)
    assert set(out) == {"overall", *TASKS}
    assert out["overall"].estimate == pytest.approx(np.mean([out[t].estimate for t in TASKS]))
    assert out["overall"].decided and out["overall"].high < 0
    assert out["overall"].low < out["overall"].estimate < out["overall"].high


def test_coverage_of_the_true_difference_is_near_95_percent():
    """Simulated paired models with a known true difference: the 95% interval must contain it most of the time."""
    rng = np.random.default_rng(2)
    true_p_a, true_p_b, prompts, covered = 0.6, 0.55, 200, 0
    trials = 150
    for trial in range(trials):
        difficulty = rng.random(prompts)  # prompt-level effect shared by both models (why pairing matters)
        a = (rng.random(prompts) < np.clip(true_p_a + 0.3 * (difficulty - 0.5), 0, 1)).astype(float)
        b = (rng.random(prompts) < np.clip(true_p_b + 0.3 * (difficulty - 0.5), 0, 1)).astype(float)
        interval = mean_difference(a, b, resamples=800, seed=trial)
        covered += interval.low <= true_p_b - true_p_a <= interval.high
    assert 0.88 <= covered / trials <= 0.99


def test_mean_interval_and_seed_spread():
    interval = mean_interval([30.0, 32.0, 34.0, 31.0, 33.0] * 10)
    assert interval.estimate == pytest.approx(32.0)
    assert 31.0 < interval.low < 32.0 < interval.high < 33.0
    assert seed_spread([0.5, 0.6, 0.7]) == pytest.approx((0.6, 0.1))
    assert seed_spread([0.5]) == (0.5, 0.0)


def test_per_prompt_accuracy_averages_images():
    records = [{"tag": "colors", "correct": c} for c in (True, False, True, True)]
    tags, acc = per_prompt_accuracy(records, [0, 0, 1, 1])
    assert tags == ["colors", "colors"] and acc == [0.5, 1.0]


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="equal-length"):
        mean_difference([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="NaN"):
        mean_difference([1.0, float("nan")], [1.0, 2.0])
    with pytest.raises(ValueError, match="task tags"):
        geneval_differences(["colors"], [1.0, 0.0], [0.0, 1.0])
