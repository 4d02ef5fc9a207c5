"""Compute that follows the noise level: routed top-k and MoB κ as step functions of σ during sampling.

High-noise steps decide layout, low-noise steps refine texture, so a sampler may spend experts (or blocks) where they
matter. A schedule is a short list of ``(σ_max, value)`` pairs, σ_max strictly decreasing from 1.0; entry i covers
σ ∈ (σ_max of entry i+1, σ_max of entry i] and the last entry reaches down to σ = 0. ``[[1.0, 2], [0.5, 1]]``
means "top-k 2 for σ ∈ (0.5, 1], top-k 1 for σ ∈ [0, 0.5]". Written this way ranges can neither overlap nor leave
gaps; lists that would (unsorted or repeated σ_max, a first σ_max below 1) are refused with one line.

The σ of every Euler step is known on the host before the step runs (``sampling_schedule``), so applying a
schedule only sets Python ints on the layers (``MoEFeedForward.top_k``, ``MoBGroup.active``): no device sync.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from torch import nn

from src.models.mob import mob_groups
from src.models.moe import moe_layers

Schedule = tuple[tuple[float, int], ...]
"""A checked schedule: ((1.0, v0), (σ1, v1), …) with 1.0 > σ1 > … > 0."""

SCHEDULE_KEYS = {"top_k": "top_k_schedule", "mob_active": "mob_active_schedule"}
"""Model-config ``sampling_schedule`` key → the ``SamplingConfig`` field it defaults."""


def check_schedule(value: Sequence[Sequence[float]] | None, field: str) -> Schedule | None:
    """``value`` as a checked ``Schedule`` (None stays None); ValueError naming ``field`` for a bad one. Values must be
    ≥ 1 for a MoB κ schedule (``field`` containing "mob_active"), ≥ 0 for top-k."""
    if value is None:
        return None
    minimum = 1 if "mob_active" in field else 0  # a MoB group runs at least one block; top-k 0 = shared only
    allowed = (
        f"allowed: a list of [σ_max, value] pairs, σ_max strictly decreasing from 1.0 to > 0, each value an "
        f"integer ≥ {minimum}, e.g. [[1.0, 2], [0.5, 1]]"
    )

    def bad(why: str) -> ValueError:
        return ValueError(f"{field}={as_lists(value)!r}: {why}; {allowed}")

    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not value:
        raise bad("not a non-empty list")
    entries = []
    for entry in value:
        if isinstance(entry, (str, bytes)) or not isinstance(entry, Sequence) or len(entry) != 2:
            raise bad(f"entry {as_lists(entry)!r} is not a [σ_max, value] pair")
        sigma, k = entry
        if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not 0 < sigma <= 1:
            raise bad(f"σ_max {sigma!r} lies outside (0, 1]")
        if isinstance(k, bool) or not isinstance(k, (int, float)) or k != int(k) or k < minimum:
            raise bad(f"value {k!r} is not an integer ≥ {minimum}")
        entries.append((float(sigma), int(k)))
    if entries[0][0] != 1.0:
        raise bad(f"σ in ({entries[0][0]}, 1] is not covered (a gap): the first σ_max must be 1.0")
    for (upper, _), (lower, _) in zip(entries, entries[1:]):
        if lower >= upper:
            raise bad(f"σ_max {lower} after {upper} overlaps the range before it (σ_max must strictly decrease)")
    return tuple(entries)


def as_lists(value: Any) -> Any:
    """A schedule (or one of its entries) as nested lists, for JSON, YAML and messages."""
    if isinstance(value, (list, tuple)):
        return [as_lists(v) for v in value]
    return value


def value_at(schedule: Schedule, sigma: float) -> int:
    """The schedule's value at noise level σ (σ ≤ the last σ_max, σ = 0 included, takes the last entry's value)."""
    for upper, value in reversed(schedule):
        if sigma <= upper:
            return value
    return schedule[0][1]


def describe(schedule: Schedule) -> str:
    """ "σ ∈ (0.5, 1] → 2, σ ∈ [0, 0.5] → 1" for logs and the model card."""
    parts = []
    for i, (upper, value) in enumerate(schedule):
        lower = schedule[i + 1][0] if i + 1 < len(schedule) else 0.0
        left = "[" if i + 1 == len(schedule) else "("
        parts.append(f"σ ∈ {left}{lower:g}, {upper:g}] → {value}")
    return ", ".join(parts)


def model_schedules(model: nn.Module) -> dict[str, Schedule | None]:
    """The schedules a model's config carries (key ``sampling_schedule``, written by ``export``), by field name."""
    config = getattr(model, "config", None)
    stored = config.get("sampling_schedule") if config is not None else None
    if stored is None:
        return {field: None for field in SCHEDULE_KEYS.values()}
    if not isinstance(stored, dict) or set(stored) - set(SCHEDULE_KEYS):
        raise ValueError(
            f"model config sampling_schedule={stored!r}: must be a mapping with keys among {sorted(SCHEDULE_KEYS)}"
        )
    return {
        field: check_schedule(stored.get(key), f"model config sampling_schedule.{key}")
        for key, field in SCHEDULE_KEYS.items()
    }


def check_fits(model: nn.Module, top_k_schedule: Schedule | None, mob_active_schedule: Schedule | None) -> None:
    """ValueError when a schedule asks for more experts than a MoE layer has or more blocks than a MoB group has."""
    for layer in moe_layers(model) if top_k_schedule else ():
        largest = max(v for _, v in top_k_schedule)
        if largest > layer.num_experts:
            raise ValueError(
                f"top_k_schedule={as_lists(top_k_schedule)}: top-k {largest} exceeds num_experts={layer.num_experts}"
            )
    for group in mob_groups(model) if mob_active_schedule else ():
        largest = max(v for _, v in mob_active_schedule)
        if largest > group.size:
            raise ValueError(
                f"mob_active_schedule={as_lists(mob_active_schedule)}: κ={largest} exceeds the group size m={group.size}"
            )


@contextlib.contextmanager
def scheduled(
    model: nn.Module, top_k_schedule: Schedule | None, mob_active_schedule: Schedule | None
) -> Iterator[Callable[[float], None]]:
    """Yield ``apply(σ)``, which sets every MoE layer's top-k and every MoB group's κ for a step at σ; the layers'
    own values come back on exit. A model without MoE layers (or MoB groups) ignores that schedule, so a dense
    teacher sampled by the same pipeline is unaffected."""
    check_fits(model, top_k_schedule, mob_active_schedule)
    layers = moe_layers(model) if top_k_schedule else []
    groups = mob_groups(model) if mob_active_schedule else []
    saved = [layer.top_k for layer in layers], [group.active for group in groups]

    def apply(sigma: float) -> None:
        if layers:
            k = value_at(top_k_schedule, sigma)
            for layer in layers:
                layer.top_k = k
        if groups:
            active = value_at(mob_active_schedule, sigma)
            for group in groups:
                group.active = active

    try:
        yield apply
    finally:
        for layer, k in zip(layers, saved[0]):
            layer.top_k = k
        for group, active in zip(groups, saved[1]):
            group.active = active
