"""RoboInter's own scorer, rule for rule, flaws included (pure Python + numpy, no torch).

Reproduces ``RoboInterVLM-QwenVL/eval/benchmark/eval_llava_format/manip/generation.py`` with source "llava"
(coordinates in [0, 1], scaled by the image size), so that numbers can be put next to RoboInter's tables. Use the
strict scorer (score.py) for anything else; docs/evaluation.md ("Reproducing published numbers") lists what differs
and why.

Upstream knows three task types and scores every file (task) with one of them:

- ``box`` (contact_box, current_box, final_box, gripper_det): the prediction is read by `box_answer` (below), the
  ground truth as its first four UNSIGNED numbers; both are scaled by the image size and compared by `iou`, which
  does not re-order corners. Per file: mean IoU (the file's score) and accuracy at IoU > 0.1.
- ``traj`` (traj, traj_wo_init_pos): prediction and ground truth are their unsigned numbers in pairs (an odd last
  number dropped), scaled by the image size; DTW as in metrics.py. A DTW of 0 - a perfect answer, OR an empty
  prediction (infinite DTW is set to 0) - is DROPPED from the file's mean.
- ``decide`` (everything else: the eight understanding files): correct when ``gt in pred[-100:] or pred in gt``
  on the stripped strings, so an empty prediction is correct and any answer that contains the letter anywhere in
  its last 100 characters is correct.

A record whose id names one of the task-planning tasks is scored by upstream's other script, task_planning/eval.py,
whatever its kind (upstream_planning.py); its per-file entries stay out of the Average Score, which generation.py
alone prints.

The image size is the record's ``image_size`` field when present, else 640x480 when ``RH20T`` (upper case) is in
the id, else 320x180 (DROID). The "Average Score" is the mean of the files' scores: mean IoU, mean DTW in pixels and
accuracy averaged together, as upstream prints it.

Trajectory records also get VABench-V's visual-trace RMSE / MAE by Embodied-R1's published scorer
(``eval/hf_inference_vabench_visual_trace.py`` of pickxiguapi/Embodied-R1), rule for rule (`vabench_trace`):

- the answer: inside ``<answer>...</answer>`` when it has that tag (on one line, as upstream's regex needs; a tagged
  answer whose tag does not close there reads as empty: the script with ``reasoning_model=True``, as published),
  else the whole answer (the script with ``reasoning_model=False``), then the first ``<point>[...]</point>``,
  read as JSON, else as its ``[x, y]`` pairs of unsigned numbers; no tag, no points. Its points are PIXELS of the image (the
  record's ``w`` / ``h``, else ``image_size``); a point that is not a pair of numbers makes upstream's script raise,
  and the record is left out;
- both traces scaled to 0-999 (x / width * 999; the kit's [0, 1] ground truth times 999);
- when both have at least 2 points: both resampled by INDEX to the longer one's length, RMSE = sqrt(mean of
  dx^2 + dy^2), MAE = mean of (|dx| + |dy|) / 2; otherwise the record is left out of the means.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import numpy as np

from ..answers.parse import parse_answer
from .metrics import dtw_distance, resample_by_index
from .upstream_planning import PLAN_KIND, format_plan_entry, plan_entries, planning_type, score_plan

__all__ = ["UPSTREAM_TYPE", "numbers", "box_answer", "traj_answer", "image_size", "iou", "decide",
           "trace_points", "vabench_trace", "score_upstream", "summarise_files", "format_files"]

# Kit kind -> upstream task type. Kinds upstream has no scorer for (point, planning, pointing) keep the kit's,
# except records whose id names a task-planning task (upstream_planning.py), scored by that script whatever their kind.
UPSTREAM_TYPE = {"box": "box", "trajectory": "traj", "choice": "decide", "yesno": "decide"}

# Numbers as upstream reads them everywhere except the first box step: no sign, no exponent ("-0.1" -> 0.1,
# "1e-3" -> 1 and 3), digits inside words count ("bbox_2d" -> 2).
_UNSIGNED_RE = re.compile(r"\d+\.?\d*|\.\d+")
# Box step 1: four comma-separated SIGNED numbers, optionally inside one bracket or parenthesis each side.
_SIGNED = r"(-?\d*\.?\d+)"
_BOX4_RE = re.compile(r"[\[(]?\s*" + r"\s*,\s*".join([_SIGNED] * 4) + r"\s*[\])]?")
# Box step 2: [[int, int], [int, int]].
_INT_PAIRS_RE = re.compile(r"\[\s*\[\s*\d+\s*,\s*\d+\s*\]\s*,\s*\[\s*\d+\s*,\s*\d+\s*\]\s*\]")

RH20T_SIZE = (640.0, 480.0)
DROID_SIZE = (320.0, 180.0)


def numbers(text: str) -> list[float]:
    return [float(s) for s in _UNSIGNED_RE.findall(text)]


def _json_flat(match: re.Match | None) -> list[float] | None:
    if match is None:
        return None
    try:
        value = json.loads(match.group())
    except ValueError:  # "(0.1, ...)", "0.1, 0.2, ..." (extra data), "-.5", "[0.1, ... 0.4" fail JSON
        return None
    flat: list[float] = []
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, list):
            stack.extend(reversed(v))
        else:
            flat.append(float(v))
    return flat


def box_answer(text: str) -> tuple[list[float], str]:
    """The predicted box as upstream reads it, and the step that read it ("json", "int-pairs", "numbers", "zeros").

    1. the first match of four comma-separated signed numbers, given to ``json.loads``: only a bracketed match
       ``[a, b, c, d]`` with JSON numbers survives; parentheses, bare lists and ``-.5`` fail and fall through;
    2. ``[[int, int], [int, int]]`` (integers only; floats fall through);
    3. the first four unsigned numbers of the text, or ``[0, 0, 0, 0]`` when it has fewer than four.
    """
    flat = _json_flat(_BOX4_RE.search(text))
    if flat is not None:
        return flat[:4], "json"
    flat = _json_flat(_INT_PAIRS_RE.search(text))
    if flat is not None:
        return flat[:4], "int-pairs"
    nums = numbers(text)
    if len(nums) < 4:
        return [0.0, 0.0, 0.0, 0.0], "zeros"
    return nums[:4], "numbers"


def traj_answer(text: str) -> list[tuple[float, float]]:
    nums = numbers(text)
    if len(nums) % 2:
        nums = nums[:-1]
    return [(nums[i], nums[i + 1]) for i in range(0, len(nums), 2)]


def image_size(record: dict) -> tuple[tuple[float, float], str]:
    """((width, height), where it came from): the ``image_size`` field, else the id fallback."""
    size = record.get("image_size")
    if isinstance(size, (list, tuple)) and len(size) == 2 and all(isinstance(v, (int, float)) for v in size):
        return (float(size[0]), float(size[1])), "image_size"
    return (RH20T_SIZE, "id:RH20T") if "RH20T" in str(record.get("id")) else (DROID_SIZE, "id:default")


def iou(a: list[float], b: list[float]) -> float:
    """Upstream's IoU: no corner re-ordering; a swapped box has a negative (or, swapped both ways, positive) area."""
    ix1, iy1 = max(a[0], b[0]), max(a[1], b[1])
    ix2, iy2 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, ix2 - ix1) * max(0.0, iy2 - iy1)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def decide(pred: str, gt: str) -> bool:
    p, g = pred.strip(), gt.strip()
    return g in p[-100:] or p in g


# Embodied-R1's reader: re.search without DOTALL, so a tag's content must sit on one line.
_ANSWER_TAG_RE = re.compile(r"<answer>(.*?)</answer>")
_POINT_TAG_RE = re.compile(r"<point>\[(.*?)\]</point>")
_PAIR_RE = re.compile(r"\[(\d+\.?\d*),\s*(\d+\.?\d*)\]")
VABENCH_SCALE = 1000 - 1


def trace_points(text: str) -> tuple[list[tuple[float, float]] | None, str | None]:
    """(points as Embodied-R1's scorer reads them, None) or (None, why its script would raise on them)."""
    if "<answer>" in text:
        m = _ANSWER_TAG_RE.search(text)
        text = m.group(1).strip() if m else ""
    m = _POINT_TAG_RE.search(text)
    if not m or not m.group(1).strip():
        return [], None
    inner = "[" + m.group(1).replace("'", '"') + "]"
    try:
        raw = json.loads(inner)
    except ValueError:
        raw = [[float(x), float(y)] for x, y in _PAIR_RE.findall(inner)]
    out = []
    for p in raw if isinstance(raw, list) else [raw]:
        # upstream unpacks `x, y = point` and divides each by the image size: anything else raises there
        if not (isinstance(p, list) and len(p) == 2 and all(isinstance(v, (int, float)) for v in p)):
            return None, f"point {json.dumps(p)[:40]} is not a pair of numbers (upstream's script raises)"
        out.append((float(p[0]), float(p[1])))
    return out, None


def _trace_size(record: dict) -> tuple[float, float] | None:
    w, h = record.get("w"), record.get("h")
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in (w, h)):
        return float(w), float(h)
    size = record.get("image_size")
    if isinstance(size, (list, tuple)) and len(size) == 2 and all(isinstance(v, (int, float)) and v > 0 for v in size):
        return float(size[0]), float(size[1])
    return None


def vabench_trace(pred: str, gt: str, record: dict) -> dict:
    """Embodied-R1's per-record visual-trace scores (see the module docstring): ``vabench_rmse`` and
    ``vabench_mae`` on 0-999 coordinates, None (with ``vabench_note``) for a record its scorer leaves out."""
    out: dict[str, Any] = {"vabench_rmse": None, "vabench_mae": None}
    gt_parsed = parse_answer(gt, "trajectory")
    if not gt_parsed.ok:
        return {**out, "vabench_note": f"ground truth does not parse as a trajectory: {gt_parsed.error}"}
    size = _trace_size(record)
    if size is None:
        return {**out, "vabench_note": "needs the image size (w, h): predicted points are pixels"}
    pts, raises = trace_points(pred)
    if pts is None:
        return {**out, "vabench_note": f"left out: {raises}"}
    out["vabench_points"] = len(pts)
    p = [(x / size[0] * VABENCH_SCALE, y / size[1] * VABENCH_SCALE) for x, y in pts]
    g = [(x * VABENCH_SCALE, y * VABENCH_SCALE) for x, y in gt_parsed.value]
    if len(p) < 2 or len(g) < 2:
        return {**out, "vabench_note": f"left out: {len(p)} predicted and {len(g)} ground-truth point(s); upstream "
                                       "scores traces of 2 or more"}
    n = max(len(p), len(g))
    d = resample_by_index(p, n) - resample_by_index(g, n)
    out.update(vabench_rmse=float(np.sqrt(np.mean(d[:, 0] ** 2 + d[:, 1] ** 2))),
               vabench_mae=float(np.mean((np.abs(d[:, 0]) + np.abs(d[:, 1])) / 2)))
    return out


def _scaled(values: list[float], size: tuple[float, float]) -> list[float]:
    return [v * size[i % 2] for i, v in enumerate(values)]


def score_upstream(kind: str, pred: str, gt: str, record: dict) -> dict:
    """Per-record scores of one box / trajectory / choice / yesno record as upstream computes them.

    Raises ValueError for a ground truth upstream cannot score (a box with fewer than four numbers, a trajectory
    with no point, an empty choice): upstream crashes on the first and silently drops the others. A record whose id
    names a task-planning task gets `score_plan`'s fields instead (`kind` among them), whatever `kind` it came with.
    """
    plan = planning_type(record.get("id"))
    if plan is not None:
        return score_plan(plan, pred, gt)
    utype = UPSTREAM_TYPE[kind]
    if utype == "decide":
        if not gt.strip():
            raise ValueError("empty ground truth (upstream would count every answer correct)")
        return {"correct": decide(pred, gt)}
    size, size_from = image_size(record)
    out: dict[str, Any] = {"upstream_size": list(size), "upstream_size_from": size_from}
    if utype == "box":
        g = numbers(gt)[:4]
        if len(g) < 4:
            raise ValueError(f"box ground truth has {len(g)} number(s), upstream needs 4")
        p, step = box_answer(pred)
        out.update(iou=iou(_scaled(p, size), _scaled(g, size)), upstream_box=p, upstream_step=step)
        return out
    g_pts, p_pts = traj_answer(gt), traj_answer(pred)
    if not g_pts:
        raise ValueError("trajectory ground truth has no point")
    scale = lambda pts: [(x * size[0], y * size[1]) for x, y in pts]  # noqa: E731
    d = dtw_distance(scale(p_pts), scale(g_pts)) if p_pts else math.inf
    out.update(dtw_px=0.0 if math.isinf(d) else d, upstream_points=len(p_pts))
    out.update(vabench_trace(pred, gt, record))
    return out


def summarise_files(rows: list[dict]) -> dict:
    """Upstream's per-file numbers and its Average Score over files: a file is a row's ``source`` (score.py; the val
    file it belongs to, identity.py), never its kind.

    Rows need ``source``, ``kind`` and the fields `score_upstream` adds. Files whose kind upstream does not score are
    left out. A trajectory file whose DTWs are all 0 has no score (upstream divides by zero there). Task-planning
    rows (``upstream_type``) get `plan_entries`, kept out of the Average Score."""
    files: dict[str, dict] = {}
    is_plan = lambda r: r.get("upstream_type") in PLAN_KIND  # noqa: E731
    for name in dict.fromkeys(r["source"] for r in rows if r["kind"] in UPSTREAM_TYPE or is_plan(r)):
        plan = [r for r in rows if r["source"] == name and is_plan(r)]
        sel = [r for r in rows if r["source"] == name and r["kind"] in UPSTREAM_TYPE and not is_plan(r)]
        files.update(plan_entries(name, plan, bool(sel) or len({r["upstream_type"] for r in plan}) > 1))
        if not sel:
            continue
        utype = UPSTREAM_TYPE[sel[0]["kind"]]
        if len({UPSTREAM_TYPE[r["kind"]] for r in sel}) > 1:
            utype = "mixed"
        entry: dict[str, Any] = {"type": utype, "count": len(sel)}
        if utype == "box":
            ious = [r["iou"] for r in sel]
            entry.update(score=sum(ious) / len(ious), mean_iou=sum(ious) / len(ious),
                         **{"acc@0.1": sum(1 for x in ious if x > 0.1) / len(ious)})
        elif utype == "traj":
            kept = [r["dtw_px"] for r in sel if r["dtw_px"] > 0]
            entry.update(score=sum(kept) / len(kept) if kept else None, mean_dtw_px=None, n_kept=len(kept),
                         n_dropped=len(sel) - len(kept))
            entry["mean_dtw_px"] = entry["score"]
            entry.update(_vabench_means(sel))
        elif utype == "decide":
            entry.update(score=sum(1 for r in sel if r["correct"]) / len(sel))
            entry["accuracy"] = entry["score"]
        else:
            entry["score"] = None
        files[name] = entry
    scores = [e["score"] for e in files.values() if e["score"] is not None and e["type"] not in PLAN_KIND]
    traces = [r for r in rows if r["kind"] == "trajectory" and "vabench_rmse" in r]
    return {"files": files, "average_score": sum(scores) / len(scores) if scores else None,
            "files_without_score": [n for n, e in files.items() if e["score"] is None],
            **({"vabench_trace": _vabench_means(traces)} if traces else {})}


def _vabench_means(rows: list[dict]) -> dict:
    """Embodied-R1's averages: over the records with a value (its "Valid samples")."""
    kept = [r for r in rows if r.get("vabench_rmse") is not None]
    mean = (lambda k: float(np.mean([r[k] for r in kept]))) if kept else (lambda k: None)  # noqa: E731
    return {"vabench_rmse": mean("vabench_rmse"), "vabench_mae": mean("vabench_mae"), "vabench_scored": len(kept),
            "vabench_left_out": len(rows) - len(kept)}


def format_files(upstream: dict) -> str:
    """Upstream's printout: one line per file, then "Average Score"."""
    lines = []
    for name, e in upstream["files"].items():
        if e["type"] == "box":
            lines.append(f"{name} : Mean IOU: {e['mean_iou']:.4f} Accuracy (IOU > 0.1): {e['acc@0.1']:.4f}  (n={e['count']})")
        elif e["type"] == "traj":
            v = "-" if e["score"] is None else f"{e['score']:.4f}"
            lines.append(f"{name} : Mean DTW: {v}  (n={e['count']}, {e['n_dropped']} zero DTW dropped)")
        elif e["type"] == "decide":
            lines.append(f"{name} : Accuracy: {e['accuracy']:.4f}  (n={e['count']})")
        elif e["type"] in PLAN_KIND:
            lines.append(format_plan_entry(name, e))
        else:
            lines.append(f"{name} : mixes box / trajectory / choice records; upstream cannot score it")
    trace = upstream.get("vabench_trace")
    if trace and trace["vabench_scored"]:  # RoboInter's own answers have no <point> tag: nothing to print there
        lines.append(f"VABench-V visual trace (Embodied-R1's rule, 0-999) : RMSE: {trace['vabench_rmse']:.4f} MAE: "
                     f"{trace['vabench_mae']:.4f}  ({trace['vabench_scored']} scored, {trace['vabench_left_out']} "
                     "left out)")
    avg = upstream["average_score"]
    lines.append("Average Score: " + ("-" if avg is None else f"{avg:.4f}")
                 + "  (mean over files of mean IoU, mean DTW in pixels and accuracy, as upstream prints it)"
                 + ("; task-planning lines not in it (task_planning/eval.py prints no average)"
                    if any(e["type"] in PLAN_KIND for e in upstream["files"].values()) else ""))
    return "\n".join(lines)
