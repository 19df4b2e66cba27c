"""Coordinates wherever a text holds them, in every shape the scorer's parser reads (geometry.py), and the unit they
look like they are in (pure Python, no torch). `data normalize` rescales them in place (`rescale_text`); `data
check` and `score` refuse ground truths outside [0, 1] (`ground_truth_problem`, `unit_problem`), naming the unit
the numbers look like, so a file labelled in pixels is never trained on or scored as if it were [0, 1].

Which numbers are coordinates: those of bracket lists holding only numbers, wherever the list sits (a JSON value,
a `bbox_2d` / `point_2d` object, a `<point>` or `<|box_start|>` tag, prose): `[x, y]`, `(x, y)`, `[x1, y1, x2,
y2]` and the innermost lists of `[[x, y], ...]`, x and y alternating in each. A text with no bracket at all has
its bare numbers read instead ("320, 240, 640, 480"), as the parser does. A list of one number is no coordinate
(the parser reads none either). Molmo's `<point x=".." y="..">` tags are percent of the image by definition: the
parser reads them so whatever the units, and nothing here touches them.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

from .coordinates import answer_json, coordinate_items
from .kinds import GEOMETRIC, classify_task
from .parse import parse_answer

# A number not glued to a word or another number, as the parser reads one ("-0.5", "3", ".5", "1e-3").
_NUM = r"(?<![\w.])[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?(?![\w])"
_TOKEN_RE = re.compile(rf"(?P<num>{_NUM})|(?P<open>[\[(])|(?P<close>[\])])|(?P<skip>[\s,;'\"`]+)|(?P<other>.)", re.S)
_MOLMO_RE = re.compile(r"<points?\b[^<>]*\bx\d*\s*=", re.IGNORECASE)


@dataclass(frozen=True)
class Number:
    start: int
    end: int
    value: float


@dataclass
class Found:
    lists: list[list[Number]]  # coordinate lists (or the bare numbers of a bracket-free text, as one list)
    odd: list[list[Number]]  # lists of 3, 5, ... numbers: no x, y pairing
    percent: bool  # Molmo tags: percent of the image, whatever the file's unit

    @property
    def values(self) -> list[float]:
        return [n.value for lst in self.lists for n in lst]

    def points(self) -> list[tuple[float, float]]:
        return [(lst[k].value, lst[k + 1].value) for lst in self.lists for k in range(0, len(lst), 2)]


def find(text: str, bare: bool = True) -> Found:
    """The coordinates of `text` (see the module docstring); `bare=False` ignores bracket-free numbers (questions,
    whose prose numbers are counts and steps, not positions)."""
    if _MOLMO_RE.search(text):
        return Found([], [], True)
    stack: list[tuple[list, list[bool]]] = []
    lists: list[list[Number]] = []
    loose: list[Number] = []
    brackets = False
    for m in _TOKEN_RE.finditer(text):
        kind = m.lastgroup
        if kind == "num":
            v = float(m.group())
            if not math.isfinite(v):
                continue
            end = m.end() - m.group().endswith(".")  # "480." ends a sentence: the dot stays in the text
            (stack[-1][0] if stack else loose).append(Number(m.start(), end, v))
        elif kind == "open":
            brackets = True
            stack.append(([], [False]))
        elif kind == "close" and stack:
            items, dirty = stack.pop()
            if not dirty[0] and items and all(isinstance(x, Number) for x in items):
                lists.append(items)
            if stack:
                stack[-1][0].append(items)  # a nested list: the parent is no flat list of numbers
        elif kind == "other" and stack:
            stack[-1][1][0] = True
    if not brackets and bare and len(loose) > 1:
        lists = [loose]
    lists = [lst for lst in lists if len(lst) > 1]
    return Found([lst for lst in lists if len(lst) % 2 == 0], [lst for lst in lists if len(lst) % 2], False)


def rescale_text(text: str, sx: float, sy: float, decimals: int, bare: bool = True,
                 tolerance: float = 1e-6) -> tuple[str, list[float], str | None]:
    """(`text` with every coordinate divided by sx (x) or sy (y), values beyond [0, 1] by more than `tolerance`,
    None) or (text, [], why it cannot be done). The rest of the text is kept character for character."""
    found = find(text, bare)
    if found.odd:
        nums = ", ".join(f"{n.value:g}" for n in found.odd[0])
        return text, [], f"the list ({nums}) has an odd number of numbers: which are x and which y?"
    out, pos, outside = [], 0, []
    for lst in sorted(found.lists, key=lambda lst: lst[0].start):
        for k, n in enumerate(lst):
            v = n.value / (sx if k % 2 == 0 else sy)
            if -tolerance <= v <= 1 + tolerance:
                v = min(max(v, 0.0), 1.0)
            else:
                outside.append(v)
            out += [text[pos:n.start], json.dumps(round(v, decimals))]
            pos = n.end
    return "".join(out) + text[pos:], outside, None


def likely_unit(points: list[tuple[float, float]], size: tuple[float, float] | None = None) -> str:
    """What coordinates outside [0, 1] look like, with the `data normalize --from` that converts them."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    if min(xs + ys) < 0 and max(xs + ys) <= 1:
        return "negative: outside the image"
    if size and max(xs) <= size[0] and max(ys) <= size[1]:
        return f"they look like pixels of the {size[0]:g}x{size[1]:g} image (`lora-manip data normalize --from pixels`)"
    if max(xs + ys) <= 1000:
        return ("they look like pixels, or Qwen2-VL's 0-1000 grid (`lora-manip data normalize --from pixels` or "
                "`--from thousand`)")
    return "they look like pixels (`lora-manip data normalize --from pixels`)"


def unit_problem(points: list[tuple[float, float]], size: tuple[float, float] | None = None) -> str | None:
    """Why coordinates meant to be in [0, 1] are not, naming the unit they look like; None when they are."""
    bad = [v for p in points for v in p if not 0.0 <= v <= 1.0]
    if not bad:
        return None
    shown = ", ".join(f"{v:g}" for v in bad[:3]) + (", ..." if len(bad) > 3 else "")
    return f"{len(bad)} coordinate(s) outside [0, 1] ({shown}): {likely_unit(points, size)}"


def value_points(value) -> list[tuple[float, float]]:
    """A parsed geometric value (a box tuple or a list of points) as points."""
    if isinstance(value, tuple):
        return [(value[0], value[1]), (value[2], value[3])]
    return list(value)


def stray_coordinates(text: str, task: str | None) -> str | None:
    """Why an answer that the scorer will NOT read as geometry (its kind is choice, yes/no or planning) still holds
    lists of numbers above 1: pixels that would be copied as they are. None when it holds none."""
    tk = classify_task(task, text)
    if tk.kind in GEOMETRIC:
        return None
    found = find(text)
    big = [v for lst in found.lists + found.odd for v in (n.value for n in lst) if abs(v) > 1]
    if not big:
        return None
    why = {"name": f"its task {task!r} is a {tk.kind} task", "guess": f"its task {task!r} reads as {tk.kind}",
           "format": f"without a task name it reads as {tk.kind}"}.get(tk.source, f"it reads as {tk.kind}")
    return (f"the answer holds coordinate-like numbers ({', '.join(f'{v:g}' for v in big[:4])}) but {why}, which "
            "is scored as text: give the record a `task` naming a box, point or trajectory task (e.g. "
            "current_box, contact_point, traj) or the kind itself")


def value_problem(value, size: tuple[float, float] | None = None) -> str | None:
    """`unit_problem` of a parsed ground truth, worded for `score`'s list of records it cannot score."""
    why = unit_problem(value_points(value), size)
    return f"ground truth has {why}; ground truths must be in [0, 1]" if why else None


def ground_truth_problem(text: str, task: str | None, size: tuple[float, float] | None = None) -> str | None:
    """Why a training ground truth holds coordinates outside [0, 1], read as the scorer reads it; None when it is
    fine or not geometric. What the key-by-key check of `data check` (data/validate.py) already covers is left to
    it: JSON keys naming their coordinates (`current_bbox`, ...) and bare JSON lists."""
    kind = classify_task(task, text).kind
    if kind not in GEOMETRIC:
        return None
    obj = answer_json(text)
    if obj is not None and (any(True for _ in coordinate_items(obj)) or isinstance(obj, list)):
        return None
    parsed = parse_answer(text, kind)
    if not parsed.ok:
        return None  # unreadable, not out of range: reported as such where it matters
    return unit_problem(value_points(parsed.value), size)


# "x=10 y=20 w=30 h=40": a box given by its size, which the parser would read as two corners
_SIZE_LABEL = re.compile(r"(?<![\w.])(?:w|h|width|height)[\"']?\s*[=:]", re.IGNORECASE)


def box_order_problem(text: str, task: str | None) -> str | None:
    """Why a box answer in any shape the parser reads (tuples, a flat list, `bbox_2d`, tags, prose) is not two
    corners top-left first: the parser sorts the corners, so x, y, width, height (COCO's order, the usual slip)
    would silently become another box. None when it is fine or no box."""
    if classify_task(task, text).kind != "box":
        return None
    if _SIZE_LABEL.search(text):
        return "the box names a width or height: give two corners (x1, y1, x2, y2), not x, y, width, height"
    found = find(text)
    boxes = [lst for lst in found.lists if len(lst) == 4]
    if not boxes and len(found.lists) == 2 and all(len(lst) == 2 for lst in found.lists):
        boxes = [found.lists[0] + found.lists[1]]  # "(x1, y1), (x2, y2)"
    for b in boxes:
        x1, y1, x2, y2 = (n.value for n in b)
        if x1 > x2 or y1 > y2:
            return (f"inverted box ({x1:g}, {y1:g}, {x2:g}, {y2:g}): the first corner must be the top-left (x1 <= "
                    "x2, y1 <= y2); x, y, width, height? give two corners")
    return None
