"""A published table's layout (`eval` / `score --table robointer`): one row per file of the benchmark, each row
scored by the upstream-compatible rules and by the strict ones side by side, then the Average Score both ways.

RoboInter (`robointer`): the rows are the fourteen files RoboInter's scorer reads, in its order, with its task type
for each (``json_name_list`` and ``task_type`` of ``RoboInterVLM/RoboInterVLM-QwenVL/eval/benchmark/
eval_llava_format/manip/generation.py``, InternRobotics/RoboInter; docs/evaluation.md has the commit). Its inference
scripts name each result file after the val file they read (``eval_details_<file stem>.json``,
``eval_manip/evaluation_intermediate.py``), so a row is the val file of that name. Per row: box files mean IoU and
accuracy at IoU > 0.1, trajectory files mean DTW in pixels, the eight understanding files accuracy; the Average
Score is the mean of those row numbers, as upstream prints it.

A record finds its row as upstream's scorer does, by its val file's name, else (`score`, which sees no annotation
file) by its `task` (RoboInter's records carry one), else by its dataset name: without the release's ``full_single_multi_contact_obj_`` prefix, ``rh20t_`` / ``droid_`` / ``vla_``
prefixes and ``_qa`` / split suffixes (``..._traj_qa.json`` is `traj`, the start position given;
``..._traj_qa_wo_init_pos.json`` is `traj_wo_init_pos`). Records of no row (contact points, task planning, other
data) are listed under the table with their strict numbers: nothing evaluated is left out of the printout.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

__all__ = ["TABLES", "TABLE_NAMES", "build_table", "format_paper_table", "row_key", "table_problem"]


@dataclass(frozen=True)
class Row:
    key: str  # the file's name as upstream's scorer spells it (eval_details_<key>.json)
    group: str
    utype: str  # upstream's task type: box, traj or decide


_GENERATION = [("contact_box", "box"), ("current_box", "box"), ("final_box", "box"), ("gripper_det", "box"),
               ("traj", "traj"), ("traj_wo_init_pos", "traj")]
_UNDERSTANDING = ["contact_decide", "grasppose_choice", "grounding_choice", "traj_choice", "traj_direction_choice",
                  "traj_direction_choice_with_traj", "trajlang_choice", "trajlang_sub_choice"]
TABLES: dict[str, tuple[Row, ...]] = {
    "robointer": tuple([Row(k, "Generation", t) for k, t in _GENERATION]
                       + [Row(k, "Understanding", "decide") for k in _UNDERSTANDING]),
}
TABLE_NAMES = tuple(TABLES)

# The strict kinds a row's records may have (a choice file's Yes/No questions are yes/no records).
_KINDS = {"box": ("box",), "traj": ("trajectory",), "decide": ("choice", "yesno")}
_METRIC = {"box": "mIoU / IoU>0.1", "traj": "DTW (px)", "decide": "accuracy"}

_PREFIX = re.compile(r"^(?:eval_details_)?(?:full_single_multi_contact_obj_)?(?:(?:rh20t|droid)_)?(?:vla_)?")
_SPLIT = re.compile(r"_(?:train|val|valid|test|eval)$")
# Other spellings of a row's name: the release's trajectory file without a start position, and upstream's training
# registry names for the understanding files (docs/data.md lists which name reads which file).
_ALIASES = {"traj_qa_wo_init_pos": "traj_wo_init_pos", "traj_lang_choice": "trajlang_choice",
            "traj_lang_sub_choice": "trajlang_sub_choice", "contact_choice": "contact_decide",
            "graspppose_choice": "grasppose_choice"}


def table_problem(name: str | None) -> str | None:
    """What is wrong with a `--table` name (None: fine, or no table asked for)."""
    if name is None or name in TABLES:
        return None
    return f"--table {name}: choose one of {', '.join(TABLE_NAMES)}"


def _norm(name: str) -> str:
    n = str(name).strip().lower().replace("-", "_").replace(" ", "_").rsplit("/", 1)[-1]
    if n.endswith((".json", ".jsonl")):
        n = n.rsplit(".", 1)[0]
    n = _ALIASES.get(n := _SPLIT.sub("", _PREFIX.sub("", n)), n)
    return _ALIASES.get(n := n.removesuffix("_qa"), n)


def row_key(layout: tuple[Row, ...], task: Any, file: Any, dataset: Any) -> str | None:
    """The row a record belongs to: by its annotation file's name, else its task, else its dataset name."""
    keys = {r.key for r in layout}
    for name in (file, task, dataset):
        if isinstance(name, str) and name and _norm(name) in keys:
            return _norm(name)
    return None


def _mean(xs: list[float]) -> float | None:
    return float(sum(xs) / len(xs)) if xs else None


def _cell(utype: str, rows: list[dict], upstream: bool) -> dict:
    """A row's numbers in one mode; `score` is the one the Average Score averages."""
    n = len(rows)
    out: dict[str, Any] = {"count": n}
    if not upstream:
        fails = sum(1 for r in rows if r.get("parse_error") is not None)
        out["parse_failure_rate"] = fails / n if n else None
    if utype == "box":
        ious = [r["iou"] for r in rows]
        out.update(mean_iou=_mean(ious), **{"acc@0.1": _mean([1.0 if x > 0.1 else 0.0 for x in ious])})
        out["score"] = out["mean_iou"]
    elif utype == "traj" and upstream:
        kept = [r["dtw_px"] for r in rows if r["dtw_px"] > 0]  # upstream drops a DTW of 0 (empty or perfect)
        out.update(dtw_px=_mean(kept), n_dropped=n - len(kept), score=_mean(kept))
    elif utype == "traj":
        px = [r["dtw_px"] for r in rows if r.get("dtw_px") is not None]
        out.update(dtw_px=_mean(px), n_scored_px=len(px), score=_mean(px),
                   no_size=sum(1 for r in rows if r.get("parse_error") is None and "dtw_px" not in r))
    else:
        out["accuracy"] = out["score"] = _mean([1.0 if r["correct"] else 0.0 for r in rows])
    return out


def build_table(name: str, strict_rows: list[dict], strict_summary: dict, upstream_rows: list[dict],
                files: dict[str, str] | None = None) -> dict:
    """The table `name` from the same records scored both ways (score.py's `score_records`; `table_summary` there
    scores the second way). `files`: {dataset: annotation file} (eval knows them; a row is then also found by the
    file's name)."""
    from .report import main_metrics

    layout = TABLES[name]
    files = files or {}

    def grouped(scored: list[dict]) -> dict[str | None, list[dict]]:
        out: dict[str | None, list[dict]] = {}
        for r in scored:
            key = row_key(layout, r.get("task"), files.get(r.get("dataset")), r.get("dataset"))
            row = next((x for x in layout if x.key == key), None)
            if row is not None and r["kind"] not in _KINDS[row.utype]:
                key = None  # a kind this row's rule cannot score (a --task-map override): listed below instead
            out.setdefault(key, []).append(r)
        return out

    strict, up = grouped(strict_rows), grouped(upstream_rows)
    table_rows = []
    for row in layout:
        s, u = strict.get(row.key, []), up.get(row.key, [])
        table_rows.append({"key": row.key, "group": row.group, "type": row.utype, "metric": _METRIC[row.utype],
                           "count": len(s), "strict": _cell(row.utype, s, False) if s else None,
                           "upstream": _cell(row.utype, u, True) if u else None})
    average = {}
    for mode in ("upstream", "strict"):
        scores = [r[mode]["score"] for r in table_rows if r[mode] and r[mode]["score"] is not None]
        average[mode] = _mean(scores)
        average[f"{mode}_rows"] = len(scores)
    others = []
    left = strict.get(None, [])
    for ds in dict.fromkeys(r["dataset"] for r in left):
        for kind in dict.fromkeys(r["kind"] for r in left if r["dataset"] == ds):
            n = sum(1 for r in left if r["dataset"] == ds and r["kind"] == kind)
            stats = strict_summary["by_dataset"][ds][kind]
            whole = stats["count"] == n  # else the file is partly in the table: its own numbers are in the report
            others.append({"dataset": ds, "kind": kind, "count": n,
                           "parse_failure_rate": stats["parse_failure_rate"] if whole else None,
                           "metrics": dict(main_metrics(kind, stats)) if whole else {}})
    return {"name": name, "rows": table_rows, "average": average, "of": len(layout), "others": others,
            "not_scored": len(strict_summary.get("data_errors") or [])}


def _f(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    return f"{v:.{digits}f}" if abs(v) < 1000 else f"{v:.1f}"


def _value(utype: str, cell: dict | None, upstream: bool) -> str:
    if cell is None:
        return "not evaluated"
    if utype == "box":
        return f"{_f(cell['mean_iou'])} / {_f(cell['acc@0.1'])}"
    if utype == "traj" and upstream:
        return f"{_f(cell['dtw_px'], 2)} ({cell['n_dropped']} dropped)" if cell["n_dropped"] else _f(cell["dtw_px"], 2)
    if utype == "traj":
        return _f(cell["dtw_px"], 2) if cell["dtw_px"] is not None or not cell["no_size"] else "- (no w/h)"
    return _f(cell["accuracy"])


def format_paper_table(table: dict) -> str:
    """The table as aligned text: group, row, n, metric, upstream-compatible, strict, strict parse failures."""
    header = ["group", "row", "n", "metric", "upstream-compatible", "strict", "parse-fail"]
    body, group = [], None
    for r in table["rows"]:
        strict = r["strict"]
        fail = "-" if strict is None else f"{100.0 * strict['parse_failure_rate']:.1f}%"
        body.append(["" if r["group"] == group else r["group"], r["key"], str(r["count"]) if r["count"] else "-",
                     r["metric"], _value(r["type"], r["upstream"], True), _value(r["type"], strict, False), fail])
        group = r["group"]
    avg = table["average"]
    rows = str(avg["upstream_rows"]) if avg["upstream_rows"] == avg["strict_rows"] else \
        f"{avg['upstream_rows']} upstream, {avg['strict_rows']} strict"
    body.append(["Average Score", f"({rows} of {table['of']} rows)", "", "", _f(avg["upstream"], 4),
                 _f(avg["strict"], 4), ""])
    widths = [max(len(x[c]) for x in [header] + body) for c in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(widths[i]) if i in (2, 6) else c.ljust(widths[i]) for i, c in enumerate(cells)).rstrip()

    out = [f"{table['name']} table: one row per val file (upstream's eval_details_<row>.json); "
           "upstream-compatible and strict side by side",
           line(header), line(["-" * w for w in widths]), *[line(x) for x in body[:-1]], line(body[-1]),
           "Average Score: the mean of the rows' mIoU, DTW in pixels and accuracy, as upstream prints it (a number "
           "DTW dominates); strict: the same over the strict numbers."]
    if any(r["strict"] and r["type"] == "traj" and r["strict"]["no_size"] for r in table["rows"]):
        out.append("strict DTW in pixels needs each record's image size (w / h or width / height).")
    if table["not_scored"]:
        out.append(f"{table['not_scored']} record(s) could not be scored (listed above) and are in no row.")
    if table["others"]:
        out.append("Not in this table (strict scoring):")
        for o in table["others"]:
            metrics = "  ".join(f"{k}={_f(v)}" for k, v in o["metrics"].items())
            fail = "-" if o["parse_failure_rate"] is None else f"{100.0 * o['parse_failure_rate']:.1f}%"
            out.append(f"  {o['dataset']}  {o['kind']}  n={o['count']}  parse-fail={fail}  {metrics}".rstrip())
    return "\n".join(out)
