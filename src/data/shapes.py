"""The shapes world: a small procedural text-to-image data set whose prompts follow GenEval's six tasks.

No data set can be downloaded here, so the embedded default trains its teacher on renders of coloured shapes
(circle, square, triangle pointing up, plus-shaped cross) on a near-black background. Every prompt comes with
metadata in the exact schema of GenEval's ``evaluation_metadata.jsonl`` ({"tag", "include", ["exclude"],
"prompt"}), so the same scoring rules (``evaluation/geneval.py``) judge shapes images and real COCO images.

Tasks and wording (GenEval's):

- single_object  "a photo of a circle"
- two_object     "a photo of a circle and a square"            (two distinct classes)
- counting       "a photo of three squares"                     (2-4; include n, exclude n+1 = exactly n)
- colors         "a photo of a red circle"
- position       "a photo of a triangle left of a circle"       (include[0] is the reference B, include[1] the
                                                                  subject A with "position": [relation, 0])
- color_attr     "a photo of a red circle and a blue square"    (distinct classes, distinct colours)

Held-out compositions. A composition is a canonical prompt string. For two_object, colors, position and
color_attr a deterministic ``heldout_fraction`` of each task's prompts (ranked by a blake2b hash of the prompt,
skipping any prompt whose removal would leave a class, colour or relation of that task without a training
prompt) is never produced by the training sampler; evaluation draws its prompts from them. single_object
(4 prompts) and counting (12 prompts) are too small to hold anything out: their prompts are shared between
training and evaluation, and only the generation seeds differ.

Determinism: every function takes a ``numpy.random.Generator`` or a seed (PCG64) and never touches global RNG
state, so ``train_sample(seed)`` is the same image on every machine.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
from dataclasses import dataclass

import numpy as np

SHAPES = ("circle", "square", "triangle", "cross")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
COLORS = ("red", "green", "blue", "yellow", "purple", "white")
# Saturated, mutually distant RGB values (every pair > 130 apart, each > 180 from the background).
PALETTE = {
    "red": (228, 36, 36),
    "green": (36, 196, 64),
    "blue": (48, 96, 255),
    "yellow": (244, 220, 40),
    "purple": (172, 56, 224),
    "white": (240, 240, 240),
}
BACKGROUND = (16, 16, 16)
NUMBERS = {2: "two", 3: "three", 4: "four"}
RELATIONS = ("left of", "right of", "above", "below")

TASKS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
GENEVAL_TASK_COUNTS = {
    "single_object": 80,
    "two_object": 99,
    "counting": 80,
    "colors": 94,
    "position": 100,
    "color_attr": 100,
}
HELDOUT_TASKS = ("two_object", "colors", "position", "color_attr")
SPLITS = ("train", "heldout")

# Object side as a fraction of the image side (32 px: 9-14 px for 1-2 objects, 7-10 px for 3-4).
_FEW_OBJECTS_SIDE = (0.28, 0.44)
_MANY_OBJECTS_SIDE = (0.22, 0.31)
_MIN_SIDE_PX = 4
_CELL_MIN_SIDE_PX = 6  # smallest object the detector tells apart reliably in the cell layout
_BORDER_PX = 1
_GAP_PX = 1
# Position task: the perpendicular offset of the centres is at most this fraction of the offset along the
# relation's axis, which keeps GenEval's normalised component on that axis > 0.75 and the other < 0.5.
_MAX_PERPENDICULAR = 0.3


def shape_mask(shape: str, height: int, width: int) -> np.ndarray:
    """Boolean (height, width) raster of `shape` touching all four sides of its box (no anti-aliasing)."""
    if shape not in SHAPES:
        raise ValueError(f"shape={shape!r}: must be one of {SHAPES}")
    if height < 1 or width < 1:
        raise ValueError(f"shape box {height}x{width}: both sides must be >= 1 px")
    # Pixel centres in box coordinates.
    ys = np.arange(height)[:, None] + 0.5
    xs = np.arange(width)[None, :] + 0.5
    if shape == "square":
        return np.ones((height, width), dtype=bool)
    if shape == "circle":
        # A radius a quarter pixel short of the box keeps small circles round rather than square-ish (at 9 px
        # a full-radius disc overlaps the square with IoU 0.85, this one 0.75); it still touches every side.
        ry, rx = height / 2, width / 2
        return ((ys - ry) / (ry - 0.25)) ** 2 + ((xs - rx) / (rx - 0.25)) ** 2 <= 1.0 + 1e-9
    if shape == "triangle":
        # Apex at the top centre, full-width base; row i spans half-width (i + 1) / height * width / 2 so that
        # the top row is never empty.
        half_width = (np.arange(height)[:, None] + 1) / height * (width / 2)
        return np.abs(xs - width / 2) <= half_width + 1e-9
    # Plus-shaped cross with bars a third of the side thick (off-centre by half a pixel when the parities of
    # side and thickness differ; centring by thickening made 7 px crosses overlap circles with IoU 0.89).
    return _bar(height)[:, None] | _bar(width)[None, :]


def _bar(side: int) -> np.ndarray:
    thickness = max(1, round(side / 3))
    start = (side - thickness) // 2
    bar = np.zeros(side, dtype=bool)
    bar[start : start + thickness] = True
    return bar


@dataclass(frozen=True)
class ShapeObject:
    """One rendered object; box is (x1, y1, x2, y2) in pixels with x2, y2 exclusive."""

    shape: str
    color: str
    box: tuple[int, int, int, int]


def render_scene(objects: list[ShapeObject], size: int, background: tuple[int, int, int] = BACKGROUND) -> np.ndarray:
    """Paint `objects` on a plain `background`: uint8 (size, size, 3)."""
    image = np.empty((size, size, 3), dtype=np.uint8)
    image[:] = background
    for obj in objects:
        if obj.color not in PALETTE:
            raise ValueError(f"object color={obj.color!r}: must be one of {COLORS}")
        x1, y1, x2, y2 = obj.box
        if not (0 <= x1 < x2 <= size and 0 <= y1 < y2 <= size):
            raise ValueError(f"object box={obj.box}: must lie inside the {size}x{size} image with x1<x2, y1<y2")
        image[y1:y2, x1:x2][shape_mask(obj.shape, y2 - y1, x2 - x1)] = PALETTE[obj.color]
    return image


# --- prompts and metadata (GenEval's wording and key order) ---------------------------------------------


def single_object_metadata(shape: str) -> dict:
    """GenEval single_object: "a photo of a circle"."""
    return {
        "tag": "single_object",
        "include": [{"class": shape, "count": 1}],
        "prompt": f"a photo of a {shape}",
    }


def two_object_metadata(shape_a: str, shape_b: str) -> dict:
    """GenEval two_object: "a photo of a circle and a square"."""
    return {
        "tag": "two_object",
        "include": [{"class": shape_a, "count": 1}, {"class": shape_b, "count": 1}],
        "prompt": f"a photo of a {shape_a} and a {shape_b}",
    }


def counting_metadata(shape: str, count: int) -> dict:
    """GenEval counting: exactly `count` (include count, exclude count + 1)."""
    return {
        "tag": "counting",
        "include": [{"class": shape, "count": count}],
        "exclude": [{"class": shape, "count": count + 1}],
        "prompt": f"a photo of {NUMBERS[count]} {PLURALS[shape]}",
    }


def colors_metadata(shape: str, color: str) -> dict:
    """GenEval colors: "a photo of a red circle"."""
    return {
        "tag": "colors",
        "include": [{"class": shape, "count": 1, "color": color}],
        "prompt": f"a photo of a {color} {shape}",
    }


def position_metadata(subject: str, relation: str, reference: str) -> dict:
    """GenEval position: include[0] is the reference, include[1] the subject in `relation` to group 0."""
    return {
        "tag": "position",
        "include": [
            {"class": reference, "count": 1},
            {"class": subject, "count": 1, "position": [relation, 0]},
        ],
        "prompt": f"a photo of a {subject} {relation} a {reference}",
    }


def color_attr_metadata(shape_a: str, color_a: str, shape_b: str, color_b: str) -> dict:
    """GenEval color_attr: "a photo of a red circle and a blue square"."""
    return {
        "tag": "color_attr",
        "include": [
            {"class": shape_a, "count": 1, "color": color_a},
            {"class": shape_b, "count": 1, "color": color_b},
        ],
        "prompt": f"a photo of a {color_a} {shape_a} and a {color_b} {shape_b}",
    }


def task_compositions(task: str) -> list[dict]:
    """Every prompt of `task` in a fixed order (ordered class pairs count as different prompts)."""
    pairs = list(itertools.permutations(SHAPES, 2))
    if task == "single_object":
        return [single_object_metadata(s) for s in SHAPES]
    if task == "two_object":
        return [two_object_metadata(a, b) for a, b in pairs]
    if task == "counting":
        return [counting_metadata(s, n) for s in SHAPES for n in NUMBERS]
    if task == "colors":
        return [colors_metadata(s, c) for s in SHAPES for c in COLORS]
    if task == "position":
        return [position_metadata(a, r, b) for a, b in pairs for r in RELATIONS]
    if task == "color_attr":
        color_pairs = list(itertools.permutations(COLORS, 2))
        return [color_attr_metadata(a, ca, b, cb) for a, b in pairs for ca, cb in color_pairs]
    raise ValueError(f"task={task!r}: must be one of {TASKS}")


def _vocabulary(metadata: dict) -> set[str]:
    """The classes, colours and relations a prompt mentions."""
    words = set()
    for clause in metadata["include"]:
        words.add(clause["class"])
        words.update([clause["color"]] if "color" in clause else [])
        words.update([clause["position"][0]] if "position" in clause else [])
    return words


def _prompt_rank(prompt: str) -> bytes:
    return hashlib.blake2b(prompt.encode(), digest_size=16, person=b"shapes-heldout").digest()


def select_heldout(compositions: list[dict], fraction: float) -> set[str]:
    """Prompts held out of training: hash-ranked, keeping every class/colour/relation in training."""
    target = round(fraction * len(compositions))
    train_words = {}  # word -> number of training prompts that mention it
    for md in compositions:
        for word in _vocabulary(md):
            train_words[word] = train_words.get(word, 0) + 1
    heldout = set()
    for md in sorted(compositions, key=lambda m: _prompt_rank(m["prompt"])):
        if len(heldout) >= target:
            break
        words = _vocabulary(md)
        if all(train_words[w] > 1 for w in words):
            heldout.add(md["prompt"])
            for word in words:
                train_words[word] -= 1
    return heldout


# --- layout -------------------------------------------------------------------------------------------------


def _side_range(size: int, n_objects: int) -> tuple[int, int]:
    low, high = _FEW_OBJECTS_SIDE if n_objects <= 2 else _MANY_OBJECTS_SIDE
    return max(_MIN_SIDE_PX, round(low * size)), max(_MIN_SIDE_PX, round(high * size))


def _snapped_sides(low: int, high: int, snap: int) -> list[int]:
    """Multiples of `snap` in [low, high]; the nearest multiple of the range's middle when none falls inside."""
    sides = [s for s in range(snap, high + 1, snap) if s >= low]
    return sides or [max(snap, snap * round((low + high) / 2 / snap))]


def _place_random(
    sides: list[int], size: int, rng: np.random.Generator, snap: int = 1, gap: int | None = None, offset: int = 0
) -> list[tuple[int, int, int, int]] | None:
    """Sequentially place squares of the given sides uniformly among free spots; None if one does not fit.

    With ``snap`` > 1 corners lie on the snap grid (shifted by ``offset``) and objects keep a gap of ``gap`` pixels
    (default one grid cell).
    """
    blocked = np.zeros((size, size), dtype=np.int32)
    boxes = []
    for side in sides:
        # Summed-area table: a top-left corner is free when its side x side window holds no blocked pixel.
        table = np.pad(blocked.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
        window = table[side:, side:] - table[:-side, side:] - table[side:, :-side] + table[:-side, :-side]
        border = _BORDER_PX if snap == 1 else 0
        lo, hi = border, size - border - side
        free = np.argwhere(window[lo : hi + 1, lo : hi + 1] == 0) + lo
        free = free[((free - offset) % snap == 0).all(1)]
        if len(free) == 0:
            return None
        y, x = free[rng.integers(len(free))]
        boxes.append((int(x), int(y), int(x) + side, int(y) + side))
        g = gap if gap is not None else (_GAP_PX if snap == 1 else snap)
        blocked[max(0, y - g) : y + side + g, max(0, x - g) : x + side + g] = 1
    return boxes


def _place_relation(
    side_a: int, side_b: int, relation: str, size: int, rng: np.random.Generator
) -> tuple[tuple[int, int, int, int], tuple[int, int, int, int]]:
    """Boxes of subject A and reference B with A `relation` B, offset mostly along the relation's axis."""
    if relation not in RELATIONS:
        raise ValueError(f"position relation={relation!r}: must be one of {RELATIONS}")
    # Lay out "first before second" along a primary axis (x for left/right, y for above/below).
    first, second = (side_a, side_b) if relation in ("left of", "above") else (side_b, side_a)
    usable = size - 2 * _BORDER_PX
    slack = usable - first - second - _GAP_PX
    assert slack >= 0, "object sides exceed the image; _side_range must keep two objects fitting"
    gap = _GAP_PX + int(rng.integers(slack + 1))
    start1 = _BORDER_PX + int(rng.integers(usable - first - second - gap + 1))
    start2 = start1 + first + gap
    along = (start2 + second / 2) - (start1 + first / 2)
    # Cross-axis: first object anywhere, second within the allowed centre offset and inside the image.
    cross1 = _BORDER_PX + int(rng.integers(usable - first + 1))
    centre1 = cross1 + first / 2
    positions = np.arange(_BORDER_PX, size - _BORDER_PX - second + 1)
    offsets = np.abs(positions + second / 2 - centre1)
    candidates = positions[offsets <= _MAX_PERPENDICULAR * along]
    if len(candidates) == 0:  # only for extreme side ratios: take the most aligned spot
        candidates = positions[offsets == offsets.min()]
    cross2 = int(candidates[rng.integers(len(candidates))])
    box1 = (start1, cross1, start1 + first, cross1 + first)
    box2 = (start2, cross2, start2 + second, cross2 + second)
    if relation in ("above", "below"):
        box1 = (box1[1], box1[0], box1[3], box1[2])
        box2 = (box2[1], box2[0], box2[3], box2[2])
    return (box1, box2) if relation in ("left of", "above") else (box2, box1)


def _place_relation_snapped(
    side_a: int,
    side_b: int,
    relation: str,
    size: int,
    snap: int,
    rng: np.random.Generator,
    gap: int | None = None,
    offset: int = 0,
) -> tuple[tuple[int, int, int, int], tuple[int, int, int, int]]:
    """`_place_relation` on the snap grid (shifted by `offset`): every valid pair of grid corners at least `gap`
    pixels apart along the relation's axis (default one grid cell), one drawn uniformly."""
    if relation not in RELATIONS:
        raise ValueError(f"position relation={relation!r}: must be one of {RELATIONS}")
    gap = snap if gap is None else gap
    corners_a = range(offset, size - side_a + 1, snap)
    corners_b = range(offset, size - side_b + 1, snap)
    axis = 0 if relation in ("left of", "right of") else 1  # coordinate index along the relation's axis
    sign = -1 if relation in ("left of", "above") else 1  # A's centre minus B's centre along the axis
    pairs = []
    for ax, ay, bx, by in itertools.product(corners_a, corners_a, corners_b, corners_b):
        a, b = (ax, ay), (bx, by)
        along = sign * ((a[axis] + side_a / 2) - (b[axis] + side_b / 2))
        across = abs((a[1 - axis] + side_a / 2) - (b[1 - axis] + side_b / 2))
        first_end, second_start = (a[axis] + side_a, b[axis]) if sign < 0 else (b[axis] + side_b, a[axis])
        if along > 0 and second_start - first_end >= gap and across <= _MAX_PERPENDICULAR * along:
            pairs.append((a, b))
    assert pairs, "snapped object sides leave no valid position layout"
    (ax, ay), (bx, by) = pairs[int(rng.integers(len(pairs)))]
    return (ax, ay, ax + side_a, ay + side_a), (bx, by, bx + side_b, by + side_b)


# --- the world ---------------------------------------------------------------------------------------------


@dataclass
class ShapesWorld:
    """Prompt sampler and renderer of the shapes world, with held-out compositions for evaluation."""

    size: int = 32
    """Image side in pixels (square RGB images); >= 16 so that 3-4 objects stay recognisable."""
    heldout_fraction: float = 0.2
    """Fraction of each large task's prompts (two_object, colors, position, color_attr) kept out of training."""
    task_weights: dict[str, float] | None = None
    """Training sampling weight per task (tasks not named get 0); None samples the six tasks uniformly."""
    snap: int = 1
    """Object boxes (corners and sides) lie on a grid of this many pixels; 1 = free placement. ``snap: 4`` puts
    every object on the 4-pixel token grid of a teacher with 4×4 patches."""
    cells: bool = False
    """Cell layout: the image is a grid of ``snap``-pixel cells and each object sits centred in its own cell with
    side ``snap`` − 2 (so neighbours keep a 2-pixel gap). With ``snap: 8`` on 32 px that is a 4×4 board of 6-pixel
    objects, one object per 8×8 token of a teacher with 8×8 patches: the embedded default."""

    def __post_init__(self) -> None:
        if not isinstance(self.size, int) or self.size < 16:
            raise ValueError(f"shapes world size={self.size!r}: must be an integer >= 16")
        min_cells = 3 if self.cells else 6
        if (
            not isinstance(self.snap, int)
            or self.snap < 1
            or self.size % self.snap
            or self.size // self.snap < min_cells
        ):
            raise ValueError(
                f"shapes world snap={self.snap!r}: must be a positive integer dividing size={self.size} "
                f"into at least {min_cells} cells"
            )
        if self.cells and self.snap - 2 < _CELL_MIN_SIDE_PX:
            raise ValueError(
                f"shapes world cells with snap={self.snap}: objects would be {self.snap - 2} px; "
                f"cells need snap >= {_CELL_MIN_SIDE_PX + 2}"
            )
        if not 0.0 <= self.heldout_fraction <= 0.5:
            raise ValueError(f"shapes world heldout_fraction={self.heldout_fraction!r}: must be in [0, 0.5]")
        weights = self.task_weights if self.task_weights is not None else dict.fromkeys(TASKS, 1.0)
        unknown = set(weights) - set(TASKS)
        if unknown or any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
            raise ValueError(
                f"shapes world task_weights={self.task_weights!r}: keys must be among {TASKS}, "
                "weights >= 0 with a positive sum"
            )
        self._task_probs = np.array([weights.get(t, 0.0) for t in TASKS], dtype=np.float64)
        self._task_probs /= self._task_probs.sum()
        self._pools: dict[str, dict[str, list[dict]]] = {"train": {}, "heldout": {}}
        self._heldout_prompts: set[str] = set()
        for task in TASKS:
            compositions = task_compositions(task)
            if task in HELDOUT_TASKS:
                held = select_heldout(compositions, self.heldout_fraction)
                self._heldout_prompts |= held
                self._pools["train"][task] = [m for m in compositions if m["prompt"] not in held]
                self._pools["heldout"][task] = [m for m in compositions if m["prompt"] in held]
            else:
                self._pools["train"][task] = compositions
                self._pools["heldout"][task] = compositions

    def compositions(self, task: str, split: str) -> list[dict]:
        """The prompts of `task` in `split` ("train" or "heldout"); shared tasks return all prompts for both."""
        if split not in SPLITS:
            raise ValueError(f"split={split!r}: must be one of {SPLITS}")
        if task not in TASKS:
            raise ValueError(f"task={task!r}: must be one of {TASKS}")
        return [copy.deepcopy(m) for m in self._pools[split][task]]

    def is_heldout(self, metadata: dict) -> bool:
        """True when the prompt is a held-out composition (never produced by the training sampler)."""
        return metadata["prompt"] in self._heldout_prompts

    def sample_metadata(self, rng: np.random.Generator, split: str = "train") -> dict:
        """A random prompt's metadata from `split`: task by `task_weights`, then a uniform prompt of that task."""
        if split not in SPLITS:
            raise ValueError(f"split={split!r}: must be one of {SPLITS}")
        task = TASKS[int(rng.choice(len(TASKS), p=self._task_probs))]
        pool = self._pools[split][task]
        if not pool:
            raise ValueError(f"task {task!r} has no {split} prompts with heldout_fraction={self.heldout_fraction}")
        return copy.deepcopy(pool[int(rng.integers(len(pool)))])

    def render(self, metadata: dict, rng: np.random.Generator) -> tuple[np.ndarray, list[ShapeObject]]:
        """An image that satisfies `metadata` exactly (objects named, nothing else) and its objects."""
        groups = metadata.get("include", [])
        specs = []  # (shape, colour) per object, in include order
        for clause in groups:
            if clause.get("class") not in SHAPES:
                raise ValueError(f"metadata class={clause.get('class')!r}: must be one of {SHAPES}")
            if clause.get("color", COLORS[0]) not in COLORS:
                raise ValueError(f"metadata color={clause['color']!r}: must be one of {COLORS}")
            for _ in range(clause["count"]):
                color = clause.get("color") or COLORS[int(rng.integers(len(COLORS)))]
                specs.append((clause["class"], color))
        if not 1 <= len(specs) <= 4:
            raise ValueError(f"metadata asks for {len(specs)} objects: the shapes world renders 1 to 4")
        low, high = _side_range(self.size, len(specs))
        choices = [self.snap - 2] if self.cells else _snapped_sides(low, high, self.snap)
        # Cell layout: corners 1 px into each cell, 2 px apart at least; otherwise the snap grid's own gaps.
        grid = {"gap": 2, "offset": 1} if self.cells else {}
        if any("position" in clause for clause in groups):
            if len(groups) != 2 or len(specs) != 2 or groups[1].get("position", [None, None])[1] != 0:
                raise ValueError("position metadata must be [reference, subject with position [relation, 0]]")
            relation = groups[1]["position"][0]
            if self.snap == 1:
                side_b, side_a = (int(s) for s in rng.integers(low, high + 1, size=2))
                box_a, box_b = _place_relation(side_a, side_b, relation, self.size, rng)
            else:
                side_b, side_a = (choices[int(i)] for i in rng.integers(len(choices), size=2))
                box_a, box_b = _place_relation_snapped(side_a, side_b, relation, self.size, self.snap, rng, **grid)
            boxes = [box_b, box_a]
        else:
            boxes = None
            while boxes is None:  # retries are rare (only 4 large objects can paint themselves into a corner)
                if self.snap == 1:
                    sides = [int(s) for s in rng.integers(low, high + 1, size=len(specs))]
                else:
                    sides = [choices[int(i)] for i in rng.integers(len(choices), size=len(specs))]
                boxes = _place_random(sides, self.size, rng, self.snap, **grid)
        objects = [ShapeObject(shape, color, box) for (shape, color), box in zip(specs, boxes, strict=True)]
        return render_scene(objects, self.size), objects

    def train_sample(self, seed: int) -> tuple[np.ndarray, dict]:
        """Deterministic training pair from `seed`: (uint8 image (size, size, 3), metadata)."""
        rng = np.random.Generator(np.random.PCG64(seed))
        metadata = self.sample_metadata(rng, "train")
        image, _ = self.render(metadata, rng)
        return image, metadata

    def heldout_metadata(self, counts: dict[str, int] = GENEVAL_TASK_COUNTS, seed: int = 0) -> list[dict]:
        """Evaluation prompts in GenEval's task order: counts[task] held-out prompts per task.

        A task's held-out prompts are drawn without repetition while they last; when there are fewer than the
        count, whole shuffled passes over them are concatenated (so each repeats a near-equal number of times).
        """
        unknown = set(counts) - set(TASKS)
        if unknown or any(not isinstance(n, int) or n < 0 for n in counts.values()):
            raise ValueError(f"counts={counts!r}: keys must be among {TASKS}, values non-negative integers")
        rng = np.random.Generator(np.random.PCG64(seed))
        entries = []
        for task in TASKS:
            n = counts.get(task, 0)
            pool = self._pools["heldout"][task]
            if n and not pool:
                raise ValueError(f"task {task!r} has no held-out prompts with heldout_fraction={self.heldout_fraction}")
            order: list[int] = []
            while len(order) < n:
                order.extend(int(i) for i in rng.permutation(len(pool)))
            entries.extend(copy.deepcopy(pool[i]) for i in order[:n])
        return entries
