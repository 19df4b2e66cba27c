"""Coordinates in a JSON ground truth, as training data writes them: which keys hold them and the numbers they
hold. `data check` validates them and `data normalize` rescales them by this one rule, so a file normalize
accepts is a file check accepts.

A gpt answer counts when it parses as JSON (it starts with { or [); a key ending in bbox/box/point/traj, at any
depth, holds coordinates: a point `[x, y]`, corner lists `[[x1, y1], [x2, y2]]`, flat boxes `[x1, y1, x2, y2]`.
"""

from __future__ import annotations

import json
import re

COORD_KEY = re.compile(r"(bbox|box|boxes|point|points|traj|trajectory)$", re.IGNORECASE)
TRAJ_KEY = re.compile(r"traj(ectory)?$", re.IGNORECASE)


def answer_json(text: str):
    """The answer as JSON when it looks like JSON (starts with { or [), else None."""
    t = text.strip()
    if not t or t[0] not in "{[":
        return None
    try:
        return json.loads(t)
    except ValueError:
        return None


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


def n_points(value) -> int:
    if isinstance(value, list) and value and all(isinstance(v, list) for v in value):
        return len(value)
    return len(numbers(value) or []) // 2
