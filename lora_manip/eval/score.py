"""Score predictions against ground truths, per dataset and task kind (pure Python + numpy, no torch).

Input records: ``{"id", "pred", "gt"}`` plus optional ``task``, ``dataset``, ``w``, ``h`` (original image size in
pixels). Predictions may come from this kit, vLLM or upstream scripts.

Strict mode (default) uses `parse_answer`. A prediction that does not parse (including an empty one):

- box: IoU 0, so it lowers ``mean_iou`` and is a miss for ``acc@0.1`` / ``acc@0.5``;
- point: excluded from ``mean_distance`` (a distance cannot be made up) but a miss for ``acc@<threshold>``;
- trajectory: excluded from ``dtw`` / ``frechet`` / ``endpoint_error`` (the means are over parsed predictions);
  look at ``parse_failure_rate`` beside them;
- choice / yesno: wrong (``accuracy``); planning: BLEU 0.

Every group reports ``count``, ``parse_failures`` and ``parse_failure_rate``. Upstream-compatible mode uses
`parse_answer_upstream` (minus signs dropped, an empty choice counted correct, ...) and, as upstream did, drops
unparsable trajectories from the averages; it exists only to compare with published tables.

A ground truth that does not parse is an error (ValueError naming the record), never a silent zero.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..fsutil import atomic_write_json, atomic_write_text
from .metrics import (
    bleu,
    box_iou,
    discrete_frechet,
    dtw_distance,
    endpoint_error,
    point_distance,
    to_pixels,
)
from .parse import KINDS, Parsed, infer_task, parse_answer, parse_answer_upstream

__all__ = ["score_records", "load_predictions", "format_table", "write_outputs", "DEFAULT_DATASET"]

DEFAULT_DATASET = "default"
_TRAJ_METRICS = ("dtw", "frechet", "endpoint_error")


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


def _as_text(value: Any) -> Any:
    """Ground truths / predictions stored as JSON objects or arrays are scored as their JSON text."""
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return value


def _size(record: dict, rid: Any) -> tuple[float, float] | None:
    w, h = record.get("w"), record.get("h")
    if w is None and h is None:
        return None
    for name, v in (("w", w), ("h", h)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise ValueError(f"record {rid!r}: {name} must be a positive number of pixels (got {v!r})")
    return float(w), float(h)


def _score_one(kind: str, pred: Parsed, gt: Parsed, size, upstream: bool, thr: float) -> dict:
    s: dict[str, Any] = {}
    ok = pred.error is None
    if kind == "box":
        s["iou"] = box_iou(pred.value, gt.value) if ok else 0.0
    elif kind == "point":
        if ok:
            s["distance"] = point_distance(pred.value, gt.value)
            s["n_points_pred"], s["n_points_gt"] = len(pred.value), len(gt.value)
            if size:
                s["distance_px"] = point_distance(to_pixels(pred.value, *size), to_pixels(gt.value, *size))
        else:
            s["distance"] = None
        s["hit"] = bool(ok and s["distance"] <= thr)
    elif kind == "trajectory":
        for name, fn in zip(_TRAJ_METRICS, (dtw_distance, discrete_frechet, endpoint_error)):
            s[name] = fn(pred.value, gt.value) if ok else None
            if size:
                s[name + "_px"] = fn(to_pixels(pred.value, *size), to_pixels(gt.value, *size)) if ok else None
    elif kind == "choice":
        if upstream:
            # Upstream's `pred in gt`: the stripped prediction is a substring of the ground-truth letter ("" is).
            s["correct"] = bool(ok and isinstance(pred.value, str) and pred.value in gt.value)
        else:
            s["correct"] = bool(ok and pred.value == gt.value)
    elif kind == "yesno":
        s["correct"] = bool(ok and pred.value == gt.value)
    else:  # planning
        s["bleu"] = bleu(pred.value, gt.value) if ok else 0.0
    return s


def _mean(xs: list[float]) -> float | None:
    return float(sum(xs) / len(xs)) if xs else None


def _summarise(kind: str, rows: list[dict], thr: float) -> dict:
    n = len(rows)
    fails = sum(1 for r in rows if r["parse_error"] is not None)
    out: dict[str, Any] = {"count": n, "parse_failures": fails, "parse_failure_rate": fails / n if n else 0.0}
    if kind == "box":
        ious = [r["iou"] for r in rows]
        out["mean_iou"] = _mean(ious)
        out["acc@0.1"] = _mean([1.0 if x > 0.1 else 0.0 for x in ious])  # the published RoboInter metric
        out["acc@0.5"] = _mean([1.0 if x >= 0.5 else 0.0 for x in ious])
    elif kind == "point":
        out["mean_distance"] = _mean([r["distance"] for r in rows if r["distance"] is not None])
        px = [r["distance_px"] for r in rows if r.get("distance_px") is not None]
        if px:
            out["mean_distance_px"] = _mean(px)
        out[f"acc@{thr:g}"] = _mean([1.0 if r["hit"] else 0.0 for r in rows])
    elif kind == "trajectory":
        out["n_scored"] = n - fails
        for name in _TRAJ_METRICS:
            out[name] = _mean([r[name] for r in rows if r[name] is not None])
        for name in _TRAJ_METRICS:
            px = [r[name + "_px"] for r in rows if r.get(name + "_px") is not None]
            if px:
                out[name + "_px"] = _mean(px)
                out["n_scored_px"] = len(px)
    elif kind in ("choice", "yesno"):
        out["accuracy"] = _mean([1.0 if r["correct"] else 0.0 for r in rows])
    else:
        out["bleu"] = _mean([r["bleu"] for r in rows])
    return out


def _group_by_kind(rows: list[dict], thr: float) -> dict[str, dict]:
    out = {}
    for kind in KINDS:
        sel = [r for r in rows if r["kind"] == kind]
        if sel:
            out[kind] = _summarise(kind, sel, thr)
    return out


def score_records(
    records: list[dict], upstream_compatible: bool = False, point_threshold: float = 0.05
) -> tuple[list[dict], dict]:
    """Score `records`; return (per-sample rows, summary).

    Each row: ``id``, ``dataset``, ``task``, ``kind``, ``pred`` / ``gt`` (parsed values, JSON-serialisable),
    ``parse_error``, ``pred_text`` (the raw prediction) and the per-sample scores of its kind (``iou``;
    ``distance``, ``distance_px``, ``hit``; ``dtw``, ``frechet``, ``endpoint_error`` and their ``_px`` forms;
    ``correct``; ``bleu``).

    Summary: ``{"mode", "point_threshold", "count", "all": {kind: stats}, "by_dataset": {dataset: {kind: stats}},
    "by_task": {task: stats}}``. Records without ``dataset`` go to ``"default"``; ``by_task`` uses the record's
    ``task`` name, or the kind when it has none. Distances are in normalised units; ``*_px`` ones (pixels) are
    averaged over the records that give ``w`` and ``h``.

    Raises ValueError for a record without id/pred/gt, with a bad w/h, or whose ground truth does not parse.
    """
    if not (isinstance(point_threshold, (int, float)) and point_threshold >= 0):
        raise ValueError(f"point_threshold must be a non-negative number, got {point_threshold!r}")
    parse_pred = parse_answer_upstream if upstream_compatible else parse_answer
    rows: list[dict] = []
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise ValueError(f"record {i}: expected an object, got {type(rec).__name__}")
        for field in ("id", "pred", "gt"):
            if field not in rec:
                raise ValueError(f"record {i} (id={rec.get('id')!r}): missing field {field!r}")
        rid = rec["id"]
        gt_text, pred_text = _as_text(rec["gt"]), _as_text(rec["pred"])
        task = rec.get("task")
        if not isinstance(gt_text, str):
            raise ValueError(f"record {rid!r}: ground truth is not a string ({type(gt_text).__name__})")
        kind = infer_task(gt_text, task if isinstance(task, str) else None)
        gt = parse_answer(gt_text, kind)
        if gt.error is not None:
            raise ValueError(f"record {rid!r}: ground truth does not parse as {kind}: {gt.error} ({gt_text[:80]!r})")
        pred = parse_pred(pred_text, kind)
        size = _size(rec, rid)
        dataset = rec.get("dataset")
        row = {
            "id": rid,
            "dataset": str(dataset) if dataset not in (None, "") else DEFAULT_DATASET,
            "task": task if isinstance(task, str) and task else kind,
            "kind": kind,
            "pred": _jsonable(pred.value),
            "gt": _jsonable(gt.value),
            "parse_error": pred.error,
            "pred_text": pred_text,
        }
        if size:
            row["w"], row["h"] = size
        row.update(_score_one(kind, pred, gt, size, upstream_compatible, point_threshold))
        rows.append(row)

    by_dataset: dict[str, dict] = {}
    for ds in dict.fromkeys(r["dataset"] for r in rows):
        by_dataset[ds] = _group_by_kind([r for r in rows if r["dataset"] == ds], point_threshold)
    by_task = {}
    for t in dict.fromkeys(r["task"] for r in rows):
        sel = [r for r in rows if r["task"] == t]
        kinds = {r["kind"] for r in sel}
        if len(kinds) == 1:  # a task name used for several kinds cannot share one set of metrics
            by_task[t] = {"kind": sel[0]["kind"], **_summarise(sel[0]["kind"], sel, point_threshold)}
    summary = {
        "mode": "upstream_compatible" if upstream_compatible else "strict",
        "point_threshold": point_threshold,
        "count": len(rows),
        "all": _group_by_kind(rows, point_threshold),
        "by_dataset": by_dataset,
        "by_task": by_task,
    }
    return rows, summary


# --------------------------------------------------------------------------------------------------------------------
# I/O


def _check_record(path: Path, rec: Any, index: int, where: str) -> dict:
    if not isinstance(rec, dict):
        raise UserError(f"{path}: {where}: record {index} is a {type(rec).__name__}, expected a JSON object")
    for field in ("id", "pred", "gt"):
        if field not in rec:
            rid = f" (id={rec['id']!r})" if "id" in rec else ""
            raise UserError(f"{path}: {where}: record {index}{rid} has no {field!r} field (id, pred and gt are required)")
        if rec[field] is None:
            raise UserError(f"{path}: {where}: record {index} (id={rec.get('id')!r}) has a null {field!r}")
    return rec


def load_predictions(path: str | os.PathLike) -> list[dict]:
    """Read prediction records from a ``.json`` file (an array of objects) or a ``.jsonl`` file (one object a line).

    Other extensions are read as a JSON array when the file starts with ``[``, else as JSON lines. Every record needs
    ``id``, ``pred`` and ``gt``. Bad JSON or a missing field raises UserError naming the file, the line and the record.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: predictions file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read predictions file: {e}") from None
    suffix = path.suffix.lower()
    as_array = suffix == ".json" or (suffix != ".jsonl" and text.lstrip().startswith("["))
    records: list[dict] = []
    if as_array:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: line {e.lineno}, column {e.colno}: invalid JSON: {e.msg}") from None
        if not isinstance(data, list):
            raise UserError(f"{path}: expected a JSON array of records, got a {type(data).__name__}")
        for i, rec in enumerate(data):
            records.append(_check_record(path, rec, i, "array"))
    else:
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}: line {lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
            records.append(_check_record(path, rec, len(records), f"line {lineno}"))
    return records


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 1000 else f"{v:.1f}"
    return str(v)


def _main_metrics(kind: str, stats: dict) -> list[tuple[str, Any]]:
    if kind == "box":
        keys = ["mean_iou", "acc@0.1", "acc@0.5"]
    elif kind == "point":
        keys = ["mean_distance"] + (["mean_distance_px"] if "mean_distance_px" in stats else [])
        keys += [k for k in stats if k.startswith("acc@")]
    elif kind == "trajectory":
        keys = ["dtw"] + (["dtw_px"] if "dtw_px" in stats else []) + ["frechet", "endpoint_error"]
    elif kind in ("choice", "yesno"):
        keys = ["accuracy"]
    else:
        keys = ["bleu"]
    return [(k, stats.get(k)) for k in keys]


def format_table(summary: dict) -> str:
    """An aligned plain-text table: one row per (dataset, kind), "all" first; n, parse-failure %, main metrics."""
    header = ["dataset", "kind", "n", "parse-fail", "metrics"]
    body: list[list[str]] = []
    groups = [("all", summary.get("all", {}))] + list(summary.get("by_dataset", {}).items())
    if len(summary.get("by_dataset", {})) == 1:
        groups = groups[:1]  # one dataset: its rows would repeat "all"
    for name, kinds in groups:
        for kind, stats in kinds.items():
            metrics = "  ".join(f"{k}={_fmt(v)}" for k, v in _main_metrics(kind, stats))
            body.append(
                [name, kind, str(stats["count"]), f"{100.0 * stats['parse_failure_rate']:.1f}%", metrics]
            )
    widths = [max(len(r[c]) for r in [header] + body) for c in range(len(header))]
    right = {2, 3}

    def line(cells: list[str]) -> str:
        parts = [c.rjust(widths[i]) if i in right else c.ljust(widths[i]) for i, c in enumerate(cells)]
        return "  ".join(parts).rstrip()

    out = [line(header), line(["-" * w for w in widths])] + [line(r) for r in body]
    mode = summary.get("mode")
    if mode == "upstream_compatible":
        out.append("(upstream-compatible scoring: reproduces upstream flaws; use for comparison with published tables)")
    return "\n".join(out)


def write_outputs(out_dir: str | os.PathLike, rows: list[dict], summary: dict) -> None:
    """Write ``metrics.json`` (the summary) and ``predictions.jsonl`` (one row a line) into `out_dir`, atomically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "metrics.json", summary)
    atomic_write_text(out / "predictions.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
