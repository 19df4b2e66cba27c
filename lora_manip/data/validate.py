"""Every check on one record, the same for `lora-manip data check` and for the start of training (training refuses
broken data unless the recipe says `skip_bad_records: true`).

Per record: the structural checks of `records.to_sample` (malformed JSON, placeholders, alternation, empty
answers, paths escaping the data root), then the images (images.py: decoded in full; the sizes feed the image
token counts), then the grounding answers: a gpt answer that parses as JSON gives no key twice, and its keys
ending in bbox/box/point/traj hold what answers/coordinates.value_problems (the scorer's rule too) accepts: JSON
numbers, finite, in [0, 1] (values above 1 get a hint that they look like pixels), boxes of 4 numbers or 2 corners
with the top-left first, [x, y] points, and a trajectory of at least `min_traj_points` points. A bare JSON list is checked when the scorer's classifier (answers/kinds.py) gives the record a
geometric kind, from its task name or, without one, from the answer's format.
"""

from __future__ import annotations

from ..answers.coordinates import PIXEL_HINT, coordinate_values, load_answer, value_problems
from ..answers.units import ground_truth_problem
from ..answers.kinds import classify_task
from .images import image_problems
from .records import Problem, RecordIndex, Sample, to_sample

__all__ = ["PIXEL_HINT", "answer_problems", "check_record", "task_of"]


def _task_name(sample: Sample) -> str | None:
    task = sample.extra.get("task")
    return str(task) if task else None


def task_of(sample: Sample) -> str:
    """What `data check` counts the record under: its `task`, else the kind its answer is scored as."""
    return _task_name(sample) or classify_task(None, sample.messages[-1]["content"]).kind


def answer_problems(sample: Sample, file: str, where: str, min_traj_points: int = 2) -> list[Problem]:
    problems = []
    for i, m in enumerate(sample.messages):
        if m["role"] != "assistant":
            continue
        obj, twice = load_answer(m["content"])
        fld = f"conversations[{i}].value"
        if twice is not None:
            problems.append(Problem(file, where, sample.id, fld, f"the answer's JSON gives the key {twice!r} twice "
                                    "(which value is the ground truth?)", "duplicate_key"))
        beyond = ground_truth_problem(m["content"], _task_name(sample), sample.size)  # tuples, prose, bbox_2d...
        if beyond:
            problems.append(Problem(file, where, sample.id, fld, beyond, "coords_out_of_range"))
        if obj is None:
            continue
        # a bare list: the kind the scorer gives the record says whether (and how) it holds coordinates
        bare = classify_task(_task_name(sample), m["content"]).kind if isinstance(obj, list) else None
        for key, value, kind in coordinate_values(obj, bare):
            for kind_of_problem, reason in value_problems(key, value, kind, min_traj_points):
                problems.append(Problem(file, where, sample.id, fld, reason, kind_of_problem))
    return problems


def check_record(index: RecordIndex, pos: int, data_root: str, min_traj_points: int = 2,
                 stamps: dict | None = None) -> tuple[Sample | None, list[tuple[int, int]], list[Problem]]:
    """Every check on one record: (sample or None, image sizes, problems). `stamps` collects the identity of
    every image read (images.image_problems)."""
    file, where = str(index.path), index.where(pos)
    s = to_sample(index.read(pos), file, where, data_root)
    if isinstance(s, Problem):
        return None, [], [s]
    sizes, problems = image_problems(s, file, where, stamps)
    problems += answer_problems(s, file, where, min_traj_points)
    return (None if problems else s), sizes, problems
