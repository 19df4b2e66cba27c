"""Coordinates in model answers: find them in any of the formats models emit and read them in the units they use
(pure Python, no torch).

Formats: JSON or Python lists (``[[x1, y1], [x2, y2]]``, ``[x1, y1, x2, y2]``, ``[(x, y), ...]``), keys such as
``current_bbox`` / ``contact_point`` / ``future_traj``, Qwen2.5-VL ``[{"bbox_2d": [...]}, ...]`` and
``[{"point_2d": [x, y]}, ...]``, Qwen2-VL ``<|box_start|>(x1,y1),(x2,y2)<|box_end|>``, ``<point>(x, y)</point>``
tags, and Molmo's ``<point x="61.5" y="40.6">`` / ``<points x1=.. y1=.. x2=.. y2=..>`` (percent of the image by
Molmo's definition, whatever `coords` says).

Units (`coords`): ``normalized`` ([0, 1] of the image, the kit's convention), ``thousand`` (0-1000 of the image,
Qwen2-VL style) or ``pixels`` (of the original image; needs its size). Values are returned in [0, 1] units.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

__all__ = ["COORDS", "DEFAULT_COORDS", "Parsed", "fail", "parse_geometry", "first_points", "coords_above_one"]


@dataclass(frozen=True)
class Parsed:
    """A parsed answer: exactly one of `value` (the answer) and `error` (why parsing failed) is set. Every answer
    parser returns one (here and in parse.py, which imports this module)."""

    value: Any = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def fail(error: str) -> Parsed:
    return Parsed(None, error)


COORDS = ("normalized", "thousand", "pixels")
DEFAULT_COORDS = "normalized"  # the kit's own convention; what every command reads unless told otherwise


# --------------------------------------------------------------------------------------------------------------------
# Bracket scanning
#
# The text is tokenised into numbers, brackets and "other" characters. Bracket groups are built with a stack (no
# recursion, so deeply nested junk cannot overflow). A group holding anything but numbers, separators, quotes and
# nested groups is "dirty" (e.g. "(see below)" or "[x1, y1]") and is ignored. This accepts JSON, Python-style
# lists with single quotes or round brackets, trailing commas, prose around the answer, negative numbers, integers
# and scientific notation, without ever calling a JSON parser.

# A number not glued to a word or another number: keeps its sign ("-0.5"), allows "3", ".5", "1e-3", "2.".
_NUM = r"(?<![\w.])[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?(?![\w])"
_TOKEN_RE = re.compile(rf"(?P<num>{_NUM})|(?P<open>[\[(])|(?P<close>[\])])|(?P<skip>[\s,;'\"`]+)|(?P<other>.)", re.S)

# Keys whose value is the answer; "bbox_2d" / "point_2d" are Qwen2.5-VL's.
_KIND_KEY_RE = {
    "box": re.compile(r"""["']?\b([A-Za-z_]*box(?:_2d)?)\b["']?\s*:""", re.IGNORECASE),
    "point": re.compile(r"""["']?\b([A-Za-z_]*point[A-Za-z_0-9]*)\b["']?\s*:""", re.IGNORECASE),
    "trajectory": re.compile(r"""["']?\b([A-Za-z_]*traj[A-Za-z_]*)\b["']?\s*:""", re.IGNORECASE),
}
_KIND_KEY_RE["pointing"] = _KIND_KEY_RE["point"]
# Molmo: <point x="61.5" y="40.6" alt="cup">cup</point>, <points x1="1" y1="2" x2="3" y2="4" ...>
_MOLMO_TAG_RE = re.compile(r"<points?\b([^<>]*)>", re.IGNORECASE)
_MOLMO_ATTR_RE = re.compile(r"""\b([xy])(\d*)\s*=\s*["']?([-+]?(?:\d+\.?\d*|\.\d+))""")


@dataclass
class _Scan:
    groups: list[list]  # clean, closed top-level groups (nested lists of floats)
    n_groups: int  # all top-level groups seen, dirty ones included
    unclosed: bool
    loose_numbers: list[float]  # numbers outside any bracket
    nonfinite: bool


def _scan(text: str) -> _Scan:
    groups: list[list] = []
    n_groups = 0
    loose: list[float] = []
    nonfinite = False
    stack: list[tuple[list, list[bool]]] = []  # (items, [dirty])
    for m in _TOKEN_RE.finditer(text):
        kind = m.lastgroup
        if kind == "num":
            x = float(m.group())
            if not math.isfinite(x):
                nonfinite = True
                if stack:
                    stack[-1][1][0] = True
                continue
            if stack:
                stack[-1][0].append(x)
            else:
                loose.append(x)
        elif kind == "open":
            stack.append(([], [False]))
        elif kind == "close":
            if not stack:
                continue  # stray closing bracket in prose
            items, dirty = stack.pop()
            if stack:
                stack[-1][0].append(items)
                if dirty[0]:
                    stack[-1][1][0] = True
            else:
                n_groups += 1
                if not dirty[0]:
                    groups.append(items)
        elif kind == "other":
            if stack:
                stack[-1][1][0] = True
    return _Scan(groups, n_groups + (1 if stack else 0), bool(stack), loose, nonfinite)


def _to_points(node: list) -> list[tuple[float, float]] | None:
    """Interpret one bracket group as points: ``[x, y, x, y, ...]`` or ``[[x, y], [x, y], ...]``."""
    while isinstance(node, list) and len(node) == 1 and isinstance(node[0], list):
        node = node[0]
    if not node:
        return None
    if all(isinstance(v, float) for v in node):
        if len(node) % 2:
            return None
        return [(node[i], node[i + 1]) for i in range(0, len(node), 2)]
    if all(isinstance(v, list) and len(v) == 2 and all(isinstance(c, float) for c in v) for v in node):
        return [(v[0], v[1]) for v in node]
    return None


def _candidates(scan: _Scan) -> list[list[tuple[float, float]]]:
    """Point lists to try, in order of preference.

    A run of single-pair groups, as in "from (0.1, 0.2) to (0.3, 0.4)", is offered merged before the first pair
    on its own.
    """
    out: list[list[tuple[float, float]]] = []
    pts_per_group = [_to_points(g) for g in scan.groups]
    for i, pts in enumerate(pts_per_group):
        if pts is None:
            continue
        prev = pts_per_group[i - 1] if i else None
        if len(pts) == 1 and not (prev is not None and len(prev) == 1):  # start of a run (keeps this linear)
            merged = list(pts)
            j = i + 1
            while j < len(pts_per_group) and pts_per_group[j] is not None and len(pts_per_group[j]) == 1:
                merged.extend(pts_per_group[j])
                j += 1
            if len(merged) > 1:
                out.append(merged)
        out.append(pts)
    return out


def first_points(text: str) -> list[tuple[float, float]] | None:
    c = _candidates(_scan(text))
    return c[0] if c else None


def _valid_for(kind: str, pts: list[tuple[float, float]]) -> bool:
    if kind == "box":
        return len(pts) == 2
    return len(pts) >= 1


def _make_value(kind: str, pts: list[tuple[float, float]]) -> Any:
    if kind == "box":
        (xa, ya), (xb, yb) = pts
        return (min(xa, xb), min(ya, yb), max(xa, xb), max(ya, yb))
    return [(float(x), float(y)) for x, y in pts]


def _find(text: str, kind: str) -> Parsed:
    starts = []
    m = _KIND_KEY_RE[kind].search(text)
    if m:
        starts.append(m.end())  # prefer the value of the matching key when several keys are present
    starts.append(0)
    for start in starts:
        for pts in _candidates(_scan(text[start:])):
            if _valid_for(kind, pts):
                return Parsed(_make_value(kind, pts), None)
    scan = _scan(text)
    # No usable bracket group: accept bare numbers only when the text has no brackets at all ("0.1, 0.2, 0.3, 0.4").
    if scan.n_groups == 0 and not scan.nonfinite:
        nums = scan.loose_numbers
        if kind == "box" and len(nums) == 4:
            return Parsed(_make_value(kind, [(nums[0], nums[1]), (nums[2], nums[3])]), None)
        if kind != "box" and len(nums) >= 2 and len(nums) % 2 == 0:
            return Parsed(_make_value(kind, [(nums[i], nums[i + 1]) for i in range(0, len(nums), 2)]), None)
    if scan.nonfinite:
        return fail("non-finite number")
    if scan.unclosed and not scan.groups:
        return fail("unbalanced brackets (truncated answer?)")
    found = _candidates(scan)
    if kind == "box":
        if found:
            return fail(f"expected 2 corner points (4 numbers) for a box, got {len(found[0])} point(s)")
        if scan.n_groups == 0 and scan.loose_numbers:
            return fail(f"expected 4 numbers for a box, got {len(scan.loose_numbers)}")
    if scan.n_groups and not found:
        return fail("no list of [x, y] coordinates found")
    if scan.loose_numbers and len(scan.loose_numbers) % 2:
        return fail("odd number of coordinates")
    return fail("no coordinates found")


def _molmo_points(text: str) -> list[tuple[float, float]]:
    pts = []
    for tag in _MOLMO_TAG_RE.finditer(text):
        xs: dict[str, float] = {}
        ys: dict[str, float] = {}
        for axis, idx, num in _MOLMO_ATTR_RE.findall(tag.group(1)):
            (xs if axis == "x" else ys)[idx] = float(num)
        pts += [(xs[i] / 100.0, ys[i] / 100.0) for i in sorted(xs, key=lambda k: int(k or 0)) if i in ys]
    return pts


def _scale(pts: list[tuple[float, float]], coords: str, size: tuple[float, float] | None):
    if coords == "normalized":
        return pts
    if coords == "thousand":
        return [(x / 1000.0, y / 1000.0) for x, y in pts]
    w, h = size  # type: ignore[misc]  # checked by the caller
    return [(x / w, y / h) for x, y in pts]


def parse_geometry(text: str, kind: str, coords: str = DEFAULT_COORDS,
                   size: tuple[float, float] | None = None) -> Parsed:
    """Parse a box / point / trajectory / pointing answer and return it in [0, 1] units.

    The value of a key matching the kind is preferred (``*box``, ``bbox_2d``, ``*point*``, ``*traj*``), else the first
    bracket list of coordinates anywhere in the text. Box: ``(x1, y1, x2, y2)`` with corners re-ordered; others: a
    list of ``(x, y)``. `size` (width, height in pixels) is needed when `coords` is ``pixels``.
    """
    if coords not in COORDS:
        return fail(f"unknown coordinate convention {coords!r} (expected one of {', '.join(COORDS)})")
    if coords == "pixels" and not size:
        return fail("pixel coordinates need the image size (w, h)")
    if kind != "box" and "<point" in text.lower():
        molmo = _molmo_points(text)
        if molmo:  # percent of the image by definition, so `coords` does not apply
            return Parsed(_make_value(kind, molmo), None)
    found = _find(text, kind)
    if not found.ok:
        return found
    if kind == "box":
        x1, y1, x2, y2 = found.value
        (x1, y1), (x2, y2) = _scale([(x1, y1), (x2, y2)], coords, size)
        return Parsed((x1, y1, x2, y2), None)
    return Parsed(_scale(found.value, coords, size), None)


def coords_above_one(value: Any) -> bool:
    """Whether a parsed geometric value (box tuple or point list) has a coordinate outside [-0.5, 1.5]: a hint that
    answers read as normalized are really pixels or 0-1000."""
    flat = list(value) if isinstance(value, tuple) else [c for p in value for c in p]
    return any(abs(v - 0.5) > 1.0 for v in flat)
