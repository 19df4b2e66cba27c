"""Reading prediction files, the printed table, and writing metrics.json / scores.jsonl (no torch)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..fsutil import atomic_write_json, atomic_write_text
from ..answers.kinds import GEOMETRIC, task_from_filename
from .upstream import format_files

__all__ = ["load_predictions", "read_prediction_files", "format_table", "main_metrics", "write_outputs",
           "OUTPUT_FILES"]

OUTPUT_FILES = ("metrics.json", "scores.jsonl")


def _check_record(path: Path, rec: Any, index: int, where: str, task: str | None) -> dict:
    if not isinstance(rec, dict):
        raise UserError(f"{path}: {where}: record {index} is a {type(rec).__name__}, expected a JSON object")
    rid = rec.get("id")
    if rid is None:
        raise UserError(f"{path}: {where}: record {index} has no 'id' field (every record needs id, pred, gt)")
    if isinstance(rid, bool) or not isinstance(rid, (str, int)):
        raise UserError(f"{path}: {where}: record {index} field `id`: must be a string or an integer, got "
                        f"{type(rid).__name__}")
    if task and not rec.get("task"):
        rec["task"] = task
    return rec


def load_predictions(path: str | os.PathLike) -> list[dict]:
    """Read prediction records from a ``.json`` file (an array of objects) or a ``.jsonl`` file (one object a line).

    Read by the same reader as annotation files (data/records.RecordIndex, data/files.py's rule): the extension in
    any case, other names by their first character (``[``: an array), a BOM skipped, a key given twice refused.
    Every record needs an ``id`` (a string or an integer; missing ``pred`` / ``gt`` are reported per record by the
    scorer). Records without ``task`` take it from a file named for one task (upstream's
    ``eval_details_<task>.json``). Bad JSON raises UserError naming the file and line.
    """
    from ..data.records import Problem, RecordIndex

    def invalid(p: Problem) -> UserError:
        if not p.reason.startswith("malformed JSON"):  # JSON, but not records (an object, JSON lines named .json)
            return UserError(f"{path}: {p.where}: {p.reason}")
        return UserError(f"{path}: {p.where}: invalid JSON{p.reason.removeprefix('malformed JSON')}")

    path = Path(path)
    index = RecordIndex(path, what="predictions file")
    if index.problems:  # a .json array that does not parse: its line
        raise invalid(index.problems[0])
    task = task_from_filename(str(path))
    records: list[dict] = []
    for i in range(len(index)):
        rec = index.read(i)
        if isinstance(rec, Problem):
            raise invalid(rec)
        records.append(_check_record(path, rec, i, index.where(i), task))
    return records


def read_prediction_files(paths: list[Path], by_task: bool = False) -> tuple[list[dict], list[str]]:
    """(every record of every file, the file each came from); a file given twice or one without records is a
    UserError. With several files, a record without a `dataset` takes its file's name (as eval names files), so
    each file is a row of its own; a record whose `dataset` and id another file also answers (two evals' predictions
    files) is a UserError, since the two would share one row; so are, when the scores group by task (`by_task`:
    upstream's lines, a table), two upstream eval_details files of one task (two models')."""
    from .sources import file_names

    records: list[dict] = []
    origins: list[str] = []
    seen: dict[Path, Path] = {}
    answered: dict[tuple, Path] = {}  # (dataset, id) -> the file that answers it (eval's files name datasets)
    names = file_names(paths) if len(paths) > 1 else [None] * len(paths)
    tasks: dict[str, Path] = {}  # upstream's eval_details_<task>.json: one file per task and model
    for p, name in zip(paths, names):
        same = seen.setdefault(p.resolve(), p)
        if same is not p:  # its records would count twice
            raise UserError(f"{p}: given twice (as {same} and {p}); each predictions file is scored once")
        task = task_from_filename(str(p)) if by_task and p.name.lower().startswith("eval_details_") else None
        if task and tasks.setdefault(task, p) is not p:  # upstream's lines and the table group by task
            raise UserError(f"{p}: upstream's file of task {task!r} again (also {tasks[task]}): two models' "
                            "eval_details files would be mixed into one upstream line or table cell; score one "
                            "model's files at a time")
        got = load_predictions(p)
        if not got:  # an empty table with exit 0 would read as "scored, all fine"
            raise UserError(f"{p}: no records (the predictions file is empty); nothing to score")
        for i, rec in enumerate(got):  # two evals' answers to one record would be averaged into one row
            key = (rec.get("dataset"), str(rec["id"]))
            if key[0] not in (None, "") and answered.setdefault(key, p) is not p:
                raise UserError(f"{p}: record {i} id={rec['id']!r} of dataset {key[0]!r} is answered in "
                                f"{answered[key]} too: two evals of the same records are scored one at a time (one "
                                "`lora-manip score` each), or their numbers would be averaged into one row")
        for rec in got if name else []:
            if rec.get("dataset") in (None, ""):
                rec["dataset"] = name
        records += got
        origins += [str(p)] * len(got)
    return records, origins


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 1000 else f"{v:.1f}"
    return str(v)


def main_metrics(kind: str, stats: dict) -> list[tuple[str, Any]]:
    if kind == "box":
        keys = ["mean_iou", "acc@0.1", "acc@0.5"]
    elif kind == "point":
        keys = ["mean_distance"] + (["mean_distance_px"] if "mean_distance_px" in stats else [])
        keys += [k for k in stats if k.startswith("acc@")]
    elif kind == "trajectory" and "n_dropped" in stats:
        keys = ["dtw_px", "n_dropped"]
    elif kind == "trajectory":
        keys = ["dtw"] + (["dtw_px"] if "dtw_px" in stats else []) + ["frechet", "hausdorff", "endpoint_error",
                                                                      "trace_rmse", "trace_mae"]
    elif kind == "pointing":
        keys = ["accuracy"] + (["skipped"] if stats.get("skipped") else [])
    elif kind in ("choice", "yesno"):
        keys = ["accuracy"]
    else:
        keys = ["bleu"]
    return [(k, stats.get(k)) for k in keys]


_COORD_WORDS = {"normalized": "[0, 1] of the image", "thousand": "0-1000 of the image (Qwen2-VL style)",
                "pixels": "pixels of the original image (w, h)"}


def format_table(summary: dict, max_errors: int = 10) -> str:
    """An aligned plain-text table: one row per (dataset, kind), "all" first; n, parse-failure %, main metrics.
    Then what the coordinates were read as, the records that could not be scored, and in upstream-compatible mode
    upstream's per-file lines and Average Score."""
    header = ["dataset", "kind", "n", "parse-fail", "metrics"]
    body: list[list[str]] = []
    groups = [("all", summary.get("all", {}))] + list(summary.get("by_dataset", {}).items())
    if len(summary.get("by_dataset", {})) == 1:
        groups = groups[:1]  # one dataset: its rows would repeat "all"
    for name, kinds in groups:
        for kind, stats in kinds.items():
            metrics = "  ".join(f"{k}={_fmt(v)}" for k, v in main_metrics(kind, stats))
            body.append([name, kind, str(stats["count"]), f"{100.0 * stats['parse_failure_rate']:.1f}%", metrics])
    widths = [max(len(r[c]) for r in [header] + body) for c in range(len(header))]

    def line(cells: list[str]) -> str:
        parts = [c.rjust(widths[i]) if i in (2, 3) else c.ljust(widths[i]) for i, c in enumerate(cells)]
        return "  ".join(parts).rstrip()

    out = [line(header), line(["-" * w for w in widths])] + [line(r) for r in body]
    mode = summary.get("mode")
    coords = summary.get("coords") or {}
    if mode == "upstream_compatible":
        out.append("(upstream-compatible scoring: reproduces upstream flaws; use for comparison with published tables)")
    elif coords and any(k in GEOMETRIC for k in summary.get("all", {})):  # said only where there are coordinates
        out.append(f"coordinates: predictions read as {_COORD_WORDS.get(coords['predictions'], coords['predictions'])}"
                   f" (--coords {coords['predictions']}); ground truths as [0, 1]")
        if coords.get("suspicious"):
            out.append(f"  {coords['suspicious']} of {coords['geometric_predictions']} grounding predictions have "
                       "coordinates far outside [0, 1]: pixels or 0-1000? try --coords pixels or --coords thousand")
    errors = summary.get("data_errors") or []
    if errors:
        out.append(f"{len(errors)} of {summary.get('records', '?')} record(s) could not be scored (left out above):")
        for e in errors[:max_errors]:
            out.append(f"  - record {e['index']} id={e['id']!r} field `{e['field']}`: {e['reason']}")
        if len(errors) > max_errors:
            out.append(f"  ... {len(errors) - max_errors} more in metrics.json (data_errors)")
    if summary.get("upstream"):
        out += ["", "upstream per-file scores:", format_files(summary["upstream"])]
    return "\n".join(out)


def write_outputs(out_dir: str | os.PathLike, rows: list[dict], summary: dict) -> None:
    """Write ``metrics.json`` (the summary) and ``scores.jsonl`` (one scored record a line) into `out_dir`,
    each atomically. Check the folder first (outputs.check_results, inside outputs.results_folder)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "metrics.json", summary)
    atomic_write_text(out / "scores.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
