"""Task kinds and the one task classifier: the kind a record is scored as, for scoring, GRPO rewards and `data
check` alike (pure Python, no torch).

Kinds: "box", "point", "trajectory", "choice", "yesno", "planning", and "pointing" (points scored against a mask
image, as Where2Place / RoboPoint do). Ground truths look like ``{"current_bbox": [[x1, y1], [x2, y2]]}``,
``{"contact_point": [[x, y], ...]}``, ``{"future_traj": [[x, y], ...]}``, ``B`` or ``Yes``; coordinates are
normalised to [0, 1], x first. parse.py reads an answer once its kind is known.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from .geometry import first_points

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

    A choice task whose ground truth is Yes/No is scored as yesno (upstream scores both with one rule); a planning
    kind guessed from the name yields to a ground truth of another clear shape (a letter, Yes/No, coordinates). The
    caller should fall back to the format when a *guessed* kind does not fit the ground truth (`source == "guess"`).
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
    if found.kind == "planning" and found.source == "guess" and gt_s:
        # "plan" in a name is a weak hint: RoboInter's task_planning files mix free-text plans with A-D primitive
        # choices and Yes/No success questions under one task name; a ground truth of a clear shape says which.
        shaped = _kind_from_format(gt_s)
        if shaped != "planning":
            return TaskKind(shaped, "format")
    if found.kind == "choice" and _YESNO_GT_RE.fullmatch(gt_s):
        return TaskKind("yesno", found.source)
    return found


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
