"""Task kinds, the task classifier, and the strict answer parser (pure Python, no torch).

Kinds: "box", "point", "trajectory", "choice", "yesno", "planning", and "pointing" (points scored against a mask
image, as Where2Place / RoboPoint do). Ground truths look like ``{"current_bbox": [[x1, y1], [x2, y2]]}``,
``{"contact_point": [[x, y], ...]}``, ``{"future_traj": [[x, y], ...]}``, ``B`` or ``Yes``; coordinates are
normalised to [0, 1], x first.

`classify_task` is the one place that decides a record's kind (data checks import it too, so it stays free of
torch and of the scorer). `parse_answer` never raises; values it returns:

- box: ``(x1, y1, x2, y2)`` floats in [0, 1] units with ``x1 <= x2`` and ``y1 <= y2``
- point / trajectory / pointing: list of ``(x, y)`` float tuples in [0, 1] units
- choice: an upper-case letter ``"A"``-``"F"``; yesno: ``bool``; planning: the stripped text

The upstream scorers' own rules live in upstream.py (RoboInter) and pointing.py (RoboPoint).
"""

from __future__ import annotations

import re
from typing import Callable, NamedTuple

from .geometry import COORDS, first_points, parse_geometry
from .parsed import Parsed, fail

__all__ = ["KINDS", "CHOICE_LETTERS", "COORDS", "TASK_KINDS", "Parsed", "TaskKind", "classify_task", "infer_task",
           "parse_task_map", "task_from_filename", "parse_answer"]

KINDS = ("box", "point", "trajectory", "choice", "yesno", "planning", "pointing")
GEOMETRIC = ("box", "point", "trajectory", "pointing")
CHOICE_LETTERS = "ABCDEF"

# --------------------------------------------------------------------------------------------------------------------
# Task classification

# Task names of the public sets -> the kind their scorers give them. RoboInter's understanding files are all scored
# by one "decide" rule upstream (a choice letter, sometimes Yes/No), whatever their name says: "traj_choice" is a
# choice question about trajectories, not a trajectory.
TASK_KINDS = {
    **dict.fromkeys(("contact_box", "current_box", "final_box", "gripper_det"), "box"),
    "contact_point": "point",
    **dict.fromkeys(("traj", "traj_wo_init_pos"), "trajectory"),
    **dict.fromkeys(("contact_decide", "grasppose_choice", "grounding_choice", "traj_choice", "traj_direction_choice",
                     "traj_direction_choice_with_traj", "trajlang_choice", "trajlang_sub_choice"), "choice"),
    **dict.fromkeys(("where2place", "roborefit", "robospatial", "refspatial"), "pointing"),
}
# Other spellings of a kind accepted in --task-map.
_KIND_ALIASES = {"bbox": "box", "det": "box", "traj": "trajectory", "decide": "choice", "mcq": "choice",
                 "yes_no": "yesno", "mask": "pointing", "point_in_mask": "pointing", "plan": "planning"}
# RoboInter prefixes its file names with the robot data set and the eval scripts with "eval_details_"; registry
# names add "vla_" and a split suffix.
_PREFIX_RE = re.compile(r"^(?:eval_details_)?(?:(?:rh20t|droid|manipvqa)_)?(?:vla_)?")
_SUFFIX_RE = re.compile(r"(?:_qa)?(?:_(?:train|val|valid|test|eval))?$")

_KEY_RE = re.compile(r"""["']\s*([A-Za-z_][\w \-]*?)\s*["']\s*:""")
_CHOICE_GT_RE = re.compile(rf"[(\[]?([{CHOICE_LETTERS}])[)\]]?\.?")
_YESNO_GT_RE = re.compile(r"(yes|no)\.?", re.IGNORECASE)


class TaskKind(NamedTuple):
    kind: str
    source: str  # "task-map", "name" (exact table), "guess" (substring of the name) or "format" (of the ground truth)


def _kind_word(word: str) -> str | None:
    w = word.strip().lower()
    return w if w in KINDS else _KIND_ALIASES.get(w)


def _normalise_name(name: str) -> str:
    n = name.strip().lower().replace("-", "_").replace(" ", "_")
    if n.endswith((".json", ".jsonl")):
        n = n.rsplit(".", 1)[0]
    return _SUFFIX_RE.sub("", _PREFIX_RE.sub("", n))


def _guess_from_name(name: str) -> str | None:
    """Substring guesses, most specific first: "choice" or "decide" anywhere wins over "traj" or "box"."""
    t = name.lower()
    if "choice" in t or "decide" in t or t in {"mcq", "mc", "multiple_choice", "multiple-choice"}:
        return "choice"
    if t in {"yes_no", "yes/no", "yes-no", "judge", "binary", "bool", "boolean"}:
        return "yesno"
    if "box" in t or t.endswith("_det"):
        return "box"
    if "traj" in t:
        return "trajectory"
    if "point" in t:
        return "point"
    if "plan" in t:
        return "planning"
    return None


def _kind_from_format(gt: str) -> str:
    s = gt.strip()
    m = _KEY_RE.search(s)
    if m:
        key = m.group(1).lower()
        for probe, kind in (("traj", "trajectory"), ("box", "box"), ("point", "point")):
            if probe in key:
                return kind
    if _CHOICE_GT_RE.fullmatch(s):
        return "choice"
    if _YESNO_GT_RE.fullmatch(s):
        return "yesno"
    if s[:1] in "[(":
        pts = first_points(s)
        if pts is not None:
            return {1: "point", 2: "box"}.get(len(pts), "trajectory")
    return "planning"


def classify_task(task: str | None, gt: str | None, task_map: dict[str, str] | None = None,
                  has_mask: bool = False) -> TaskKind:
    """The kind a record is scored as, and what decided it, in this order:

    1. `task_map` (``--task-map NAME=KIND``): the task name exactly (case-insensitive);
    2. `TASK_KINDS`: the name without ``rh20t_`` / ``droid_`` / ``eval_details_`` / ``vla_`` prefixes and
       ``_qa`` / ``_train`` / ``_val`` / ``_test`` suffixes, or a kind name itself;
    3. a record that names a mask image is "pointing";
    4. a substring guess from the name (``choice``/``decide`` before ``box``/``det``, ``traj``, ``point``, ``plan``);
    5. the ground truth's format: a JSON key containing traj/box/point, a lone letter A-F, a lone Yes/No, a bare
       list of coordinates (2 points -> box, 1 -> point, more -> trajectory), else planning.

    A choice task whose ground truth is Yes/No is scored as yesno (upstream scores both with one rule). The caller
    should fall back to the format when a *guessed* kind does not fit the ground truth (`source == "guess"`).
    """
    gt_s = gt.strip() if isinstance(gt, str) else ""
    name = task.strip() if isinstance(task, str) else ""
    found: TaskKind | None = None
    if name and task_map:
        mapped = {k.lower(): v for k, v in task_map.items()}.get(name.lower())
        if mapped is not None:
            found = TaskKind(mapped, "task-map")
    if found is None and name:
        norm = _normalise_name(name)
        exact = TASK_KINDS.get(norm) or TASK_KINDS.get(name.lower()) or _kind_word(norm)
        if exact:
            found = TaskKind(exact, "name")
    if found is None and has_mask:
        found = TaskKind("pointing", "mask")
    if found is None and name:
        guess = _guess_from_name(_normalise_name(name))
        if guess:
            found = TaskKind(guess, "guess")
    if found is None:
        return TaskKind(_kind_from_format(gt_s) if gt_s else "planning", "format")
    if found.kind == "choice" and _YESNO_GT_RE.fullmatch(gt_s):
        return TaskKind("yesno", found.source)
    return found


def infer_task(gt: str, task: str | None = None, task_map: dict[str, str] | None = None) -> str:
    """Just the kind of `classify_task` (the ground truth first, as older callers pass it)."""
    return classify_task(task, gt, task_map).kind


def task_from_filename(path: str) -> str | None:
    """The task a file of one task is named for ("results/eval_details_traj_choice.json" -> "traj_choice",
    "rh20t_contact_box_qa.json" -> "rh20t_contact_box_qa"), or None when the name is not a known task."""
    stem = path.replace("\\", "/").rsplit("/", 1)[-1]
    stem = stem.rsplit(".", 1)[0] if stem.endswith((".json", ".jsonl")) else stem
    if _normalise_name(stem) not in TASK_KINDS:
        return None
    return stem[len("eval_details_"):] if stem.lower().startswith("eval_details_") else stem


def parse_task_map(items: list[str] | None) -> dict[str, str]:
    """``["NAME=KIND", ...]`` -> ``{NAME: KIND}``; ValueError naming the bad item."""
    out: dict[str, str] = {}
    for item in items or []:
        name, sep, kind = item.partition("=")
        k = _kind_word(kind) if sep else None
        if not name.strip() or k is None:
            raise ValueError(f"--task-map {item!r}: expected NAME=KIND with KIND one of {', '.join(KINDS)} "
                             f"(or {', '.join(sorted(_KIND_ALIASES))})")
        out[name.strip()] = k
    return out


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
        return fail("empty")
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
        return fail("ambiguous choice: " + ", ".join(sorted(letters)))
    lone = _letters(_CHOICE_LONE_RE, s)
    if len(lone) == 1:
        return Parsed(lone.pop(), None)
    if lone:
        return fail("ambiguous choice: " + ", ".join(sorted(lone)))
    return fail("no option letter found")


_WORD_RE = re.compile(r"[a-z]+")


def _parse_yesno(text: str) -> Parsed:
    words = _WORD_RE.findall(text.lower())
    if not words:
        return fail("no yes/no found")
    if words[0] in ("yes", "no"):
        return Parsed(words[0] == "yes", None)
    found = {w for w in words if w in ("yes", "no")}
    if len(found) == 1:
        return Parsed(found.pop() == "yes", None)
    if found:
        return fail("ambiguous: both yes and no")
    return fail("no yes/no found")


# --------------------------------------------------------------------------------------------------------------------
# Public parser


def _guard(fn: Callable[..., Parsed]) -> Callable[..., Parsed]:
    """Common checks, plus a last-resort guard so that parsing never raises."""

    def wrapper(text: str, kind: str, *args, **kwargs) -> Parsed:
        if kind not in KINDS:
            return fail(f"unknown task kind {kind!r} (expected one of {', '.join(KINDS)})")
        if not isinstance(text, str):
            return fail(f"not a string ({type(text).__name__})")
        try:
            return fn(text.replace("\u2212", "-"), kind, *args, **kwargs)  # U+2212 MINUS SIGN, as some tokenizers emit
        except Exception as e:  # pragma: no cover - a bug; report it as a parse failure rather than crash a run
            return fail(f"internal parser error: {type(e).__name__}: {e}")

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


@_guard
def parse_answer(text: str, kind: str, coords: str = "normalized", size: tuple[float, float] | None = None) -> Parsed:
    """Parse `text` as an answer of task `kind`; never raises. Empty or whitespace-only text gives error "empty".

    Geometry (box / point / trajectory / pointing): see `geometry.parse_geometry`; `coords` says the units of the
    answer (normalized, thousand, pixels; pixels need `size` = (width, height)) and values come back in [0, 1].
    Choice: "B", "b", "B.", "(B)", "The answer is B", "B. red cube" -> "B"; several candidate letters ("A or B") ->
    failure. Yes/no: a case-insensitive yes/no as the first word, or the only yes/no word.
    """
    if not text.strip():
        return fail("empty")
    if kind in GEOMETRIC:
        return parse_geometry(text, kind, coords, size)
    if kind == "choice":
        return _parse_choice(text)
    if kind == "yesno":
        return _parse_yesno(text)
    return Parsed(text.strip(), None)  # planning
