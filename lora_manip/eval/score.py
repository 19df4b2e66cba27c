"""Score predictions against ground truths, per dataset, task and kind (pure Python + numpy + PIL, no torch).

Input records: ``{"id", "pred", "gt"}`` plus optional ``task``, ``dataset``, ``w``, ``h`` or ``width``, ``height``
(original image size in pixels), ``mask`` (a mask image for pointing questions) and ``image_size`` (upstream's).
Predictions may come from this kit, vLLM or upstream scripts.

Strict mode (default) reads answers with `parse_answer`, in the units ``coords`` says. A prediction that does not
parse (including an empty one):

- box: IoU 0, so it lowers ``mean_iou`` and is a miss for ``acc@0.1`` / ``acc@0.5``;
- point: excluded from ``mean_distance`` (a distance cannot be made up) but a miss for ``acc@<threshold>``;
- trajectory: excluded from the distances (means are over parsed predictions; see ``parse_failure_rate``);
- pointing: accuracy 0; choice / yesno: wrong; planning: BLEU 0.

Upstream-compatible mode scores box / trajectory / choice / yes-no records with RoboInter's rules (upstream.py; by
id, its task-planning ones), pointing records with RoboPoint's (pointing.py), and adds upstream's per-file table.

A record that cannot be scored (no ``pred``, a ground truth that does not parse as its kind or that data check
would refuse (answers/coordinates.truth_problem), an id that is not a string or integer or that an earlier record
of the same file has, a bad ``w``/``h``, a missing mask or one outside the mask roots, ...) never stops the run: it
is listed in ``summary["data_errors"]`` with its index, id, field and reason, and left out of every metric. A
``--task-map`` name no record has is an error (a typo would silently score those records by another rule).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from .metrics import (TRAJ_METRICS as _TRAJ_METRICS, bleu, box_iou, discrete_frechet, dtw_distance, endpoint_error,
                      group_by_kind, hausdorff_distance, point_distance, summarise_kind, to_pixels, trace_rmse_mae)
from ..answers.geometry import COORDS, DEFAULT_COORDS, Parsed, coords_above_one
from ..answers.coordinates import truth_problem
from ..answers.units import box_order_problem, value_problem
from ..answers.kinds import GEOMETRIC, classify_task
from ..errors import UserError
from ..answers.parse import parse_answer
from ..recipe.names import POINT_THRESHOLD
from . import pointing, upstream as up
from .identity import source_of
from ..data.files import size_fields
from .report import OUTPUT_FILES, read_prediction_files, write_outputs

__all__ = ["score_records", "score_files", "table_summary", "DEFAULT_DATASET"]

DEFAULT_DATASET = "default"
_TRAJ_FNS = (dtw_distance, discrete_frechet, hausdorff_distance, endpoint_error)


class _DataError(Exception):
    def __init__(self, field: str, reason: str):
        super().__init__(reason)
        self.field, self.reason = field, reason


def _jsonable(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    return value


def _answer_text(rec: dict, field: str) -> tuple[str | None, str | None]:
    """(text, None), or (None, why not) for a missing or non-text `pred` / `gt`. Answers stored as JSON objects or
    arrays are scored as their JSON text."""
    value = rec.get(field)
    if isinstance(value, (dict, list)):
        value = json.dumps(value)
    if isinstance(value, str):
        return value, None
    return None, "missing or null" if value is None else f"not a string ({type(value).__name__})"


def _size(record: dict) -> tuple[float, float] | None:
    if (keys := size_fields(record)) is None:  # width / height, else RoboInter's w / h
        return None
    w, h = record.get(keys[0]), record.get(keys[1])
    for name, v in zip(keys, (w, h)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise _DataError(name, f"must be a positive number of pixels (got {v!r})")
    return float(w), float(h)


def _score_strict(kind: str, pred: Parsed, gt: Parsed, size, thr: float) -> dict:
    s: dict[str, Any] = {}
    ok = pred.error is None
    if kind == "box":
        s["iou"] = box_iou(pred.value, gt.value) if ok else 0.0
    elif kind == "point":
        s["distance"] = point_distance(pred.value, gt.value) if ok else None
        if ok:
            s["n_points_pred"], s["n_points_gt"] = len(pred.value), len(gt.value)
            if size:
                s["distance_px"] = point_distance(to_pixels(pred.value, *size), to_pixels(gt.value, *size))
        s["hit"] = bool(ok and s["distance"] <= thr)
    elif kind == "trajectory":
        for name, fn in zip(_TRAJ_METRICS, _TRAJ_FNS):
            s[name] = fn(pred.value, gt.value) if ok else None
            if size:
                s[name + "_px"] = fn(to_pixels(pred.value, *size), to_pixels(gt.value, *size)) if ok else None
        s["trace_rmse"], s["trace_mae"] = trace_rmse_mae(pred.value, gt.value) if ok else (None, None)
    elif kind in ("choice", "yesno"):
        s["correct"] = bool(ok and pred.value == gt.value)
    else:  # planning
        s["bleu"] = bleu(pred.value, gt.value) if ok else 0.0
    return s


class _Scorer:
    def __init__(self, upstream: bool, thr: float, task_map: dict | None, coords: str, mask_roots: list[Path]):
        self.upstream, self.thr, self.task_map, self.coords = upstream, thr, task_map or {}, coords
        self.mask_roots = mask_roots

    def _pointing(self, rec: dict, row: dict, pred_text: str) -> None:
        mask_name = rec.get("mask")
        if not isinstance(mask_name, str) or not mask_name:
            raise _DataError("mask", "pointing needs a mask image (`mask`: a path relative to the predictions "
                                     "file or --data-root)")
        path = pointing.resolve_mask(mask_name, self.mask_roots)
        roots = ", ".join(map(str, self.mask_roots))
        if path == "escapes":  # like an image path: never read from outside the roots
            raise _DataError("mask", f"mask path {mask_name!r} leads out of {roots} (`..` or an absolute path)")
        if path is None:
            raise _DataError("mask", f"mask image {mask_name} not found under {roots}")
        try:
            mask = pointing.load_mask(path)
        except (OSError, ValueError, UserError) as e:  # the image reader's errors are one line naming the file
            raise _DataError("mask", f"mask: {e}") from None
        h, w = mask.shape
        row["w"], row["h"] = float(w), float(h)
        if self.upstream:
            acc = pointing.robopoint_accuracy(pred_text, mask)
            row.update(accuracy=acc, skipped=acc is None, pred=None,
                       parse_error="upstream reader raised; skipped as upstream does" if acc is None else None)
            return
        pred = parse_answer(pred_text, "pointing", self.coords, (w, h))
        row.update(pred=_jsonable(pred.value), parse_error=pred.error, skipped=False,
                   accuracy=pointing.mask_accuracy(pred.value, mask) if pred.ok else 0.0)

    def _upstream(self, kind: str, rec: dict, row: dict, pred_text: str, gt_text: str) -> dict:
        try:
            row.update(up.score_upstream(kind, pred_text, gt_text, rec))
        except ValueError as e:
            raise _DataError("gt", str(e)) from None
        row.setdefault("gt", gt_text)
        row.update(pred_text=pred_text, pred=None, parse_error=_upstream_parse_note(row))
        return row

    def record(self, rec: Any) -> dict:
        if not isinstance(rec, dict):
            raise _DataError("-", f"expected an object, got {type(rec).__name__}")
        rid = rec.get("id")
        if rid is not None and (isinstance(rid, bool) or not isinstance(rid, (str, int))):
            raise _DataError("id", f"must be a string or an integer, got {type(rid).__name__}")
        pred_text, problem = _answer_text(rec, "pred")
        if problem:
            raise _DataError("pred", problem)
        gt_text, gt_problem = _answer_text(rec, "gt")  # pointing needs none: decided once the kind is known
        task = rec.get("task") if isinstance(rec.get("task"), str) and rec.get("task") else None
        tk = classify_task(task, gt_text, self.task_map, has_mask=bool(rec.get("mask")))
        dataset = rec.get("dataset")
        row: dict[str, Any] = {"id": rec.get("id"), "dataset": str(dataset) if dataset not in (None, "") else
                               DEFAULT_DATASET, "task": task or tk.kind, "kind": tk.kind, "kind_from": tk.source}
        size = _size(rec)
        if size:
            row["w"], row["h"] = size
        if tk.kind == "pointing":
            row.update(gt=rec.get("mask"), pred_text=pred_text)
            self._pointing(rec, row, pred_text)
            return row
        if gt_problem:
            raise _DataError("gt", gt_problem)
        kind = tk.kind
        if self.upstream and (kind in up.UPSTREAM_TYPE and tk.source != "guess" or up.planning_type(rid)):
            return self._upstream(kind, rec, row, pred_text, gt_text)  # upstream does not parse ground truths
        gt = parse_answer(gt_text, kind)
        if not gt.ok and tk.source == "guess":  # a name guess the ground truth contradicts: trust a clear format
            by_format = classify_task(None, gt_text).kind
            if by_format != "planning":  # prose is no evidence; keep the guess and report the ground truth
                kind, gt = by_format, parse_answer(gt_text, by_format)
                row.update(kind=kind, kind_from="format")
        if not gt.ok:
            raise _DataError("gt", f"does not parse as {kind} ({tk.source}): {gt.error} ({gt_text[:80]!r})")
        row.update(gt=_jsonable(gt.value), pred_text=pred_text)
        if self.upstream and kind in up.UPSTREAM_TYPE:
            return self._upstream(kind, rec, row, pred_text, gt_text)
        problem = (truth_problem(gt_text, kind) or box_order_problem(gt_text, kind) or value_problem(gt.value, size)
                   ) if kind in GEOMETRIC else None  # box order in any shape, as data check
        if problem:  # the parser would read it anyway (corners re-ordered, "0.1" as 0.1): the data is wrong
            raise _DataError("gt", problem)
        if kind in GEOMETRIC and self.coords == "pixels" and not size:
            raise _DataError("w/h", "--coords pixels needs the image size of every grounding record")
        pred = parse_answer(pred_text, kind, self.coords, size)
        row.update(pred=_jsonable(pred.value), parse_error=pred.error)
        if pred.ok and kind in GEOMETRIC and self.coords == "normalized" and coords_above_one(pred.value):
            row["coords_suspicious"] = True
        row.update(_score_strict(kind, pred, gt, size, self.thr))
        return row


def task_map_problem(task_map: dict | None, tasks) -> str | None:
    """A `--task-map` name that no record's task has (compared as classify_task does: case and spaces aside): a
    typo would otherwise leave the records it meant scored by another rule, silently."""
    have = {t.strip().lower() for t in tasks if isinstance(t, str)}
    unknown = [name for name in task_map or {} if name.strip().lower() not in have]
    if not unknown:
        return None
    shown = ", ".join(sorted(have)[:10]) + (", ..." if len(have) > 10 else "") if have else "none"
    return (f"--task-map {', '.join(unknown)}: no record has that task (the tasks here: {shown}); check the "
            "spelling")


def _duplicates(records: list, origins: list | None) -> dict[int, int]:
    """{index: index of the first record with the same id (from the same file and `dataset`: an eval of several
    files writes one predictions file)} for each repeat: a record given twice is scored once."""
    first: dict = {}
    out = {}
    for i, rec in enumerate(records):
        rid = rec.get("id") if isinstance(rec, dict) else None
        if rid is not None and not isinstance(rid, (dict, list)):
            j = first.setdefault((origins[i] if origins else None, str(rec.get("dataset")), str(rid)), i)
            if j != i:
                out[i] = j
    return out


def _upstream_parse_note(row: dict) -> str | None:
    if row.get("upstream_step") == "zeros":
        return "upstream: fewer than 4 numbers, box read as [0, 0, 0, 0]"
    if row.get("upstream_points") == 0:
        return "upstream: no point (DTW infinite, set to 0 and dropped)"
    return None


def settings_problem(upstream_compatible: bool, point_threshold, coords: str) -> str | None:
    """What is wrong with the scoring settings, if anything: checked here for library callers and by `eval` before
    it loads a model, so a bad flag never costs a generation run."""
    if not (isinstance(point_threshold, (int, float)) and point_threshold >= 0):
        return f"--point-threshold must be a non-negative number, got {point_threshold!r}"
    if coords not in COORDS:
        return f"--coords {coords}: choose one of {', '.join(COORDS)}"
    if upstream_compatible and coords != "normalized":
        return ("--coords applies to the strict scorer; upstream rules read coordinates their own way "
                "(RoboInter: [0, 1] scaled by the image size; RoboPoint: '.' means a fraction)")
    return None


def score_records(records: list[dict], upstream_compatible: bool = False, point_threshold: float = POINT_THRESHOLD,
                  task_map: dict[str, str] | None = None, coords: str = DEFAULT_COORDS,
                  mask_roots: list[str | os.PathLike] | None = None, origins: list | None = None,
                  files: dict[str, str] | None = None) -> tuple[list[dict], dict]:
    """Score `records`; return (per-record rows, summary). Never raises for a bad record (see the module docstring).

    `task_map`: ``{task name: kind}`` that overrides the built-in names (every name must be some record's task);
    `coords`: units of the predictions' coordinates (normalized, thousand or pixels; ground truths are always
    [0, 1]); `mask_roots`: folders a record's ``mask`` path is looked up in, in order (never outside them);
    `origins`: the file each record came from (ids are unique per file; default: one file); `files`: {dataset: its
    annotation file} (eval's). Both name the val file a record belongs to (identity.py).

    Each row: ``id``, ``dataset``, ``task``, ``kind``, ``kind_from``, ``source`` (the val file it belongs to, as
    upstream names it, else its task, else its dataset: upstream's per-file rows and the tables group by it),
    ``pred`` / ``gt`` (parsed values), ``parse_error``, ``pred_text`` and its kind's scores. Summary: ``{"mode",
    "coords", "point_threshold", "count", "records", "data_errors", "all": {kind: stats}, "by_dataset": {dataset:
    {kind: stats}}, "by_task": {task: stats}}``, plus ``"upstream"`` (per-file table, Average Score) in
    upstream-compatible mode.

    Raises ValueError only for bad arguments.
    """
    problem = settings_problem(upstream_compatible, point_threshold, coords) or task_map_problem(
        task_map, (r.get("task") for r in records if isinstance(r, dict)))
    if problem:
        raise ValueError(problem)
    repeats = _duplicates(records, origins)
    scorer = _Scorer(upstream_compatible, point_threshold, task_map, coords, [Path(p) for p in mask_roots or ["."]])
    rows: list[dict] = []
    errors: list[dict] = []
    for i, rec in enumerate(records):
        rid = rec.get("id") if isinstance(rec, dict) else None
        if i in repeats:
            errors.append({"index": i, "id": rid, "field": "id", "reason": f"duplicate id: record {repeats[i]} has "
                           "the same id; each record is scored once"})
            continue
        try:
            row = scorer.record(rec)
        except _DataError as e:
            errors.append({"index": i, "id": rid, "field": e.field, "reason": e.reason})
        except Exception as e:  # one record's surprise must not cost the whole run its numbers
            errors.append({"index": i, "id": rid, "field": "-", "reason": f"cannot score: {type(e).__name__}: {e}"})
        else:
            task = rec.get("task")  # the record's own, never the kind it was scored as: kinds are not files
            row["source"] = source_of(row["dataset"], ((files or {}).get(row["dataset"]), origins[i] if origins else
                                                       None), task if isinstance(task, str) else None, rid)
            rows.append(row)

    by_task = {}
    for t in dict.fromkeys(r["task"] for r in rows):
        sel = [r for r in rows if r["task"] == t]
        if len({r["kind"] for r in sel}) == 1:  # a task name used for several kinds cannot share one set of metrics
            by_task[t] = {"kind": sel[0]["kind"], **summarise_kind(sel[0]["kind"], sel, point_threshold)}
    geometric = [r for r in rows if r["kind"] in GEOMETRIC and r.get("pred") is not None]
    summary: dict[str, Any] = {
        "mode": "upstream_compatible" if upstream_compatible else "strict",
        "coords": {"predictions": coords, "ground_truth": "normalized",
                   "suspicious": sum(1 for r in geometric if r.get("coords_suspicious")),
                   "geometric_predictions": len(geometric)},
        "point_threshold": point_threshold,
        "count": len(rows),
        "records": len(records),
        "data_errors": errors,
        "all": group_by_kind(rows, point_threshold),
        "by_dataset": {ds: group_by_kind([r for r in rows if r["dataset"] == ds], point_threshold)
                       for ds in dict.fromkeys(r["dataset"] for r in rows)},
        "by_task": by_task,
    }
    if upstream_compatible:
        summary["upstream"] = up.summarise_files(rows)
    return rows, summary


def table_summary(name: str, records: list[dict], rows: list[dict], summary: dict, **kwargs) -> dict:
    """A published table's layout (table.py) for `records`, given their `rows` and `summary` in one mode: the other
    mode is scored here with score_records' `kwargs`, the same ones (upstream rules read coordinates their own way)."""
    from .table import build_table

    if summary["mode"] == "upstream_compatible":
        strict_rows, strict = score_records(records, False, **kwargs)
        return build_table(name, strict_rows, strict, rows)
    upstream_rows, _ = score_records(records, True, **{**kwargs, "coords": DEFAULT_COORDS})
    return build_table(name, rows, summary, upstream_rows)


def score_files(predictions: list[str | os.PathLike], out: str | os.PathLike | None = None, force: bool = False,
                upstream_compatible: bool = False, point_threshold: float = POINT_THRESHOLD,
                task_map: dict | None = None, coords: str = DEFAULT_COORDS, data_root: str | os.PathLike | None = None,
                table: str | None = None) -> dict:
    """`lora-manip score`: read and score prediction files; with `out`, write metrics.json and scores.jsonl there
    (never over an input, nor earlier results unless `force`). `table`: also a published table's layout (table.py)."""
    from ..outputs import check_results, results_folder
    from .table import table_problem

    if table_problem(table):
        raise UserError(table_problem(table))
    paths = [Path(p).expanduser() for p in predictions]  # the shell leaves `~` in quotes and after `--opt=`
    if out is not None:
        out = check_results(out, OUTPUT_FILES, force, files=paths)  # before any work; again below, holding it
    records, origins = read_prediction_files(paths, by_task=upstream_compatible or bool(table))
    roots = ([Path(data_root).expanduser()] if data_root else []) + list(dict.fromkeys(p.parent for p in paths))
    try:
        rows, summary = score_records(records, upstream_compatible, point_threshold, task_map, coords, roots,
                                      origins)
    except ValueError as e:
        raise UserError(str(e)) from None
    if table:
        summary["table"] = table_summary(table, records, rows, summary, point_threshold=point_threshold,
                                         task_map=task_map, coords=coords, mask_roots=roots, origins=origins)
    if out is not None:
        with results_folder(out, "lora-manip score", OUTPUT_FILES):
            check_results(out, OUTPUT_FILES, force, files=paths)
            write_outputs(out, rows, summary)
    return summary
