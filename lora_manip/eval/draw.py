"""Draw ground truth and predictions over images for a visual check (PIL only, no torch).

Values are the parsed ones (see `lora_manip.answers.parse`) in normalised [0, 1] coordinates: a box
``(x1, y1, x2, y2)``, a list of ``(x, y)`` points or trajectory waypoints; lists from ``predictions.jsonl`` work too.
Ground truth is green, the prediction red.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from PIL import Image, ImageDraw, ImageFont

__all__ = ["draw_overlay", "contact_sheet", "GT_COLOR", "PRED_COLOR"]

GT_COLOR = (0, 200, 0)
PRED_COLOR = (230, 0, 0)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _points(value: Any) -> list[tuple[float, float]]:
    out = []
    try:
        for p in value:
            x, y = float(p[0]), float(p[1])
            if math.isfinite(x) and math.isfinite(y):
                out.append((x, y))
    except (TypeError, ValueError, IndexError):
        return []
    return out


def _box(value: Any) -> tuple[float, float, float, float] | None:
    try:
        x1, y1, x2, y2 = (float(v) for v in value)
    except (TypeError, ValueError):
        return None
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        return None
    return min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)


def _draw_value(d: ImageDraw.ImageDraw, kind: str, value: Any, color, size: tuple[int, int], lw: int, r: int) -> bool:
    """Draw one parsed value; return False when there was nothing drawable."""
    w, h = size
    if value is None:
        return False
    if kind == "box":
        b = _box(value)
        if b is None:
            return False
        d.rectangle([b[0] * w, b[1] * h, b[2] * w, b[3] * h], outline=color, width=lw)
        return True
    if kind in ("point", "trajectory"):
        pts = [(x * w, y * h) for x, y in _points(value)]
        if not pts:
            return False
        if kind == "trajectory" and len(pts) > 1:
            d.line(pts, fill=color, width=lw)
        for i, (x, y) in enumerate(pts):
            last = kind == "trajectory" and i == len(pts) - 1 and i > 0
            rr = r + 2 if last else r  # a bigger dot at a trajectory's end
            hollow = kind == "trajectory" and i == 0 and len(pts) > 1  # a ring at its start
            d.ellipse([x - rr, y - rr, x + rr, y + rr], fill=None if hollow else color, outline=color,
                      width=max(1, lw))
        return True
    return False


def draw_overlay(image: Image.Image, kind: str, gt_value: Any, pred_value: Any) -> Image.Image:
    """Return a copy of `image` (RGB) with the ground truth in green and the prediction in red, plus a legend.

    Boxes are rectangles, points dots, trajectories polylines with a dot per waypoint (hollow at the start, larger
    at the end). For choice / yes-no / planning the values are written as text. The input image is not modified.
    """
    img = image.convert("RGB")  # always a new image
    w, h = img.size
    d = ImageDraw.Draw(img)
    lw = max(1, round(min(w, h) / 160))
    r = max(2, round(min(w, h) / 80))
    fsize = max(8, min(24, round(min(w, h) / 20)))
    font = _font(fsize)
    gt_ok = _draw_value(d, kind, gt_value, GT_COLOR, (w, h), lw, r)
    pred_ok = _draw_value(d, kind, pred_value, PRED_COLOR, (w, h), lw, r)
    if kind in ("box", "point", "trajectory"):
        lines = [("GT" if gt_ok else "GT: -", GT_COLOR), ("pred" if pred_ok else "pred: unparsed", PRED_COLOR)]
    else:
        def show(v: Any) -> str:
            if v is None:
                return "unparsed"
            if isinstance(v, bool):
                return "yes" if v else "no"
            s = str(v)
            return s if len(s) <= 40 else s[:37] + "..."

        lines = [(f"GT: {show(gt_value)}", GT_COLOR), (f"pred: {show(pred_value)}", PRED_COLOR)]
    # legend: a dark box in the top-left corner
    pad = max(2, fsize // 4)
    sizes = [d.textbbox((0, 0), t, font=font) for t, _ in lines]
    lh = max(b[3] - b[1] for b in sizes) + pad
    bw = max(b[2] - b[0] for b in sizes) + 2 * pad
    d.rectangle([0, 0, min(bw, w - 1), min(lh * len(lines) + pad, h - 1)], fill=(0, 0, 0))
    for i, (t, c) in enumerate(lines):
        d.text((pad, pad + i * lh), t, fill=c, font=font)
    return img


def contact_sheet(images: Sequence[Image.Image], columns: int = 4, thumb: int = 256) -> Image.Image:
    """Tile `images` into a grid of ``thumb`` x ``thumb`` cells (aspect kept, centred), ``columns`` per row.

    The sheet is ``min(columns, n) * thumb`` wide and ``ceil(n / columns) * thumb`` high. Raises ValueError for no
    images or a non-positive `columns` / `thumb`.
    """
    images = list(images)
    if not images:
        raise ValueError("contact_sheet needs at least one image")
    if columns < 1 or thumb < 1:
        raise ValueError(f"columns and thumb must be positive (got columns={columns}, thumb={thumb})")
    cols = min(columns, len(images))
    rows = math.ceil(len(images) / cols)
    sheet = Image.new("RGB", (cols * thumb, rows * thumb), (32, 32, 32))
    for i, im in enumerate(images):
        t = im.convert("RGB")
        t.thumbnail((thumb, thumb))
        x = (i % cols) * thumb + (thumb - t.width) // 2
        y = (i // cols) * thumb + (thumb - t.height) // 2
        sheet.paste(t, (x, y))
    return sheet
