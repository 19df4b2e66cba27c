"""Coordinates in a JSON ground truth, as training data writes them: which keys hold them and the numbers they
hold. `data check` validates them and `data normalize` rescales them by this one rule, so a file normalize
accepts is a file check accepts.

A gpt answer counts when it parses as JSON (it starts with { or [); a key ending in bbox/box/point/traj, at any
depth (or in `bbox_2d` / `point_2d`), holds coordinates: a point `[x, y]`, corner lists `[[x1, y1], [x2, y2]]`, flat boxes `[x1, y1, x2, y2]`.

`value_problems` is the one rule for what such a value must be, read by `data check` for every answer and by the
scorer for ground truths: numbers (not strings), finite, in [0, 1], a box as 4 numbers or 2 corners with its
first corner top-left, points as [x, y] pairs. An answer object that gives a key twice is ambiguous (`load_answer`).
"""

from __future__ import annotations

import json
import math
import re

# `_2d`: Qwen2.5-VL's `bbox_2d` / `point_2d`, which the scorer reads and `data normalize` writes.
COORD_KEY = re.compile(r"(bbox|box|boxes|point|points|traj|trajectory)(_2d)?$", re.IGNORECASE)
TRAJ_KEY = re.compile(r"traj(ectory)?(_2d)?$", re.IGNORECASE)
BOX_KEY = re.compile(r"(bbox|box|boxes)(_2d)?$", re.IGNORECASE)
PIXEL_HINT = ("; values above 1 look like pixel coordinates: convert the file with `lora-manip data normalize` "
              "(answers must be normalised to [0, 1])")
_BOX_FORM = "a box: [x1, y1, x2, y2] or [[x1, y1], [x2, y2]] (or a list of boxes)"
_POINT_FORM = "[x, y] points: [x, y], [[x, y], ...] or [x1, y1, x2, y2, ...]"


def load_answer(text: str) -> tuple[object | None, str | None]:
    """(the answer as JSON when it looks like JSON (starts with { or [), else None; the first key an object in it
    gives twice, else None)."""
    t = text.strip()
    if not t or t[0] not in "{[":
        return None, None
    twice: list = []

    def pairs(items: list) -> dict:
        keys = [k for k, _ in items]
        twice.extend(k for i, k in enumerate(keys) if k in keys[:i])
        return dict(items)

    try:
        obj = json.loads(t, object_pairs_hook=pairs)
    except ValueError:
        return None, None
    return obj, (twice[0] if twice else None)


def answer_json(text: str):
    """The answer as JSON when it looks like JSON (starts with { or [), else None."""
    return load_answer(text)[0]


def key_kind(key: str) -> str:
    """The kind of coordinates a key holds: trajectory, box or point."""
    return "trajectory" if TRAJ_KEY.search(key) else "box" if BOX_KEY.search(key) else "point"


def coordinate_values(obj, bare_kind: str | None = None) -> list[tuple[str, object, str]]:
    """(key path, value, kind) of every coordinate value in a parsed answer. A bare list (no coordinate key)
    counts as `bare_kind` when that is geometric (the caller's classifier decides, from the task name or format)."""
    items = [(key, value, key_kind(key)) for key, value in coordinate_items(obj)]
    objects = isinstance(obj, list) and any(isinstance(v, dict) for v in obj)  # Qwen's [{"bbox_2d": ...}, ...]
    if not items and isinstance(obj, list) and not objects and bare_kind in ("box", "point", "trajectory",
                                                                            "pointing"):
        items = [(bare_kind, obj, "point" if bare_kind == "pointing" else bare_kind)]
    return items


def numbers(value) -> list[float] | None:
    """All numbers of a nested list, or None when it holds anything else."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return [float(value)]
    if isinstance(value, list):
        out = []
        for v in value:
            got = numbers(v)
            if got is None:
                return None
            out += got
        return out
    return None


def coordinate_items(obj, path: str = ""):
    """(key path, value) of every key ending in bbox/box/point/traj, at any depth."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if isinstance(k, str) and COORD_KEY.search(k):
                yield (f"{path}.{k}" if path else k), v
            else:
                yield from coordinate_items(v, f"{path}.{k}" if path else str(k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from coordinate_items(v, f"{path}[{i}]")


def _first_non_number(value):
    if isinstance(value, list):
        for v in value:
            got = _first_non_number(v)
            if got is not None:
                return got
        return None
    return None if isinstance(value, (int, float)) and not isinstance(value, bool) else (value,)


def _unwrap(value):
    while isinstance(value, list) and len(value) == 1 and isinstance(value[0], list):
        value = value[0]
    return value


def _pairs(value) -> list | None:
    """[(x, y), ...] of a points value, or None when it is not one."""
    value = _unwrap(value)
    if value and all(not isinstance(v, list) for v in value):
        return [tuple(value[i:i + 2]) for i in range(0, len(value), 2)] if len(value) % 2 == 0 else None
    if value and all(isinstance(v, list) and len(v) == 2 and not any(isinstance(c, list) for c in v)
                     for v in value):
        return [tuple(v) for v in value]
    return None


def _boxes(value) -> list | None:
    """[(x1, y1, x2, y2), ...] of a box value, or None when it is not one (or a list of them)."""
    if not isinstance(value, list) or not value:
        return None
    if len(value) == 4 and all(not isinstance(v, list) for v in value):
        return [tuple(value)]
    if len(value) == 2 and all(isinstance(v, list) and len(v) == 2 and not any(isinstance(c, list) for c in v)
                               for v in value):
        return [(*value[0], *value[1])]
    out = []
    for v in value:
        one = _boxes(v) if isinstance(v, list) else None
        if one is None or len(one) != 1:
            return None
        out += one
    return out


def value_problems(key: str, value, kind: str, min_traj_points: int = 2) -> list[tuple[str, str]]:
    """(problem kind, reason) for one coordinate value of `kind` (box, point, trajectory) at `key`; the kinds are
    data/records.PROBLEM_KINDS'. One problem per cause, the most basic first: a value that is not numbers is not
    also checked for its range."""
    bad = _first_non_number(value)
    if bad is not None or not isinstance(value, list):
        shown = json.dumps(bad[0] if bad is not None else value, default=str)[:40]
        return [("coords_malformed", f"`{key}` holds {shown}, not numbers: coordinates must be JSON numbers")]
    nums = numbers(value) or []
    if not all(map(math.isfinite, nums)):
        return [("coords_not_finite", f"`{key}` has NaN/inf coordinate(s); every coordinate must be a finite "
                                      "number in [0, 1]")]
    boxes = _boxes(value) if kind == "box" else None
    if (boxes if kind == "box" else _pairs(value)) is None:
        form = _BOX_FORM if kind == "box" else _POINT_FORM
        return [("coords_malformed", f"`{key}` is not {form}: got {len(nums)} number(s) as "
                                     f"{json.dumps(value)[:60]}")]
    out = []
    outside = [x for x in nums if not 0.0 <= x <= 1.0]
    if outside:
        shown = ", ".join(f"{x:g}" for x in outside[:3]) + (", ..." if len(outside) > 3 else "")
        out.append(("coords_out_of_range", f"`{key}` has {len(outside)} coordinate(s) outside [0, 1] ({shown})"
                    + (PIXEL_HINT if any(x > 1 for x in outside) else "")))
    inverted = [b for b in boxes or [] if b[0] > b[2] or b[1] > b[3]]
    if inverted and not outside:  # pixel values read as [0, 1] say nothing about corner order
        x1, y1, x2, y2 = inverted[0]
        out.append(("box_inverted", f"`{key}` has an inverted box ({x1:g}, {y1:g}, {x2:g}, {y2:g}): the first "
                                    "corner must be the top-left (x1 <= x2, y1 <= y2)"))
    if kind == "trajectory" and n_points(value) < min_traj_points:
        out.append(("short_trajectory", f"`{key}` has {n_points(value)} point(s); a trajectory needs at least "
                                        f"{min_traj_points}"))
    return out


def truth_problem(text: str, kind: str) -> str | None:
    """Why the scorer refuses a ground truth of a geometric `kind`, by the rule data check applies: a key given
    twice, coordinates that are not numbers, not finite or of the wrong shape, an inverted box. (Range and
    trajectory length are data check's to report; the scorer scores such values as they are.)"""
    obj, twice = load_answer(text)
    if twice is not None:
        return f"its JSON gives the key {twice!r} twice (which value is the ground truth?)"
    for key, value, k in coordinate_values(obj, kind):
        for problem_kind, reason in value_problems(key, value, k, min_traj_points=0):
            if problem_kind in ("coords_malformed", "coords_not_finite", "box_inverted"):
                return reason
    return None


def n_points(value) -> int:
    if isinstance(value, list) and value and all(isinstance(v, list) for v in value):
        return len(value)
    return len(numbers(value) or []) // 2
