"""Every check on one record, the same for `lora-manip data check` and for the start of training (training refuses
broken data unless the recipe says `skip_bad_records: true`).

Per record: the structural checks of `records.to_sample` (malformed JSON, placeholders, alternation, empty
answers, paths escaping the data root), then the images (images.py: decoded in full; the sizes feed the image
token counts), then the grounding answers: a gpt answer that parses as JSON and has keys ending in
bbox/box/point/traj (answers/coordinates.py) must hold finite coordinates in [0, 1] (values above 1 get a hint
that they look like pixels; NaN/inf get their own message), and a trajectory needs at least `min_traj_points`
points. A bare JSON list is checked when the scorer's classifier (answers/kinds.py) gives the record a
geometric kind, from its task name or, without one, from the answer's format.
"""

from __future__ import annotations

import math

from ..answers.coordinates import TRAJ_KEY, answer_json, coordinate_items, n_points, numbers
from ..answers.kinds import GEOMETRIC, classify_task
from .images import image_problems
from .records import Problem, RecordIndex, Sample, to_sample

PIXEL_HINT = ("; values above 1 look like pixel coordinates: convert the file with `lora-manip data normalize` "
              "(answers must be normalised to [0, 1])")


def _task_name(sample: Sample) -> str | None:
    task = sample.extra.get("task")
    return str(task) if task else None


def task_of(sample: Sample) -> str:
    """What `data check` counts the record under: its `task`, else the kind its answer is scored as."""
    return _task_name(sample) or classify_task(None, sample.messages[-1]["content"]).kind


def _coordinate_values(sample: Sample, answer: str, obj) -> list[tuple[str, object, bool]]:
    """(key, value, is a trajectory) of each coordinate list in one parsed answer."""
    items = [(key, value, bool(TRAJ_KEY.search(key))) for key, value in coordinate_items(obj)]
    if not items and isinstance(obj, list):  # a bare list: the record's kind says whether it holds coordinates
        kind = classify_task(_task_name(sample), answer).kind
        if kind in GEOMETRIC:
            items = [(_task_name(sample) or kind, obj, kind == "trajectory")]
    return items


def answer_problems(sample: Sample, file: str, where: str, min_traj_points: int = 2) -> list[Problem]:
    problems = []
    for i, m in enumerate(sample.messages):
        if m["role"] != "assistant":
            continue
        obj = answer_json(m["content"])
        if obj is None:
            continue
        fld = f"conversations[{i}].value"
        for key, value, is_traj in _coordinate_values(sample, m["content"], obj):
            nums = numbers(value)
            if nums is None:
                continue
            if not all(map(math.isfinite, nums)):
                problems.append(Problem(file, where, sample.id, fld, f"`{key}` has NaN/inf coordinate(s); every "
                                        "coordinate must be a finite number in [0, 1]", "coords_not_finite"))
                continue
            bad = [x for x in nums if not 0.0 <= x <= 1.0]
            if bad:
                shown = ", ".join(f"{x:g}" for x in bad[:3]) + (", ..." if len(bad) > 3 else "")
                reason = f"`{key}` has {len(bad)} coordinate(s) outside [0, 1] ({shown})"
                problems.append(Problem(file, where, sample.id, fld,
                                        reason + (PIXEL_HINT if any(x > 1 for x in bad) else ""),
                                        "coords_out_of_range"))
            if is_traj:
                n = n_points(value)
                if n < min_traj_points:
                    problems.append(Problem(file, where, sample.id, fld,
                                            f"`{key}` has {n} point(s); a trajectory needs at least "
                                            f"{min_traj_points}", "short_trajectory"))
    return problems


def check_record(index: RecordIndex, pos: int, data_root: str, min_traj_points: int = 2
                 ) -> tuple[Sample | None, list[tuple[int, int]], list[Problem]]:
    """Every check on one record: (sample or None, image sizes, problems)."""
    file, where = str(index.path), index.where(pos)
    s = to_sample(index.read(pos), file, where, data_root)
    if isinstance(s, Problem):
        return None, [], [s]
    sizes, problems = image_problems(s, file, where)
    problems += answer_problems(s, file, where, min_traj_points)
    return (None if problems else s), sizes, problems
