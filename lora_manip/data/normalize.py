"""`lora-manip data normalize`: rewrite an annotation file's grounding answers from pixel coordinates to [0, 1].

Which answers: gpt turns that parse as JSON, at keys ending in bbox/box/point/traj (the same rule as `data check`).
Numbers alternate x, y (points `[x, y]`, corner lists `[[x1, y1], [x2, y2]]`, flat boxes `[x1, y1, x2, y2]`).
Everything else in the file is copied unchanged; the input is never modified (the output is a new file, written
atomically).

Units (`--from`):
  pixels   pixels of the original image: x / width, y / height
  resized  pixels of the image as Qwen2-VL / Qwen2.5-VL resized it (`smart_resize`: sides rounded to multiples of
           28, area clamped to [min_pixels, max_pixels]); this is the "smart_resize_format" of Qwen-VL fine-tuning
           data: x / resized width, y / resized height
  thousand Qwen-VL's integer grid 0..1000: v / 1000 (no image size needed)
Image sizes come from the record's `width`/`height` (or `w`/`h`) fields, else from the image header. A record whose
coordinates are all in [0, 1] already is left as it is and counted; one whose converted coordinates fall outside
the image is a problem (wrong size?), and any problem means no output is written.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from ..answers.coordinates import COORD_KEY, answer_json, numbers
from ..errors import UserError
from ..fsutil import atomic_write_text
from .images import read_image_size
from .records import Problem, RecordIndex

MODES = ("pixels", "resized", "thousand")
QWEN_FACTOR, QWEN_MIN_PIXELS, QWEN_MAX_PIXELS = 28, 56 * 56, 28 * 28 * 16384  # Qwen2.5-VL processor defaults
_TOLERANCE = 1e-6


def smart_resize(height: int, width: int, factor: int = QWEN_FACTOR, min_pixels: int = QWEN_MIN_PIXELS,
                 max_pixels: int = QWEN_MAX_PIXELS) -> tuple[int, int]:
    """(height, width) of an image after Qwen2-VL's resize: each side a multiple of `factor`, the area within
    [min_pixels, max_pixels], the aspect ratio kept as closely as that allows."""
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        scale = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / scale / factor) * factor)
        w = max(factor, math.floor(width / scale / factor) * factor)
    elif h * w < min_pixels:
        scale = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * scale / factor) * factor
        w = math.ceil(width * scale / factor) * factor
    return h, w


def _scale(value, sx: float, sy: float, decimals: int, out_of_range: list):
    """Divide x (even positions of each innermost list) by sx and y by sy; nested lists kept."""
    if isinstance(value, list) and value and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                 for v in value):
        out = []
        for k, v in enumerate(value):
            x = v / (sx if k % 2 == 0 else sy)
            if -_TOLERANCE <= x <= 1 + _TOLERANCE:
                x = min(max(x, 0.0), 1.0)
            else:
                out_of_range.append(x)
            out.append(round(x, decimals))
        return out
    if isinstance(value, list):
        return [_scale(v, sx, sy, decimals, out_of_range) for v in value]
    return value


def _convert(obj, sx: float, sy: float, decimals: int, out_of_range: list):
    if isinstance(obj, dict):
        return {k: (_scale(v, sx, sy, decimals, out_of_range) if isinstance(k, str) and COORD_KEY.search(k)
                    and numbers(v) is not None else _convert(v, sx, sy, decimals, out_of_range))
                for k, v in obj.items()}
    if isinstance(obj, list):
        return [_convert(v, sx, sy, decimals, out_of_range) for v in obj]
    return obj


def _coordinates(obj) -> list[float]:
    if isinstance(obj, dict):
        out = []
        for k, v in obj.items():
            nums = numbers(v) if isinstance(k, str) and COORD_KEY.search(k) else None
            out += nums if nums is not None else _coordinates(v)
        return out
    if isinstance(obj, list):
        return [x for v in obj for x in _coordinates(v)]
    return []


def _record_size(rec: dict, data_root: Path) -> tuple[int, int] | str:
    """(width, height) from the record's fields or its images' headers, or why not."""
    for wk, hk in (("width", "height"), ("w", "h")):
        w, h = rec.get(wk), rec.get(hk)
        if isinstance(w, int) and isinstance(h, int) and not isinstance(w, bool) and w > 0 and h > 0:
            return w, h
    images = rec.get("images", rec.get("image", []))
    images = [images] if isinstance(images, str) else images
    if not isinstance(images, list) or not images:
        return "no width/height fields and no image to read the size from"
    root = data_root.resolve()
    sizes = set()
    for rel in images:
        p = (root / str(rel)).resolve()
        if not p.is_relative_to(root):
            return f"image path {rel!r} escapes the data root {root}"
        got = read_image_size(str(p))
        if isinstance(got, str):
            return f"image {p}: {got}"
        sizes.add(got)
    if len(sizes) > 1:
        return f"its images differ in size {sorted(sizes)}; which one do the coordinates refer to?"
    return sizes.pop()


def normalize_file(src: str | os.PathLike, dst: str | os.PathLike, mode: str = "pixels",
                   data_root: str | os.PathLike | None = None, decimals: int = 3, factor: int = QWEN_FACTOR,
                   min_pixels: int = QWEN_MIN_PIXELS, max_pixels: int = QWEN_MAX_PIXELS,
                   force: bool = False) -> dict:
    """Write `dst` (.json array or .jsonl, by its suffix) with normalised coordinates. Returns a summary with every
    problem; when there are problems nothing is written."""
    if mode not in MODES:
        raise UserError(f"--from {mode!r}: choose one of {', '.join(MODES)}")
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise UserError(f"{src} not found")
    if dst.resolve() == src.resolve():
        raise UserError("the output must be a new file; the input is never modified")
    if dst.exists() and not force:
        raise UserError(f"{dst} already exists; choose another output or pass --force to replace it")
    root = Path(data_root) if data_root else src.parent
    index = RecordIndex(src)
    problems: list[Problem] = list(index.problems)
    counts = {"records": len(index), "converted": 0, "already_normalised": 0, "no_coordinates": 0}
    texts: list[str] = []  # the output's records; none are kept once a problem means nothing is written
    for i in range(len(index)):
        rec = index.read(i)
        where = index.where(i)
        if isinstance(rec, Problem):
            problems.append(rec)
            continue
        rid = str(rec.get("id")) if isinstance(rec, dict) and rec.get("id") is not None else None
        turns = rec.get("conversations") if isinstance(rec, dict) else None
        answers = []  # (turn, parsed answer) with coordinates
        for t in turns if isinstance(turns, list) else []:
            if isinstance(t, dict) and t.get("from", t.get("role")) in ("gpt", "assistant"):
                key = "value" if "value" in t else "content"
                obj = answer_json(t.get(key)) if isinstance(t.get(key), str) else None
                if obj is not None and _coordinates(obj):
                    answers.append((t, key, obj))
        if not answers:
            counts["no_coordinates"] += 1
        elif all(0 <= x <= 1 for _, _, obj in answers for x in _coordinates(obj)) and mode != "thousand":
            counts["already_normalised"] += 1
        else:
            if mode == "thousand":
                sx = sy = 1000.0
            else:
                size = _record_size(rec, root)
                if isinstance(size, str):
                    problems.append(Problem(str(src), where, rid, "images", f"no image size: {size}",
                                            "missing_image"))
                    continue
                w, h = size
                if mode == "resized":
                    h, w = smart_resize(h, w, factor, min_pixels, max_pixels)
                sx, sy = float(w), float(h)
            outside: list = []
            for t, key, obj in answers:
                t[key] = json.dumps(_convert(obj, sx, sy, decimals, outside), ensure_ascii=False)
            if outside:
                problems.append(Problem(
                    str(src), where, rid, "conversations",
                    f"{len(outside)} coordinate(s) outside the image after dividing by {sx:g} x {sy:g} "
                    f"(e.g. {outside[0]:.3f}): wrong --from mode or image size?", "coords_out_of_range"))
                continue
            counts["converted"] += 1
        if not problems:
            texts.append(json.dumps(rec, ensure_ascii=False))
    if not problems:
        atomic_write_text(dst, "".join(t + "\n" for t in texts) if dst.suffix == ".jsonl"
                          else "[\n" + ",\n".join(texts) + "\n]\n")
    return {**counts, "output": None if problems else str(dst), "mode": mode,
            "problems": [p.to_dict() for p in problems]}
