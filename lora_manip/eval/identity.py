"""Which RoboInter val file a record belongs to: the one answer upstream's per-file printout (`score
--upstream-compatible`) and the published tables (table.py) both read, so the two can never disagree.

A record's file is named, in this order, by:

1. its dataset's name, the registry's entry (unambiguous: `vla_traj_init_point_qa_val`). Upstream's registry names
   the trajectory sets the other way round from the release's files: ``*_vla_traj_qa_*`` reads
   ``..._traj_qa_wo_init_pos.json``, ``*_vla_traj_init_point_qa_*`` reads ``..._traj_qa.json``;
2. its file's name (the annotation file eval read, else the predictions file `score` read), matched by the same
   patterns whatever its prefix (the release's file names are not published): ``contact_box.json``,
   ``val_contact_box_qa.json`` and ``full_single_multi_contact_obj_contact_box_qa.json`` are all `contact_box`;
   ``..._traj_qa_wo_init_pos.json`` is `traj_wo_init_pos`; ``Task_planning/meta/val/choice/task_planning.json`` is
   `plan_choice` (its folder says which of the three task-planning files);
3. upstream's task-planning names in its id (how ``task_planning/eval.py`` sorts records);
4. its `task` (the release does not publish what its records carry there, so it comes last), by the exact names
   only (the prefixes upstream's files and registry use aside): a task "future_traj" is no file's.

A record none of these names keeps a name of its own, never its answer kind: its `task` when it has one (upstream's
``eval_details_<task>.json`` files), else its dataset (eval and `score` name each input file a dataset), so an
unrecognised file is one row of upstream's printout, never merged with other files of its kind.
"""

from __future__ import annotations

import re
from pathlib import PurePath
from typing import Any

from .upstream_planning import planning_type

__all__ = ["GENERATION", "UNDERSTANDING", "PLANNING", "KNOWN", "file_line", "dataset_line", "source_of"]

# upstream's json_name_list (generation.py) with its task types, then the three Task_planning val files
GENERATION = (("contact_box", "box"), ("current_box", "box"), ("final_box", "box"), ("gripper_det", "box"),
              ("traj", "traj"), ("traj_wo_init_pos", "traj"))
UNDERSTANDING = ("contact_decide", "grasppose_choice", "grounding_choice", "traj_choice", "traj_direction_choice",
                 "traj_direction_choice_with_traj", "trajlang_choice", "trajlang_sub_choice")
PLANNING = ("planning", "plan_choice", "plan_decide")
KNOWN = frozenset([k for k, _ in GENERATION] + list(UNDERSTANDING) + list(PLANNING))

# Other spellings of a file: the release's trajectory file without a start position, upstream's training registry
# names for the understanding files (docs/data.md lists which name reads which file), the trajectory images' folder
# name, and the three Task_planning val files (all called task_planning.json, told apart by their folder).
_ALIASES = {"traj_qa_wo_init_pos": "traj_wo_init_pos", "traj_init_point": "traj",
            "traj_lang_choice": "trajlang_choice", "traj_lang_sub_choice": "trajlang_sub_choice",
            "contact_choice": "contact_decide", "graspppose_choice": "grasppose_choice",
            "manipvqa_planning": "planning", "manipvqa_choice": "plan_choice", "manipvqa_decide": "plan_decide",
            "planning/task_planning": "planning", "choice/task_planning": "plan_choice",
            "decide/task_planning": "plan_decide"}
# Longest first: `traj_direction_choice_with_traj` before `traj`, `traj_qa_wo_init_pos` before anything it ends in.
_NAMES = sorted(KNOWN | set(_ALIASES), key=len, reverse=True)
_SUFFIX = re.compile(r"_(?:qa|train|val|valid|test|eval)$")
_PREFIX = re.compile(r"^(?:eval_details_)?(?:full_single_multi_contact_obj_)?(?:(?:rh20t|droid)_)?(?:vla_)?")
_BY_ID = {"planning": "planning", "plan_choice": "plan_choice", "plan_decide": "plan_decide"}


def _stem(name: str) -> str:
    n = str(name).strip().lower().replace("-", "_").replace(" ", "_").replace("\\", "/")
    if n.endswith((".json", ".jsonl")):
        n = n.rsplit(".", 1)[0]
    parts = PurePath(n).parts
    if len(parts) >= 2 and parts[-1] == "task_planning":  # Task_planning/meta/val/<which>/task_planning.json
        return "/".join(parts[-2:])
    return parts[-1] if parts else n


def file_line(name: Any, any_prefix: bool = True) -> str | None:
    """The val file a file (or dataset) name names, whatever its prefix, with or without ``_qa`` and a split suffix;
    None when it names none (``task_planning`` alone: the training file mixes all three types). Without
    `any_prefix` (a record's `task`, a free name: "future_traj" is not the traj file) only the prefixes the release
    and upstream's scripts use may precede the name."""
    if not isinstance(name, str) or not name.strip():
        return None
    n = _stem(name)
    if n.rsplit("/", 1)[-1] == "task_planning":  # only its folder says which (the training file mixes all three)
        return _ALIASES.get(n)
    while (shorter := _SUFFIX.sub("", n)) != n:  # `contact_box_qa_val`, `val_contact_box_qa`
        n = shorter
    if not any_prefix:
        n = _PREFIX.sub("", n)
    for known in _NAMES:
        if n == known or any_prefix and n.endswith(("_" + known, "/" + known)):
            return _ALIASES.get(known, known)
    return None


def dataset_line(name: Any) -> str | None:
    """The val file a dataset name names: upstream's registry names first (the trajectory sets the other way round
    from the files' names), then the file patterns."""
    if not isinstance(name, str) or not name.strip():
        return None
    n = name.strip().lower()
    if re.search(r"vla_traj_qa(?:_|$)", n):
        return "traj_wo_init_pos"
    if "traj_init_point" in n:
        return "traj"
    return file_line(name)


def source_of(dataset: Any, files: tuple = (), task: Any = None, rid: Any = None) -> str:
    """The file a record belongs to (see the module docstring): a name of `KNOWN` when its dataset, one of its
    `files` (the annotation file, the predictions file), its id or its task names one, else its task, else its
    dataset."""
    line = dataset_line(dataset) or next((k for f in files if (k := file_line(f))), None)
    line = line or _BY_ID.get(planning_type(rid) or "") or file_line(task, any_prefix=False)
    if line:
        return line
    return task if isinstance(task, str) and task else str(dataset)
