"""GenEval's numeric conventions, so that our verdicts equal those of its ``evaluate_images.py`` on every image.

GenEval (djghosh13/geneval) scores mmdet's per-class float32 arrays of rows [x1, y1, x2, y2, score], inside the
environment its ``environment.yml`` pins (numpy 1.23.1). Its clauses are easy to restate; its numerics are what a
"cleaner" reimplementation gets wrong on about 1.5% of random detections. We follow them, not nicer ones, because the
point of the number is to be comparable with published GenEval scores:

- **float32 everywhere.** Scores and boxes are rounded to float32 first (how mmdet stores them). The threshold test
  ``scores > 0.3`` runs on a float32 array, so numpy casts 0.3 to float32 too: a score equal to float32(0.3) fails,
  although in float64 it is 0.300000012 and would pass. Relative positions (centres, sizes, margin, offsets, norm) are
  float32 arithmetic, so positions within ~1e-7 of the ±0.5 direction boundary land where GenEval puts them.
- **Tie order of ``np.argsort(scores)[::-1]``.** numpy's default argsort is an unstable introsort; which of two equal
  scores GenEval visits first decides which detection is "found" for colour and position clauses, and which ones
  survive the 16-per-class cap. numpy ≥ 1.25 hands argsort to SIMD sorts on some CPUs, and those order ties
  differently, so `numpy123_argsort` re-implements the algorithm of the pinned numpy (``aquicksort_`` in
  numpy/core/src/npysort/quicksort.cpp, BSD-3): up to 16 values are insertion-sorted (stable: after the reversal the
  later of two equal scores comes first), longer arrays are partitioned around a median of three.
- **NMS (off by default).** GenEval's IoU mixes a float32 width ``x2 - x1`` with the Python int 1; numpy 1.23 promotes
  such scalar arithmetic to float64, and so does `box_iou`.

Where we deliberately differ from GenEval: a NaN score or box coordinate raises (GenEval silently drops NaN scores
and lets NaN boxes fail every relation), and relation lists in failure reasons are sorted (GenEval joins a Python
set, whose order depends on the hash seed).

Legend: N detections of one class.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

_SMALL_QUICKSORT = 15
"""numpy's SMALL_QUICKSORT: a partition spanning more than 16 elements is split, a smaller one insertion-sorted."""


def float32_rows(detections: Sequence[dict[str, Any]], where: str = "") -> np.ndarray:
    """(N, 5) float32 [x1, y1, x2, y2, score] of detection dicts, as mmdet would hold them; NaN raises ValueError."""
    rows_N5 = np.asarray([[*d["box"][:4], d["score"]] for d in detections], dtype=np.float32).reshape(-1, 5)
    bad = np.flatnonzero(np.isnan(rows_N5).any(1))
    if len(bad):
        i = int(bad[0])
        what = "score" if np.isnan(rows_N5[i, 4]) else "box"
        raise ValueError(
            f"{where}detection {i} has a NaN {what} (box {list(detections[i]['box'][:4])}, score "
            f"{detections[i]['score']}); the detector output is broken"
        )
    return rows_N5


def numpy123_argsort(values: Sequence[float]) -> list[int]:
    """Indices that sort ``values`` ascending, ties ordered exactly as numpy 1.23's default ``np.argsort`` orders them.

    ``values`` must hold no NaN (numpy would sort NaN last; `float32_rows` refuses them before we get here).
    """
    v = [float(x) for x in values]
    a = list(range(len(v)))
    pl, pr = 0, len(v) - 1
    depth = 2 * _msb(len(v))
    stack: list[tuple[int, int, int]] = []
    while True:
        if depth < 0:
            _heapsort(v, a, pl, pr - pl + 1)
        else:
            while pr - pl > _SMALL_QUICKSORT:
                pm = pl + ((pr - pl) >> 1)
                if v[a[pm]] < v[a[pl]]:
                    a[pm], a[pl] = a[pl], a[pm]
                if v[a[pr]] < v[a[pm]]:
                    a[pr], a[pm] = a[pm], a[pr]
                if v[a[pm]] < v[a[pl]]:
                    a[pm], a[pl] = a[pl], a[pm]
                pivot = v[a[pm]]
                pi, pj = pl, pr - 1
                a[pm], a[pj] = a[pj], a[pm]
                while True:
                    pi += 1
                    while v[a[pi]] < pivot:
                        pi += 1
                    pj -= 1
                    while pivot < v[a[pj]]:
                        pj -= 1
                    if pi >= pj:
                        break
                    a[pi], a[pj] = a[pj], a[pi]
                a[pi], a[pr - 1] = a[pr - 1], a[pi]
                # numpy keeps the larger side for later and goes on with the smaller one without a depth check.
                depth -= 1
                if pi - pl < pr - pi:
                    stack.append((pi + 1, pr, depth))
                    pr = pi - 1
                else:
                    stack.append((pl, pi - 1, depth))
                    pl = pi + 1
            for pi in range(pl + 1, pr + 1):
                moving = a[pi]
                pj = pi
                while pj > pl and v[moving] < v[a[pj - 1]]:
                    a[pj] = a[pj - 1]
                    pj -= 1
                a[pj] = moving
        if not stack:
            return a
        pl, pr, depth = stack.pop()


def _msb(n: int) -> int:
    """npy_get_msb: floor(log2 n), 0 for n < 2."""
    bits = 0
    while n > 1:
        n >>= 1
        bits += 1
    return bits


def _heapsort(v: list[float], a: list[int], start: int, n: int) -> None:
    """numpy's aheapsort_ on a[start : start + n] (its introsort fallback when partitions stop shrinking)."""

    def sift(i: int, j: int, n: int, moving: int) -> None:
        while j <= n:
            if j < n and v[a[start + j - 1]] < v[a[start + j]]:
                j += 1
            if not v[moving] < v[a[start + j - 1]]:
                break
            a[start + i - 1] = a[start + j - 1]
            i, j = j, 2 * j
        a[start + i - 1] = moving

    for first in range(n >> 1, 0, -1):
        sift(first, 2 * first, n, a[start + first - 1])
    while n > 1:
        moving = a[start + n - 1]
        a[start + n - 1] = a[start]
        n -= 1
        sift(1, 2, n, moving)


def geneval_order(scores_N: np.ndarray) -> list[int]:
    """The order GenEval visits a class's detections: ``np.argsort(scores)[::-1]`` under numpy 1.23."""
    return numpy123_argsort(scores_N)[::-1]


def relative_position(a_box: Sequence[float], b_box: Sequence[float], margin: float = 0.1) -> set[str]:
    """Relations of box A to box B, in GenEval's float32 arithmetic.

    The centre offset is shrunk by margin·(A size + B size) per axis (never past zero), divided by the length of the
    raw offset, and a component beyond ±0.5 gives left of / right of / above / below.
    """
    boxes_BCX = np.asarray([a_box[:4], b_box[:4]], dtype=np.float32).reshape(2, 2, 2)  # (box, corner, xy)
    if np.isnan(boxes_BCX).any():
        raise ValueError(f"relative_position: NaN coordinate in box {list(a_box[:4])} or {list(b_box[:4])}")
    centre_a, centre_b = boxes_BCX.mean(axis=1)
    size_a, size_b = np.abs(boxes_BCX[:, 1] - boxes_BCX[:, 0])
    offset = centre_a - centre_b
    # GenEval's Python-float margin meets a float32 array, so numpy computes it in float32 (1.23 and NEP 50 alike).
    revised = np.maximum(np.abs(offset) - np.float32(margin) * (size_a + size_b), 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    relations = set()
    if dx < -0.5:
        relations.add("left of")
    if dx > 0.5:
        relations.add("right of")
    if dy < -0.5:
        relations.add("above")
    if dy > 0.5:
        relations.add("below")
    return relations


def box_iou(a_row: np.ndarray, b_row: np.ndarray) -> float:
    """GenEval's IoU of two float32 rows, pixels inclusive (width = x2 - x1 + 1), used only by its optional NMS."""

    def area(x1, y1, x2, y2) -> float:
        # float32 differences, then float64 once the Python int 1 joins in (numpy 1.23's scalar promotion).
        return max(float(x2 - x1) + 1, 0) * max(float(y2 - y1) + 1, 0)

    inter = area(max(a_row[0], b_row[0]), max(a_row[1], b_row[1]), min(a_row[2], b_row[2]), min(a_row[3], b_row[3]))
    union = area(*a_row[:4]) + area(*b_row[:4]) - inter
    return inter / union if union else 0.0
