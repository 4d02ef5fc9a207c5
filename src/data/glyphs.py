"""The GenEval-glyphs world: GenEval's own vocabulary and prompts, drawn as procedural glyphs on a cell board.

The shapes world (``src/data/shapes.py``) has 4 classes and 6 colours: a teacher holds almost nothing in its FFNs
there, so removing FFN capacity costs nothing measurable. This world carries knowledge a model must store: each of
GenEval's 80 object names (``evaluation/data/geneval/object_names.txt``, mmdet's COCO order) is a fixed 6×6 binary
glyph, and a model has to learn, from the words alone, which of 80 patterns (36 bits each) to draw, in which of
GenEval's 10 colours, how many times and where.

- **Glyphs**: a codebook of 36-bit patterns drawn greedily from a seeded stream of random patterns so that every
  two glyphs differ in at least ``min_distance`` pixels (default 12: a detector that reads the nearest glyph
  corrects up to 5 wrong pixels). Every glyph has 14–22 lit pixels and touches all four sides of its 6×6 box, so
  its box is the same for every class.
- **Board**: a ``size``/8 × ``size``/8 grid of 8-pixel cells (4×4 at 32 px, one cell per 8×8-pixel token of the
  teacher); an object is one glyph centred in one cell, 2 pixels from its neighbours.
- **Colours**: GenEval's ten (red, orange, yellow, green, blue, purple, pink, brown, black, white) on a mid-grey
  background, every colour at least 125 RGB units from it (black and white included) and ≥ 100 from each other.
- **Prompts**: GenEval's wording for its six tasks (``a photo of an orange``, ``a photo of two clocks`` — with
  GenEval's own plurals, ``benchs``, ``sheeps`` —, ``a photo of a dog right of a teddy bear``, ``a photo of a
  purple wine glass and a black apple``), 1–4 objects. **Evaluation uses GenEval's own 553 prompts unchanged**
  (``evaluation_metadata.jsonl``); the training sampler draws from the same templates and never produces any of
  those 553 prompt strings. All 80 single-object prompts are evaluation prompts, so single objects are trained
  only with a colour ("a photo of a red bench"); ``single_object`` is then a test of generalising to a new wording.
- **Position**: subject and reference share a row (left of / right of) or a column (above / below), so GenEval's
  normalised offset is exactly ±1 on the relation's axis and 0 on the other.

Determinism: every function takes a seed or a ``numpy.random.Generator`` (PCG64) and never touches global state.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np

from src.data.shapes import NUMBERS, RELATIONS, TASKS  # GenEval's wording, shared by both worlds

GENEVAL_DIR = Path(__file__).resolve().parents[2] / "evaluation" / "data" / "geneval"
CLASSES: tuple[str, ...] = tuple(
    line.strip() for line in (GENEVAL_DIR / "object_names.txt").read_text().splitlines() if line.strip()
)
GLYPH_PALETTE = {
    "red": (230, 30, 30),
    "orange": (255, 140, 0),
    "yellow": (250, 240, 30),
    "green": (30, 180, 50),
    "blue": (40, 70, 230),
    "purple": (150, 30, 210),
    "pink": (255, 150, 200),
    "brown": (120, 65, 20),
    "black": (10, 10, 10),
    "white": (245, 245, 245),
}
GLYPH_COLORS = tuple(GLYPH_PALETTE)
"""GenEval's ten colours, in its order."""
GLYPH_BACKGROUND = (128, 128, 128)
CELL = 8
"""Cell side in pixels: one glyph per cell, one cell per 8×8-pixel token."""
GLYPH = 6
"""Glyph side in pixels, centred in its cell (1 pixel of background on every side)."""
TRAIN_TASKS = ("two_object", "counting", "colors", "position", "color_attr")
"""Tasks the training sampler draws: every single_object prompt is one of GenEval's evaluation prompts."""
MIN_DISTANCES = range(5, 15)
"""Allowed codebook distances: below 5 a 2-pixel error can turn one glyph into another; above 14 no 80-glyph
codebook is found among the candidates."""
_LIT_RANGE = (14, 22)
_CANDIDATES = 200_000


def geneval_metadata() -> list[dict]:
    """GenEval's 553 evaluation prompts with their metadata, in the file's order."""
    path = GENEVAL_DIR / "evaluation_metadata.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# --- glyphs -------------------------------------------------------------------------------------------------


@cache
def codebook(n: int = len(CLASSES), min_distance: int = 12, seed: int = 0) -> np.ndarray:
    """bool (n, GLYPH, GLYPH): `n` glyphs, every pair differing in >= `min_distance` pixels.

    Greedy over a seeded stream of random 36-bit patterns with 14–22 lit pixels that touch all four sides.
    """
    if min_distance not in MIN_DISTANCES:
        raise ValueError(
            f"glyph min_distance={min_distance!r}: the detector needs glyphs that a 2-pixel error cannot turn into "
            f"each other and the codebook must exist; allowed {MIN_DISTANCES.start}..{MIN_DISTANCES.stop - 1}"
        )
    rng = np.random.Generator(np.random.PCG64(seed))
    bits_NP = rng.random((_CANDIDATES, GLYPH * GLYPH)) < 0.5
    grid_NGG = bits_NP.reshape(-1, GLYPH, GLYPH)
    lit_N = bits_NP.sum(1)
    full_box = grid_NGG[:, 0].any(1) & grid_NGG[:, -1].any(1) & grid_NGG[:, :, 0].any(1) & grid_NGG[:, :, -1].any(1)
    pool_NP = bits_NP[(lit_N >= _LIT_RANGE[0]) & (lit_N <= _LIT_RANGE[1]) & full_box]
    chosen: list[np.ndarray] = []
    for bits_P in pool_NP:
        if not chosen or (np.stack(chosen) != bits_P).sum(1).min() >= min_distance:
            chosen.append(bits_P)
            if len(chosen) == n:
                glyphs = np.stack(chosen).reshape(n, GLYPH, GLYPH)
                glyphs.flags.writeable = False
                return glyphs
    raise ValueError(
        f"glyph min_distance={min_distance}: only {len(chosen)} of {n} glyphs found that far apart; "
        f"allowed {MIN_DISTANCES.start}..{MIN_DISTANCES.stop - 1}"
    )


def min_pairwise_distance(glyphs: np.ndarray) -> int:
    """Smallest number of pixels in which two glyphs of the set differ."""
    flat = glyphs.reshape(len(glyphs), -1)
    distances = (flat[:, None] != flat[None]).sum(-1)
    np.fill_diagonal(distances, flat.shape[1] + 1)
    return int(distances.min())


# --- prompts (GenEval's wording) ------------------------------------------------------------------------------


def _article(phrase: str) -> str:
    return "an" if phrase[0] in "aeiou" else "a"


def plural(name: str) -> str:
    """GenEval's plural: "+es" after a final s, else "+s" (so "benchs", "sheeps", "knifes")."""
    return name + "es" if name.endswith("s") else name + "s"


def _noun_phrase(clause: dict) -> str:
    words = f"{clause['color']} {clause['class']}" if "color" in clause else clause["class"]
    return f"{_article(words)} {words}"


def prompt_of(metadata: dict) -> str:
    """GenEval's prompt for a metadata dict (reproduces all 553 of its evaluation prompts)."""
    include, tag = metadata["include"], metadata["tag"]
    if tag == "counting":
        return f"a photo of {NUMBERS[include[0]['count']]} {plural(include[0]['class'])}"
    if tag == "position":
        return f"a photo of {_noun_phrase(include[1])} {include[1]['position'][0]} {_noun_phrase(include[0])}"
    return "a photo of " + " and ".join(_noun_phrase(c) for c in include)


def _metadata(tag: str, include: list[dict], exclude: list[dict] | None = None) -> dict:
    md: dict = {"tag": tag, "include": include}
    if exclude is not None:
        md["exclude"] = exclude
    md["prompt"] = prompt_of(md)
    return md


def random_metadata(task: str, rng: np.random.Generator) -> dict:
    """A uniformly random composition of `task` in GenEval's schema (may be one of its evaluation prompts)."""
    cls = [CLASSES[int(i)] for i in rng.choice(len(CLASSES), size=2, replace=False)]
    col = [GLYPH_COLORS[int(i)] for i in rng.choice(len(GLYPH_COLORS), size=2, replace=False)]
    if task == "single_object":
        return _metadata(task, [{"class": cls[0], "count": 1}])
    if task == "two_object":
        return _metadata(task, [{"class": cls[0], "count": 1}, {"class": cls[1], "count": 1}])
    if task == "counting":
        n = int(rng.integers(2, 5))
        return _metadata(task, [{"class": cls[0], "count": n}], [{"class": cls[0], "count": n + 1}])
    if task == "colors":
        return _metadata(task, [{"class": cls[0], "count": 1, "color": col[0]}])
    if task == "position":
        relation = RELATIONS[int(rng.integers(len(RELATIONS)))]
        return _metadata(
            task, [{"class": cls[1], "count": 1}, {"class": cls[0], "count": 1, "position": [relation, 0]}]
        )
    if task == "color_attr":
        return _metadata(
            task,
            [{"class": cls[0], "count": 1, "color": col[0]}, {"class": cls[1], "count": 1, "color": col[1]}],
        )
    raise ValueError(f"task={task!r}: must be one of {TASKS}")


def check_vocabulary(metadata: list[dict], source: str) -> None:
    """ValueError naming the first class or colour outside the glyph world's vocabulary."""
    for n, md in enumerate(metadata, 1):
        for clause in md.get("include", []) + md.get("exclude", []):
            if clause.get("class") not in CLASSES:
                raise ValueError(
                    f"{source}, prompt {n} ({md.get('prompt')!r}): class {clause.get('class')!r} is not in the glyph "
                    "world's vocabulary (GenEval's 80 object names, evaluation/data/geneval/object_names.txt)"
                )
            if "color" in clause and clause["color"] not in GLYPH_COLORS:
                raise ValueError(
                    f"{source}, prompt {n} ({md.get('prompt')!r}): color {clause['color']!r} is not one of "
                    f"{', '.join(GLYPH_COLORS)}"
                )


# --- the world ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Glyph:
    """One rendered object; box is (x1, y1, x2, y2) in pixels with x2, y2 exclusive."""

    name: str
    color: str
    box: tuple[int, int, int, int]


@dataclass
class GlyphWorld:
    """Prompt sampler and renderer of the GenEval-glyphs world; evaluation prompts are GenEval's own 553."""

    size: int = 32
    """Image side in pixels: a multiple of 8, >= 32 (a board of at least 4×4 cells)."""
    min_distance: int = 12
    """Pixels in which every two glyphs differ (the codebook's minimum Hamming distance)."""
    glyph_seed: int = 0
    """Seed of the glyph codebook: another seed is another, equally valid, set of 80 glyphs."""
    task_weights: dict[str, float] | None = None
    """Training sampling weight per task among TRAIN_TASKS (others get 0); None samples them uniformly."""

    def __post_init__(self) -> None:
        if not isinstance(self.size, int) or self.size < 4 * CELL or self.size % CELL:
            raise ValueError(f"glyph world size={self.size!r}: must be a multiple of {CELL} and >= {4 * CELL}")
        self.glyphs = codebook(len(CLASSES), self.min_distance, self.glyph_seed)
        weights = self.task_weights if self.task_weights is not None else dict.fromkeys(TRAIN_TASKS, 1.0)
        if set(weights) - set(TRAIN_TASKS) or any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
            raise ValueError(
                f"glyph world task_weights={self.task_weights!r}: keys must be among {TRAIN_TASKS} "
                "(single_object prompts are all evaluation prompts), weights >= 0 with a positive sum"
            )
        self._task_probs = np.array([weights.get(t, 0.0) for t in TRAIN_TASKS], dtype=np.float64)
        self._task_probs /= self._task_probs.sum()
        self._eval = geneval_metadata()
        self._eval_prompts = {md["prompt"] for md in self._eval}
        self.cells_per_side = self.size // CELL

    def is_heldout(self, metadata: dict) -> bool:
        """True for GenEval's evaluation prompts, which training never produces."""
        return metadata["prompt"] in self._eval_prompts

    def sample_metadata(self, rng: np.random.Generator) -> dict:
        """A random training prompt: task by `task_weights`, then a uniform composition that is not an eval prompt."""
        task = TRAIN_TASKS[int(rng.choice(len(TRAIN_TASKS), p=self._task_probs))]
        while True:
            metadata = random_metadata(task, rng)
            if metadata["prompt"] not in self._eval_prompts:
                return metadata

    def _cell_box(self, cell: int) -> tuple[int, int, int, int]:
        row, col = divmod(cell, self.cells_per_side)
        x1, y1 = col * CELL + 1, row * CELL + 1
        return (x1, y1, x1 + GLYPH, y1 + GLYPH)

    def _relation_cells(self, relation: str, rng: np.random.Generator) -> tuple[int, int]:
        """(subject cell, reference cell) in one row (left/right of) or one column (above/below)."""
        n = self.cells_per_side
        line, a, b = int(rng.integers(n)), *(int(i) for i in rng.choice(n, size=2, replace=False))
        first, second = min(a, b), max(a, b)
        subject, reference = (first, second) if relation in ("left of", "above") else (second, first)
        if relation in ("left of", "right of"):
            return line * n + subject, line * n + reference
        return subject * n + line, reference * n + line

    def render(self, metadata: dict, rng: np.random.Generator) -> tuple[np.ndarray, list[Glyph]]:
        """An image that satisfies `metadata` exactly (the objects named, nothing else) and its objects."""
        include = metadata.get("include", [])
        check_vocabulary([metadata], "glyph world metadata")
        specs = []  # (class, colour) per object, in include order
        for clause in include:
            for _ in range(clause["count"]):
                color = clause.get("color") or GLYPH_COLORS[int(rng.integers(len(GLYPH_COLORS)))]
                specs.append((clause["class"], color))
        if not 1 <= len(specs) <= 4:
            raise ValueError(f"metadata asks for {len(specs)} objects: the glyph world renders 1 to 4")
        if any("position" in clause for clause in include):
            if len(include) != 2 or len(specs) != 2 or include[1].get("position", [None, None])[1] != 0:
                raise ValueError("position metadata must be [reference, subject with position [relation, 0]]")
            relation = include[1]["position"][0]
            if relation not in RELATIONS:
                raise ValueError(f"position relation={relation!r}: must be one of {RELATIONS}")
            subject, reference = self._relation_cells(relation, rng)
            cells = [reference, subject]
        else:
            cells = [int(c) for c in rng.choice(self.cells_per_side**2, size=len(specs), replace=False)]
        objects = [Glyph(name, color, self._cell_box(c)) for (name, color), c in zip(specs, cells, strict=True)]
        return self.draw(objects), objects

    def draw(self, objects: list[Glyph]) -> np.ndarray:
        """Paint glyphs on the grey background: uint8 (size, size, 3)."""
        image = np.empty((self.size, self.size, 3), dtype=np.uint8)
        image[:] = GLYPH_BACKGROUND
        for obj in objects:
            x1, y1, x2, y2 = obj.box
            image[y1:y2, x1:x2][self.glyphs[CLASSES.index(obj.name)]] = GLYPH_PALETTE[obj.color]
        return image

    def train_sample(self, seed: int) -> tuple[np.ndarray, dict]:
        """Deterministic training pair from `seed`: (uint8 image (size, size, 3), metadata)."""
        rng = np.random.Generator(np.random.PCG64(seed))
        metadata = self.sample_metadata(rng)
        image, _ = self.render(metadata, rng)
        return image, metadata

    def heldout_metadata(self, counts: dict[str, int] | None = None, seed: int = 0) -> list[dict]:
        """Evaluation prompts: GenEval's own, in file order; `counts` takes a seeded subset per task.

        None (or counts at least GenEval's per task) gives all 553 prompts unchanged. Smaller counts (validation,
        quick evaluations) draw that many prompts of each task without repetition, kept in file order.
        """
        if counts is None:
            return copy.deepcopy(self._eval)
        unknown = set(counts) - set(TASKS)
        if unknown or any(not isinstance(n, int) or n < 0 for n in counts.values()):
            raise ValueError(f"counts={counts!r}: keys must be among {TASKS}, values non-negative integers")
        rng = np.random.Generator(np.random.PCG64(seed))
        keep: list[int] = []
        for task in TASKS:
            indices = [i for i, md in enumerate(self._eval) if md["tag"] == task]
            n = min(counts.get(task, 0), len(indices))
            keep += [indices[int(j)] for j in rng.choice(len(indices), size=n, replace=False)]
        return [copy.deepcopy(self._eval[i]) for i in sorted(keep)]
