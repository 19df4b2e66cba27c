"""Every check on one record, the same for `lora-manip data check` and for the start of training (training refuses
broken data unless the recipe says `skip_bad_records: true`).

Per record: the structural checks of `records.to_sample` (malformed JSON, placeholders, alternation, empty
answers, paths escaping the data root), then the images (images.py: decoded in full; the sizes feed the image
token counts), then the grounding answers: a gpt answer that parses as JSON gives no key twice, and its keys
ending in bbox/box/point/traj hold what answers/coordinates.value_problems (the scorer's rule too) accepts: JSON
numbers, finite, in [0, 1] (values above 1 get a hint that they look like pixels), boxes of 4 numbers or 2 corners
with the top-left first, [x, y] points, and a trajectory of at least `min_traj_points` points. A bare JSON list is checked when the scorer's classifier (answers/kinds.py) gives the record a
geometric kind, from its task name or, without one, from the answer's format. A record's `gt` field (RoboInter's
records repeat the answer there) is held to the same rule.
"""

from __future__ import annotations

import dataclasses
import json

from ..answers.coordinates import PIXEL_HINT, coordinate_values, load_answer, value_problems
from ..answers.units import box_order_problem, find, ground_truth_problem, stray_coordinates
from ..answers.kinds import classify_task
from .files import resized_size
from .images import image_problems
from .records import Problem, RecordIndex, Sample, to_sample

__all__ = ["PIXEL_HINT", "answer_problems", "box_order_problem", "check_record", "stray_in_lists", "task_of",
           "text_problems"]


def _task_name(sample: Sample) -> str | None:
    task = sample.extra.get("task")
    return str(task) if task else None


def task_of(sample: Sample) -> str:
    """What `data check` counts the record under: its `task`, else the kind its answer is scored as."""
    return _task_name(sample) or classify_task(None, sample.messages[-1]["content"]).kind


def stray_in_lists(text: str, task: str | None) -> str | None:
    """`stray_coordinates` of the bracket lists only: numbers in a choice, yes/no or planning answer's prose ("pick
    up 2 cups", "step 3") are words, not pixels; a list such as "[320, 240]" beside them is."""
    inner = find(text, bare=False)
    return stray_coordinates(text, task) if inner.lists or inner.odd else None


def text_problems(text: str, task: str | None, size, min_traj_points: int = 2) -> list[tuple[str, str]]:
    """(problem kind, reason) of one answer text (a gpt turn, or a record's `gt`) by the rule data check applies;
    `data normalize` holds what it converts to the same rule."""
    problems = []
    obj, twice = load_answer(text)
    if twice is not None:
        problems.append(("duplicate_key", f"the answer's JSON gives the key {twice!r} twice (which value is the "
                                          "ground truth?)"))
    beyond = ground_truth_problem(text, task, size)  # tuples, prose, bbox_2d...
    if beyond:
        problems.append(("coords_out_of_range", beyond))
    if obj is not None:
        # a bare list: the kind the scorer gives the record says whether (and how) it holds coordinates
        bare = classify_task(task, text).kind if isinstance(obj, list) else None
        for key, value, kind in coordinate_values(obj, bare):
            problems += value_problems(key, value, kind, min_traj_points)
    # every other shape the parser reads (it would swap the corners); one problem per answer is enough
    said = any(k in ("box_inverted", "coords_out_of_range") for k, _ in problems)
    if not said and (why := box_order_problem(text, task)) is not None:
        problems.append(("box_inverted", why))
    return problems


def answer_problems(sample: Sample, file: str, where: str, min_traj_points: int = 2, gt=None,
                    size: tuple[int, int] | None = None) -> list[Problem]:
    """The answer checks of one record; `size` (the decoded image's, when the record states none) lets a pixel
    ground truth be named as pixels of that image."""
    texts = [(f"conversations[{i}].value", m["content"]) for i, m in enumerate(sample.messages)
             if m["role"] == "assistant"]
    if isinstance(gt, (str, list, dict)):  # RoboInter's records repeat the answer in `gt`: it must not stay in pixels
        texts.append(("gt", gt if isinstance(gt, str) else json.dumps(gt)))
    return [Problem(file, where, sample.id, fld, reason, kind) for fld, text in texts
            for kind, reason in text_problems(text, _task_name(sample), sample.size or size, min_traj_points)]


def check_record(index: RecordIndex, pos: int, data_root: str, min_traj_points: int = 2,
                 stamps: dict | None = None) -> tuple[Sample | None, list[tuple[int, int]], list[Problem]]:
    """Every check on one record: (sample or None, image sizes, problems). `stamps` collects the identity of
    every image read (images.image_problems)."""
    file, where = str(index.path), index.where(pos)
    raw = index.read(pos)
    s = to_sample(raw, file, where, data_root)
    if isinstance(s, Problem):
        return None, [], [s]
    sizes, problems = image_problems(s, file, where, stamps)
    problems += answer_problems(s, file, where, min_traj_points, raw.get("gt") if isinstance(raw, dict) else None,
                                sizes[0] if len(set(sizes)) == 1 else None)
    return (None if problems else s), sizes, _resized_hint(problems, raw)


def _resized_hint(problems: list[Problem], raw) -> list[Problem]:
    """Pixel hints of a record that states its resized size (RoboInter's new_w / new_h): its coordinates may be
    pixels of that size (smart_resize_format) as well as of the image, and only `--from` tells them apart."""
    own = resized_size(raw) if isinstance(raw, dict) else None
    if not isinstance(own, tuple):
        return problems
    hint = (f"; `--from resized` if they are pixels of its new_w x new_h ({own[0]} x {own[1]}), `--from pixels` if "
            "of the image itself")
    return [dataclasses.replace(p, reason=p.reason + hint) if p.kind == "coords_out_of_range" and "pixel" in p.reason
            else p for p in problems]  # "pixel": the hint for values above 1, not for negative ones
