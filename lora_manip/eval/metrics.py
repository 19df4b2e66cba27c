"""Metrics for boxes, points, trajectories and free text (pure Python + numpy, no torch).

Coordinates are ``(x, y)``; the distance functions work in whatever unit they are given: normalised [0, 1] image
coordinates, or pixels after `to_pixels`.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from itertools import permutations
from typing import Iterable, Sequence

import numpy as np

from ..answers.kinds import KINDS

__all__ = [
    "box_iou",
    "point_distance",
    "dtw_distance",
    "discrete_frechet",
    "endpoint_error",
    "hausdorff_distance",
    "resample_polyline",
    "resample_by_index",
    "trace_rmse_mae",
    "TRACE_POINTS",
    "TRACE_SCALE",
    "bleu",
    "to_pixels",
    "TRAJ_METRICS",
    "summarise_kind",
    "group_by_kind",
]

Point = Sequence[float]


def to_pixels(points: Iterable[Point], w: float, h: float) -> list[tuple[float, float]]:
    """Scale normalised ``(x, y)`` points to pixels of a ``w`` x ``h`` image."""
    return [(float(x) * w, float(y) * h) for x, y in points]


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two ``(x1, y1, x2, y2)`` boxes.

    A box with zero or negative width or height (degenerate, or corners given in the wrong order) has area 0, and
    any IoU involving it is 0. Non-finite coordinates also give 0. Never divides by zero, never returns NaN.
    """
    ax1, ay1, ax2, ay2 = (float(v) for v in a)
    bx1, by1, bx2, by2 = (float(v) for v in b)
    if not all(math.isfinite(v) for v in (ax1, ay1, ax2, ay2, bx1, by1, bx2, by2)):
        return 0.0
    area_a = (ax2 - ax1) * (ay2 - ay1) if ax2 > ax1 and ay2 > ay1 else 0.0
    area_b = (bx2 - bx1) * (by2 - by1) if bx2 > bx1 and by2 > by1 else 0.0
    if area_a <= 0.0 or area_b <= 0.0:
        return 0.0
    iw = min(ax2, bx2) - max(ax1, bx1)
    ih = min(ay2, by2) - max(ay1, by1)
    if iw <= 0.0 or ih <= 0.0:
        return 0.0
    inter = iw * ih
    union = area_a + area_b - inter
    if not union > 0.0 or not math.isfinite(union):
        return 0.0
    return max(0.0, min(1.0, inter / union))


def _as_array(points: Iterable[Point], name: str) -> np.ndarray:
    arr = np.asarray([(float(x), float(y)) for x, y in points], dtype=np.float64).reshape(-1, 2)
    if len(arr) == 0:
        raise ValueError(f"{name} has no points")
    return arr


def _pairwise(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Euclidean distance matrix, shape (len(a), len(b))."""
    return np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(axis=-1))


def _min_cost_assignment(cost: np.ndarray) -> float:
    """Minimum total cost of assigning every row to a distinct column (rows <= columns).

    Exhaustive search for tiny problems; otherwise the Hungarian method with row/column potentials (O(n^2 m)).
    """
    n, m = cost.shape
    if n == 0:
        return 0.0
    if m <= 6:
        return min(float(sum(cost[i, j] for i, j in enumerate(cols))) for cols in permutations(range(m), n))
    inf = float("inf")
    u = [0.0] * (n + 1)  # row potentials (1-based)
    v = [0.0] * (m + 1)  # column potentials; column 0 is a virtual start
    owner = [0] * (m + 1)  # owner[j]: row (1-based) assigned to column j, 0 if free
    prev = [0] * (m + 1)
    c = cost.tolist()
    for row in range(1, n + 1):
        owner[0] = row
        j0 = 0
        best = [inf] * (m + 1)
        done = [False] * (m + 1)
        while True:  # grow a shortest augmenting path from `row` until it reaches a free column
            done[j0] = True
            i0 = owner[j0]
            delta, j1 = inf, 0
            for j in range(1, m + 1):
                if done[j]:
                    continue
                reduced = c[i0 - 1][j - 1] - u[i0] - v[j]
                if reduced < best[j]:
                    best[j], prev[j] = reduced, j0
                if best[j] < delta:
                    delta, j1 = best[j], j
            for j in range(m + 1):
                if done[j]:
                    u[owner[j]] += delta
                    v[j] -= delta
                else:
                    best[j] -= delta
            j0 = j1
            if owner[j0] == 0:
                break
        while j0:  # flip the path
            j1 = prev[j0]
            owner[j0] = owner[j1]
            j0 = j1
    return float(sum(c[owner[j] - 1][j - 1] for j in range(1, m + 1) if owner[j]))


def point_distance(pred_points: Iterable[Point], gt_points: Iterable[Point]) -> float:
    """Mean Euclidean distance between predicted and ground-truth points under the best one-to-one matching.

    With 2 points each this is the smaller of the two pairings' means. When the counts differ, only
    ``min(len(pred), len(gt))`` pairs are matched (the cheapest such matching) and the mean is over those pairs:
    missing or extra points are NOT penalised here; compare the counts separately if that matters.
    Raises ValueError when either side is empty.
    """
    p = _as_array(pred_points, "pred_points")
    g = _as_array(gt_points, "gt_points")
    d = _pairwise(p, g)
    if d.shape[0] > d.shape[1]:
        d = d.T
    return _min_cost_assignment(d) / d.shape[0]


def dtw_distance(a: Iterable[Point], b: Iterable[Point]) -> float:
    """Dynamic time warping distance, as upstream defines it: the SUM (not the mean) of the Euclidean distances
    along the optimal monotone alignment of the two sequences (steps (1,0), (0,1), (1,1)); lengths may differ.
    Raises ValueError when either sequence is empty."""
    d = _pairwise(_as_array(a, "a"), _as_array(b, "b"))
    n, m = d.shape
    acc = np.full((n + 1, m + 1), np.inf)
    acc[0, 0] = 0.0
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            acc[i, j] = d[i - 1, j - 1] + min(acc[i - 1, j], acc[i, j - 1], acc[i - 1, j - 1])
    return float(acc[n, m])


def discrete_frechet(a: Iterable[Point], b: Iterable[Point]) -> float:
    """Discrete Fréchet distance: the smallest, over monotone couplings, of the largest point-to-point distance.
    Raises ValueError when either sequence is empty."""
    d = _pairwise(_as_array(a, "a"), _as_array(b, "b"))
    n, m = d.shape
    ca = np.empty((n, m))
    for i in range(n):
        for j in range(m):
            if i == 0 and j == 0:
                prev = 0.0
            elif i == 0:
                prev = ca[0, j - 1]
            elif j == 0:
                prev = ca[i - 1, 0]
            else:
                prev = min(ca[i - 1, j], ca[i, j - 1], ca[i - 1, j - 1])
            ca[i, j] = max(prev, d[i, j])
    return float(ca[n - 1, m - 1])


def endpoint_error(a: Iterable[Point], b: Iterable[Point]) -> float:
    """Euclidean distance between the last points of two trajectories. Raises ValueError when either is empty."""
    pa, pb = _as_array(a, "a")[-1], _as_array(b, "b")[-1]
    return float(np.hypot(*(pa - pb)))


def hausdorff_distance(a: Iterable[Point], b: Iterable[Point]) -> float:
    """Symmetric Hausdorff distance between two point sets: the largest distance from a point of either set to the
    nearest point of the other (order ignored). Raises ValueError when either is empty."""
    d = _pairwise(_as_array(a, "a"), _as_array(b, "b"))
    return float(max(d.min(axis=1).max(), d.min(axis=0).max()))


# Visual-trace RMSE / MAE on 0-999 coordinates, as VABench-V reports them. The strict scorer's version (the kit's
# own): both traces resampled by ARC LENGTH to TRACE_POINTS points, so two traces along the same path agree however
# their points are spaced, and a one-point trace still has a value. Embodied-R1's published scorer resamples by
# INDEX to the longer trace's length and leaves out traces under 2 points: `resample_by_index` here, its whole rule
# in upstream.py (`vabench_trace`, used by --upstream-compatible).
TRACE_POINTS = 100
TRACE_SCALE = 999.0


def resample_polyline(points: Iterable[Point], n: int) -> np.ndarray:
    """`n` points evenly spaced by arc length along the polyline (first and last kept). A single point, or a
    trace of zero length, repeats its first point. Raises ValueError when empty or ``n < 1``."""
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    p = _as_array(points, "points")
    seg = np.hypot(*np.diff(p, axis=0).T) if len(p) > 1 else np.zeros(0)
    cum = np.concatenate([[0.0], np.cumsum(seg)])
    if len(p) == 1 or cum[-1] <= 0.0:
        return np.repeat(p[:1], n, axis=0)
    t = np.linspace(0.0, cum[-1], n)
    return np.stack([np.interp(t, cum, p[:, 0]), np.interp(t, cum, p[:, 1])], axis=1)


def resample_by_index(points: Iterable[Point], n: int) -> np.ndarray:
    """`n` points linearly interpolated at evenly spaced positions of the point INDEX (0 .. len - 1): the first and
    last points kept, each segment getting the same share of the new points whatever its length. A trace of one
    point, or ``n < 2``, is returned as it is. Raises ValueError when empty."""
    p = _as_array(points, "points")
    if len(p) < 2 or n < 2:
        return p
    at = np.linspace(0.0, len(p) - 1.0, n)
    old = np.arange(len(p), dtype=np.float64)
    return np.stack([np.interp(at, old, p[:, 0]), np.interp(at, old, p[:, 1])], axis=1)


def trace_rmse_mae(pred: Iterable[Point], gt: Iterable[Point], n: int = TRACE_POINTS,
                   scale: float = TRACE_SCALE) -> tuple[float, float]:
    """(RMSE, MAE) between two traces given in [0, 1] units, after resampling both by arc length to `n` points and
    scaling coordinates to 0-`scale`: RMSE = sqrt(mean over points of the squared Euclidean distance), MAE = mean
    over points and axes of the absolute difference. Raises ValueError when either trace is empty."""
    diff = (resample_polyline(pred, n) - resample_polyline(gt, n)) * scale
    return float(np.sqrt(np.mean(np.sum(diff * diff, axis=1)))), float(np.mean(np.abs(diff)))


_TOKEN_RE = re.compile(r"\w+|[^\w\s]")


def _tokens(text: str) -> list[str]:
    """Lower-case words and individual punctuation marks ("Pick up the cube." -> pick, up, the, cube, .)."""
    return _TOKEN_RE.findall(text.lower())


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def bleu(candidate: str, reference: str) -> float:
    """Sentence BLEU: the average of cumulative BLEU-1, BLEU-2, BLEU-3 and BLEU-4, in [0, 1].

    BLEU-n = BP * exp(mean(log p_1 .. log p_n)), with p_k the clipped k-gram precision and BP the brevity penalty
    ``exp(1 - len(ref) / len(cand))`` when the candidate is not longer than the reference (else 1).

    Smoothing: p_1 is NOT smoothed (no unigram in common gives 0), while for k > 1 ``p_k = (matches + 1) /
    (total + 1)`` (add-one), so a short or partly matching sentence still gets a non-zero BLEU-3/4; a k-gram order
    that the candidate is too short to have counts as p_k = 1. Tokens: lower-cased words and punctuation marks.
    Two empty texts score 1; one empty text scores 0.
    """
    cand, ref = _tokens(candidate), _tokens(reference)
    if not cand and not ref:
        return 1.0
    if not cand or not ref:
        return 0.0
    bp = 1.0 if len(cand) > len(ref) else math.exp(1.0 - len(ref) / len(cand))
    log_p = []
    for k in range(1, 5):
        c_ng, r_ng = _ngrams(cand, k), _ngrams(ref, k)
        matches = sum(min(cnt, r_ng[g]) for g, cnt in c_ng.items())
        total = max(len(cand) - k + 1, 0)
        if k == 1:
            if matches == 0:
                return 0.0
            log_p.append(math.log(matches / total))
        else:
            log_p.append(math.log((matches + 1) / (total + 1)))
    scores = [bp * math.exp(sum(log_p[:n]) / n) for n in range(1, 5)]
    return float(sum(scores) / 4)


# --------------------------------------------------------------------------------------------------------------------
# One kind's records -> its numbers (score.py's summary; rows as score.py makes them)

TRAJ_METRICS = ("dtw", "frechet", "hausdorff", "endpoint_error")


def _mean(xs: list[float]) -> float | None:
    return float(sum(xs) / len(xs)) if xs else None


def summarise_kind(kind: str, rows: list[dict], thr: float) -> dict:
    """A kind's numbers over its scored rows: count, parse failures and the kind's metrics."""
    n = len(rows)
    fails = sum(1 for r in rows if r.get("parse_error") is not None)
    out: dict[str, Any] = {"count": n, "parse_failures": fails, "parse_failure_rate": fails / n if n else 0.0}
    if kind == "box":
        ious = [r["iou"] for r in rows]
        out["mean_iou"] = _mean(ious)
        out["acc@0.1"] = _mean([1.0 if x > 0.1 else 0.0 for x in ious])  # the published RoboInter metric
        out["acc@0.5"] = _mean([1.0 if x >= 0.5 else 0.0 for x in ious])
    elif kind == "point":
        out["mean_distance"] = _mean([r["distance"] for r in rows if r["distance"] is not None])
        px = [r["distance_px"] for r in rows if r.get("distance_px") is not None]
        if px:
            out["mean_distance_px"] = _mean(px)
        out[f"acc@{thr:g}"] = _mean([1.0 if r["hit"] else 0.0 for r in rows])
    elif kind == "trajectory" and any("upstream_points" in r for r in rows):
        kept = [r["dtw_px"] for r in rows if r["dtw_px"] > 0]  # upstream drops zero DTW
        out.update(dtw_px=_mean(kept), n_scored=len(kept), n_dropped=n - len(kept))
    elif kind == "trajectory":
        out["n_scored"] = n - fails
        for name in TRAJ_METRICS + ("trace_rmse", "trace_mae"):
            out[name] = _mean([r[name] for r in rows if r.get(name) is not None])
        for name in TRAJ_METRICS:
            px = [r[name + "_px"] for r in rows if r.get(name + "_px") is not None]
            if px:
                out[name + "_px"] = _mean(px)
                out["n_scored_px"] = len(px)
    elif kind in ("choice", "yesno"):
        out["accuracy"] = _mean([1.0 if r["correct"] else 0.0 for r in rows])
    elif kind == "pointing":
        scored = [r["accuracy"] for r in rows if r["accuracy"] is not None]
        out.update(accuracy=_mean(scored), n_scored=len(scored), skipped=n - len(scored))
    else:
        out["bleu"] = _mean([r["bleu"] for r in rows])
    return out


def group_by_kind(rows: list[dict], thr: float) -> dict[str, dict]:
    return {k: summarise_kind(k, sel, thr) for k in KINDS if (sel := [r for r in rows if r["kind"] == k])}
