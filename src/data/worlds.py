"""The embedded worlds by name: what a config's ``world`` (and a checkpoint config's ``world`` key) selects.

- ``shapes``: 4 shapes × 6 colours (``src/data/shapes.py``), held-out compositions of its own (the first
  embedded teacher's world).
- ``glyphs``: GenEval's 80 object names as procedural glyphs in GenEval's 10 colours, evaluated on GenEval's own
  553 prompts (``src/data/glyphs.py``).

Both offer ``train_sample(seed)``, ``heldout_metadata(counts, seed)``, ``render(metadata, rng)`` and ``size``.
"""

from __future__ import annotations

from src.data.glyphs import GlyphWorld
from src.data.shapes import ShapesWorld

WORLDS = ("shapes", "glyphs")
World = ShapesWorld | GlyphWorld
DEFAULT_WORLD = "shapes"
"""The world of a checkpoint whose config has no ``world`` key (every teacher trained before the key existed)."""


def check_world(name: str, field: str = "world") -> str:
    if name not in WORLDS:
        raise ValueError(f"{field}={name!r}: unknown world; allowed {', '.join(WORLDS)}")
    return name


def make_world(name: str, size: int = 32, heldout_fraction: float = 0.2, snap: int = 1, cells: bool = False) -> World:
    """The world `name` at image side `size`; the other arguments apply to the shapes world only."""
    if check_world(name) == "glyphs":
        return GlyphWorld(size=size)
    return ShapesWorld(size=size, heldout_fraction=heldout_fraction, snap=snap, cells=cells)


def model_world(model) -> str:
    """The world a transformer was trained on (config key ``world``; shapes when absent or None)."""
    config = getattr(model, "config", None)
    name = (config.get("world") if config is not None else None) or DEFAULT_WORLD
    return check_world(name, "model config world")
