"""Point-in-mask accuracy, as RoboPoint's Where2Place scorer defines it (numpy + PIL, no torch).

Used by Where2Place, RoboRefIt, RoboSpatial and RefSpatial-style pointing: a question's score is the mean, over the
points the model gave, of the mask value at each point (mask / 255, so a soft or JPEG mask gives partial credit);
a point off the image scores 0.

Two ways of reading the answer:

- strict (the kit's): the kit's parser (any format answers/geometry.py reads, units from ``--coords``); an answer with no
  point scores 0 and counts as a parse failure. Pixel index = floor(coordinate), so -0.2 px is off the image.
- upstream (`robopoint_accuracy`, RoboPoint's ``robopoint/eval/summarize_vqa.py``): only parenthesised tuples
  ``(x, y)`` / ``(x0, y0, x1, y1)``; a number with a "." is a fraction of the image, one without is a pixel, decided
  per tuple (a 2-tuple is scaled when either number has a "."; a 4-tuple when its first number has one); a 4-tuple
  stands for every pixel of that box; coordinates are truncated toward zero (``int()``); an answer with no tuple
  scores 0, and an answer whose reading raises (e.g. a box with a pixel x0 and fractional y0) is skipped. RoboPoint
  scales fractions by 640x480, the size of every Where2Place image; here by the mask's size, which is the same
  there and right for the other sets.

Masks are read by the kit's one image reader (data/images.load_mask): grey levels in [0, 1] whatever the file's
mode (a 1-bit PNG's set pixels count 1, a 16-bit mask is scaled by 65535), a 0/1 mask as binary, upright by its
EXIF orientation. A mask path is confined to its roots (the predictions' folder, --data-root) as image paths are.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import numpy as np

__all__ = ["load_mask", "mask_accuracy", "robopoint_points", "robopoint_accuracy"]

_TUPLE_RE = re.compile(r"\(([-+]?\d+\.?\d*(?:,\s*[-+]?\d+\.?\d*)*?)\)")


def load_mask(path: str | os.PathLike) -> np.ndarray:
    """The mask as float values in [0, 1], shape (height, width). Raises data.images.ImageError (a UserError,
    one line naming the file) when unreadable."""
    from ..data.images import load_mask as read

    return read(path)


def _mean_at(mask: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> float:
    h, w = mask.shape
    inside = (xs >= 0) & (xs < w) & (ys >= 0) & (ys < h)
    values = np.zeros(len(xs))
    values[inside] = mask[ys[inside], xs[inside]]
    return float(values.mean()) if len(values) else 0.0


def mask_accuracy(points: list[tuple[float, float]], mask: np.ndarray) -> float:
    """Strict: `points` in [0, 1] units; the mean mask value at their pixels (0 off the image, 0 without points)."""
    h, w = mask.shape
    finite = [(x, y) for x, y in points if math.isfinite(x) and math.isfinite(y)]
    if not points:
        return 0.0
    xs = np.array([math.floor(x * w) for x, _ in finite] + [-1] * (len(points) - len(finite)), dtype=np.int64)
    ys = np.array([math.floor(y * h) for _, y in finite] + [-1] * (len(points) - len(finite)), dtype=np.int64)
    return _mean_at(mask, xs, ys)


def _number(text: str) -> int | float:
    return float(text) if "." in text else int(text)


def robopoint_points(text: str, width: int, height: int) -> np.ndarray:
    """Pixel points (N, 2) as RoboPoint reads them; may raise, as RoboPoint's reader does on odd tuples."""
    points: list = []
    for match in _TUPLE_RE.findall(text):
        v = [_number(s) for s in match.split(",")]
        if len(v) == 2:
            x, y = v
            if isinstance(x, float) or isinstance(y, float):
                x, y = int(x * width), int(y * height)
            points.append((x, y))
        elif len(v) == 4:
            x0, y0, x1, y1 = v
            if isinstance(x0, float):
                x0, y0, x1, y1 = int(x0 * width), int(y0 * height), int(x1 * width), int(y1 * height)
            region = np.zeros((height, width), dtype=bool)
            region[y0:y1, x0:x1] = True  # numpy slicing: negative ends count from the far edge, as upstream's do
            yy, xx = np.where(region)
            points.extend(zip(xx.tolist(), yy.tolist()))
    return np.array(points, dtype=np.int64).reshape(-1, 2)


def robopoint_accuracy(text: str, mask: np.ndarray) -> float | None:
    """Upstream: the answer's accuracy, or None when RoboPoint would skip it (its reader raised)."""
    h, w = mask.shape
    try:
        pts = robopoint_points(text, w, h)
    except (TypeError, ValueError, OverflowError):
        return None
    if len(pts) == 0:
        return 0.0
    return _mean_at(mask, pts[:, 0], pts[:, 1])


def resolve_mask(mask: str, roots: list[Path]) -> Path | None | str:
    """The first existing `mask` under `roots`; None when there is none; "escapes" when the path leads out of every
    root (`..`, an absolute path elsewhere), which is never read."""
    from ..data.files import path_under

    inside = [p for p in (path_under(root, mask) for root in roots) if p is not None]
    if not inside:
        return "escapes"
    for p in inside:
        if Path(p).is_file():
            return Path(p)
    return None
