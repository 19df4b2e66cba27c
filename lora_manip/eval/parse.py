"""Parse model answers and ground truths for the manipulation-VQA tasks (pure Python, no torch).

Task kinds: "box", "point", "trajectory", "choice", "yesno", "planning".

Ground truths look like ``{"current_bbox": [[x1, y1], [x2, y2]]}``, ``{"contact_point": [[x, y], ...]}``,
``{"future_traj": [[x, y], ...]}``, ``B`` or ``Yes``; coordinates are normalised to [0, 1], x first.

`parse_answer` is the strict, lenient-about-format parser used by default; it never raises. Values it returns:

- box: ``(x1, y1, x2, y2)`` floats with ``x1 <= x2`` and ``y1 <= y2`` (swapped corners are re-ordered)
- point / trajectory: list of ``(x, y)`` float tuples
- choice: an upper-case letter ``"A"``-``"F"``
- yesno: ``bool``
- planning: the stripped text

`parse_answer_upstream` reproduces the upstream scorer's rules (flaws included) so that numbers can be compared
with published tables.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Callable

__all__ = [
    "KINDS",
    "CHOICE_LETTERS",
    "Parsed",
    "infer_task",
    "parse_answer",
    "parse_answer_upstream",
]

KINDS = ("box", "point", "trajectory", "choice", "yesno", "planning")
CHOICE_LETTERS = "ABCDEF"


@dataclass(frozen=True)
class Parsed:
    """A parsed answer: exactly one of `value` (the answer) and `error` (why parsing failed) is set."""

    value: Any = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def _fail(error: str) -> Parsed:
    return Parsed(None, error)


# --------------------------------------------------------------------------------------------------------------------
# Task inference

_KEY_RE = re.compile(r"""["']\s*([A-Za-z_][\w \-]*?)\s*["']\s*:""")
_CHOICE_GT_RE = re.compile(rf"[(\[]?([{CHOICE_LETTERS}])[)\]]?\.?")
_YESNO_GT_RE = re.compile(r"(yes|no)\.?", re.IGNORECASE)


def _kind_from_name(name: str) -> str | None:
    t = name.strip().lower()
    if t in KINDS:
        return t
    if "traj" in t:
        return "trajectory"
    if "box" in t:  # current_bbox, final_bbox, contact_bbox, gripper_bbox, ...
        return "box"
    if "point" in t:
        return "point"
    if "choice" in t or t in {"mcq", "mc", "multiple-choice"}:
        return "choice"
    if t in {"yes_no", "yes/no", "yes-no", "judge", "binary", "bool", "boolean"}:
        return "yesno"
    if "plan" in t:
        return "planning"
    return None


def infer_task(gt: str, task: str | None = None) -> str:
    """Return the task kind of a record.

    An explicit `task` name decides when it is recognisable (``*bbox``/``*box`` -> box, ``*point*`` -> point,
    ``*traj*`` -> trajectory, ``choice``, ``yesno``, ``planning``, or a kind name itself). Otherwise the ground
    truth's format decides: a JSON key containing traj/box/point; a lone letter A-F; a lone Yes/No; a bare list of
    coordinates (4 numbers or 2 pairs -> box, 1 pair -> point, 3+ pairs -> trajectory); anything else is planning.
    """
    if task is not None and isinstance(task, str) and task.strip():
        kind = _kind_from_name(task)
        if kind is not None:
            return kind
    if not isinstance(gt, str):
        return "planning"
    s = gt.strip()
    m = _KEY_RE.search(s)
    if m:
        key = m.group(1).lower()
        for probe in ("traj", "box", "point"):
            if probe in key:
                return _kind_from_name(probe) or "planning"
    if _CHOICE_GT_RE.fullmatch(s):
        return "choice"
    if _YESNO_GT_RE.fullmatch(s):
        return "yesno"
    if s[:1] in "[(":
        pts = _first_points(s)
        if pts is not None:
            if len(pts) == 2:
                return "box"
            if len(pts) == 1:
                return "point"
            return "trajectory"
    return "planning"


# --------------------------------------------------------------------------------------------------------------------
# Coordinate extraction (strict parser)
#
# The text is tokenised into numbers, brackets and "other" characters. Bracket groups are built with a stack (no
# recursion, so deeply nested junk cannot overflow). A group holding anything but numbers, separators, quotes and
# nested groups is "dirty" (e.g. "(see below)" or "[x1, y1]") and is ignored. This accepts JSON, Python-style
# lists with single quotes or round brackets, trailing commas, prose around the answer, negative numbers, integers
# and scientific notation, without ever calling a JSON parser.

# A number not glued to a word or another number: keeps its sign ("-0.5"), allows "3", ".5", "1e-3", "2.".
_NUM = r"(?<![\w.])[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?(?![\w])"
_TOKEN_RE = re.compile(rf"(?P<num>{_NUM})|(?P<open>[\[(])|(?P<close>[\])])|(?P<skip>[\s,;'\"`]+)|(?P<other>.)", re.S)
_NUM_RE = re.compile(_NUM)

_KIND_KEY_RE = {
    "box": re.compile(r"""["']?\b([A-Za-z_]*box)\b["']?\s*:""", re.IGNORECASE),
    "point": re.compile(r"""["']?\b([A-Za-z_]*point[A-Za-z_]*)\b["']?\s*:""", re.IGNORECASE),
    "trajectory": re.compile(r"""["']?\b([A-Za-z_]*traj[A-Za-z_]*)\b["']?\s*:""", re.IGNORECASE),
}


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


def _first_points(text: str) -> list[tuple[float, float]] | None:
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


def _parse_geometry(text: str, kind: str) -> Parsed:
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
        return _fail("non-finite number")
    if scan.unclosed and not scan.groups:
        return _fail("unbalanced brackets (truncated answer?)")
    found = _candidates(scan)
    if kind == "box":
        if found:
            return _fail(f"expected 2 corner points (4 numbers) for a box, got {len(found[0])} point(s)")
        if scan.n_groups == 0 and scan.loose_numbers:
            return _fail(f"expected 4 numbers for a box, got {len(scan.loose_numbers)}")
    if scan.n_groups and not found:
        return _fail("no list of [x, y] coordinates found")
    if scan.loose_numbers and len(scan.loose_numbers) % 2:
        return _fail("odd number of coordinates")
    return _fail("no coordinates found")


# --------------------------------------------------------------------------------------------------------------------
# Choice and yes/no

_L = CHOICE_LETTERS
_CHOICE_EXACT_RE = re.compile(rf"[(\[]?([{_L}{_L.lower()}])[)\]]?[.:]?")
# "answer is B", "answer: (B)", "option B", "choice B", "correct one is B"
_CHOICE_PHRASE_RE = re.compile(
    rf"(?i:answer|option|choice|correct(?: one)?)\s*(?:(?i:is|would be|should be)\s*)?[:=]?\s*[(\[]?([{_L}])(?![\w])"
)
# "B. red cube", "(B) red cube", "B) red", "B: red" at the start
_CHOICE_START_RE = re.compile(rf"(?:\(([{_L}])\)|\[([{_L}])\]|([{_L}])[.):](?!\w))")
# option markers anywhere: "(B)", "B." / "B)" / "B:" followed by a space or the end
_CHOICE_MARKER_RE = re.compile(rf"(?:\(([{_L}])\)|(?<![\w])([{_L}])[.):](?=\s|$))")
_CHOICE_LONE_RE = re.compile(rf"(?<![\w'])([{_L}])(?![\w'])")


def _letters(regex: re.Pattern, text: str) -> set[str]:
    out = set()
    for m in regex.finditer(text):
        out.update(g for g in m.groups() if g)
    return out


def _parse_choice(text: str) -> Parsed:
    s = text.strip().strip("*_`\"'").strip()
    if not s:
        return _fail("empty")
    m = _CHOICE_EXACT_RE.fullmatch(s)
    if m:
        return Parsed(m.group(1).upper(), None)
    phrase = _letters(_CHOICE_PHRASE_RE, s)
    start_m = _CHOICE_START_RE.match(s)
    start = {g for g in start_m.groups() if g} if start_m else set()
    if phrase or start:
        letters = phrase | start | _letters(_CHOICE_MARKER_RE, s)
        if len(letters) == 1:
            return Parsed(letters.pop(), None)
        return _fail("ambiguous choice: " + ", ".join(sorted(letters)))
    lone = _letters(_CHOICE_LONE_RE, s)
    if len(lone) == 1:
        return Parsed(lone.pop(), None)
    if lone:
        return _fail("ambiguous choice: " + ", ".join(sorted(lone)))
    return _fail("no option letter found")


_WORD_RE = re.compile(r"[a-z]+")


def _parse_yesno(text: str) -> Parsed:
    words = _WORD_RE.findall(text.lower())
    if not words:
        return _fail("no yes/no found")
    if words[0] in ("yes", "no"):
        return Parsed(words[0] == "yes", None)
    found = {w for w in words if w in ("yes", "no")}
    if len(found) == 1:
        return Parsed(found.pop() == "yes", None)
    if found:
        return _fail("ambiguous: both yes and no")
    return _fail("no yes/no found")


# --------------------------------------------------------------------------------------------------------------------
# Public parsers


def _guard(fn: Callable[[str, str], Parsed]) -> Callable[[str, str], Parsed]:
    """Common checks shared by both parsers, plus a last-resort guard so that parsing never raises."""

    def wrapper(text: str, kind: str) -> Parsed:
        if kind not in KINDS:
            return _fail(f"unknown task kind {kind!r} (expected one of {', '.join(KINDS)})")
        if not isinstance(text, str):
            return _fail(f"not a string ({type(text).__name__})")
        try:
            return fn(text.replace("\u2212", "-"), kind)  # U+2212 MINUS SIGN, as some tokenizers emit it
        except Exception as e:  # pragma: no cover - a bug; report it as a parse failure rather than crash a run
            return _fail(f"internal parser error: {type(e).__name__}: {e}")

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


@_guard
def parse_answer(text: str, kind: str) -> Parsed:
    """Parse `text` as an answer of task `kind`; never raises. Empty or whitespace-only text gives error "empty".

    Geometry (box/point/trajectory): the value of a key matching the kind is preferred (``*box``, ``*point*``,
    ``*traj*``), else the first bracket list of coordinates anywhere in the text, so misspelt keys and prose are fine.
    Choice: "B", "b", "B.", "(B)", "The answer is B", "B. red cube" -> "B"; several candidate letters ("A or B") ->
    failure. Yes/no: a case-insensitive yes/no as the first word, or the only yes/no word.
    """
    if not text.strip():
        return _fail("empty")
    if kind in ("box", "point", "trajectory"):
        return _parse_geometry(text, kind)
    if kind == "choice":
        return _parse_choice(text)
    if kind == "yesno":
        return _parse_yesno(text)
    return Parsed(text.strip(), None)  # planning


# The upstream number regex. FLAW: it has no sign, so "-0.1" is read as 0.1, and no exponent, so "1e-3" is read as
# the two numbers 1 and 3; it also picks digits out of words ("x1", "step 2") and keys ("bbox_2d").
_UPSTREAM_NUM_RE = re.compile(r"\d+\.?\d*")


def _upstream_numbers(text: str) -> list[float]:
    return [float(s) for s in _UPSTREAM_NUM_RE.findall(text)]


@_guard
def parse_answer_upstream(text: str, kind: str) -> Parsed:
    """The upstream scorer's rules, reproduced (flaws included) for comparison with published numbers only.

    - box: the first 4 numbers of the text. FLAW: minus signs are dropped (see `_UPSTREAM_NUM_RE`), extra numbers
      are silently ignored, and corners are not re-ordered, so swapped corners give a degenerate box (IoU 0).
    - point / trajectory: consecutive number pairs of the text. FLAW: a trailing odd number is dropped silently,
      minus signs are dropped.
    - choice: the value is the stripped prediction itself (never a failure). The scorer then counts it correct when
      it is a SUBSTRING of the ground-truth letter (upstream's ``pred in gt``). FLAW: an empty prediction is a
      substring of every string, so it counts as correct.
    - yesno / planning: the brief does not document upstream rules for these, so the strict parser is used.
    """
    if kind == "choice":
        return Parsed(text.strip(), None)
    if kind in ("yesno", "planning"):
        return parse_answer(text, kind)
    nums = [x for x in _upstream_numbers(text) if math.isfinite(x)]
    if kind == "box":
        if len(nums) < 4:
            return _fail(f"fewer than 4 numbers ({len(nums)})")
        return Parsed(tuple(nums[:4]), None)
    pairs = [(nums[i], nums[i + 1]) for i in range(0, len(nums) - 1, 2)]
    if not pairs:
        return _fail("no number pairs")
    return Parsed(pairs, None)
