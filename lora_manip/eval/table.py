"""Published tables' layouts (`eval` / `score --table NAME`): each line of the table scored by the upstream-compatible
rules and by the strict ones side by side, from the same records.

``robointer``: Table 3 of the RoboInter paper ("Performance on RoboInter-VQA spatial and temporal benchmark"), column
for column in its order and with its units: ACC@IoU>0.1 (%) for the four spatial generation columns, accuracy (%) for
multiple choice and true/false, DTW in pixels for Trace (lower is better), average BLEU (x100) for Task Planning. The
paper prints the table as an image (``asset/VLM_table.png`` of InternRobotics/RoboInter); it names columns, not files,
so which val file feeds which column is read off the release's task descriptions (its ``README_DATA.md``):
Object G.D. = current_box (the manipulated object's box), Grasp A.F. = contact_box (the gripper's box at contact),
Place A.F. = final_box (the object's box at the end), Gripper G.D. = gripper_det, Grasp Pose = grasppose_choice,
Grounding Choice = grounding_choice, Contact = contact_decide, Trace = traj (the file with the start position;
traj_wo_init_pos is listed under the table), Visual Trace = traj_choice, and the three Task_planning val files
(planning, choice, decide) for Task Planning, Planning Choice and Task Planning T/F. docs/evaluation.md says so too.

``robointer-files``: upstream's scorer printout, one row per file it reads, in its order, with its task type for each
(``json_name_list`` and ``task_type`` of ``eval_llava_format/manip/generation.py``), and its "Average Score" (the mean
of the rows' mean IoU, DTW in pixels and accuracy, as upstream prints it).

A record finds its line by the val file it belongs to (identity.py: its registry dataset name, else its file's name
whatever the prefix, else upstream's task-planning names in its id, else its `task`): a record of the
``..._traj_qa_wo_init_pos.json`` file is never a Trace record, whatever its `task` says. Records of no line
(contact points, other data) are listed under the table with their strict numbers: nothing evaluated is left out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .identity import GENERATION, KNOWN, UNDERSTANDING, source_of

__all__ = ["TABLES", "TABLE_NAMES", "build_table", "format_paper_table", "row_key", "table_problem"]


@dataclass(frozen=True)
class Row:
    key: str  # the file's name as upstream's scorer spells it (eval_details_<key>.json)
    group: str
    utype: str  # how the line is scored: box, traj, decide (accuracy) or planning (BLEU)
    label: str = ""  # the paper's column name


@dataclass(frozen=True)
class Layout:
    title: str
    rows: tuple[Row, ...]
    paper: bool  # the paper's units (%, x100) and no Average Score; else upstream's printout


_PAPER = [
    ("Spatial / Generation", "current_box", "box", "Object G.D."),
    ("Spatial / Generation", "contact_box", "box", "Grasp A.F."),
    ("Spatial / Generation", "final_box", "box", "Place A.F."),
    ("Spatial / Generation", "gripper_det", "box", "Gripper G.D."),
    ("Spatial / Multiple Choice", "grasppose_choice", "decide", "Grasp Pose"),
    ("Spatial / Multiple Choice", "grounding_choice", "decide", "Grounding Choice"),
    ("Spatial / T/F", "contact_decide", "decide", "Contact"),
    ("Temporal / Generation", "traj", "traj", "Trace"),
    ("Temporal / Generation", "planning", "planning", "Task Planning"),
    ("Temporal / Multiple Choice", "traj_choice", "decide", "Visual Trace"),
    ("Temporal / Multiple Choice", "plan_choice", "decide", "Planning Choice"),
    ("Temporal / T/F", "plan_decide", "decide", "Task Planning"),
]
TABLES: dict[str, Layout] = {
    "robointer": Layout("RoboInter paper, Table 3: one line per column, in the paper's order and units",
                        tuple(Row(k, g, t, label) for g, k, t, label in _PAPER), paper=True),
    "robointer-files": Layout("upstream's scorer (generation.py): one row per val file (eval_details_<row>.json)",
                              tuple([Row(k, "Generation", t, k) for k, t in GENERATION]
                                    + [Row(k, "Understanding", "decide", k) for k in UNDERSTANDING]), paper=False),
}
TABLE_NAMES = tuple(TABLES)

# The strict kinds a line's records may have (a choice file's Yes/No questions are yes/no records).
_KINDS = {"box": ("box",), "traj": ("trajectory",), "decide": ("choice", "yesno"), "planning": ("planning",)}
_METRIC = {False: {"box": "mIoU / IoU>0.1", "traj": "DTW (px)", "decide": "accuracy", "planning": "BLEU"},
           True: {"box": "ACC@IoU>0.1 %", "traj": "DTW px (lower)", "decide": "ACC %", "planning": "BLEU avg x100"}}


def table_problem(name: str | None) -> str | None:
    """What is wrong with a `--table` name (None: fine, or no table asked for)."""
    if name is None or name in TABLES:
        return None
    return f"--table {name}: choose one of {', '.join(TABLE_NAMES)}"


def row_key(layout: Layout, task: Any, file: Any, dataset: Any, rid: Any = None) -> str | None:
    """The line of `layout` a record belongs to (identity.source_of: its dataset's name, its file's name, its id,
    its task; the first that names a known file decides, also when that file is not in this layout: a record of the
    traj_wo_init_pos file whose task says "traj" is not a Trace record), or None."""
    return _line(layout, source_of(dataset, (file,), task, rid))


def _line(layout: Layout, source: Any) -> str | None:
    return source if source in KNOWN and any(r.key == source for r in layout.rows) else None


def _mean(xs: list[float]) -> float | None:
    return float(sum(xs) / len(xs)) if xs else None


def _cell(utype: str, rows: list[dict], upstream: bool) -> dict:
    """A line's numbers in one mode; `score` is what upstream's Average Score averages."""
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
    elif utype == "planning":  # upstream: task_planning/eval.py's average BLEU; strict: the kit's BLEU
        out["bleu"] = out["score"] = _mean([r["bleu_avg" if upstream else "bleu"] for r in rows])
    else:
        out["accuracy"] = out["score"] = _mean([1.0 if r["correct"] else 0.0 for r in rows])
    return out


def build_table(name: str, strict_rows: list[dict], strict_summary: dict, upstream_rows: list[dict]) -> dict:
    """The table `name` from the same records scored both ways (score.py's `score_records`, whose rows say the file
    each record belongs to, `source`; `table_summary` there scores the second way)."""
    from .report import main_metrics

    layout = TABLES[name]

    def grouped(scored: list[dict]) -> dict[str | None, list[dict]]:
        out: dict[str | None, list[dict]] = {}
        for r in scored:
            key = _line(layout, r.get("source"))
            row = next((x for x in layout.rows if x.key == key), None)
            if row is not None and r["kind"] not in _KINDS[row.utype]:
                key = None  # a kind this line's rule cannot score (a --task-map override): listed below instead
            out.setdefault(key, []).append(r)
        return out

    strict, up = grouped(strict_rows), grouped(upstream_rows)
    table_rows = []
    for row in layout.rows:
        s, u = strict.get(row.key, []), up.get(row.key, [])
        table_rows.append({"key": row.key, "label": row.label, "group": row.group, "type": row.utype,
                           "metric": _METRIC[layout.paper][row.utype], "count": len(s),
                           "strict": _cell(row.utype, s, False) if s else None,
                           "upstream": _cell(row.utype, u, True) if u else None})
    average = {}
    for mode in ("upstream", "strict"):
        scores = [r[mode]["score"] for r in table_rows if r[mode] and r[mode]["score"] is not None]
        average[mode] = _mean(scores)
        average[f"{mode}_rows"] = len(scores)
    others = []
    left = strict.get(None, [])
    for ds, task, kind in dict.fromkeys((r["dataset"], r.get("task"), r["kind"]) for r in left):
        n = sum(1 for r in left if (r["dataset"], r.get("task"), r["kind"]) == (ds, task, kind))
        stats = strict_summary["by_dataset"][ds][kind]
        if stats["count"] != n:  # the file is partly in the table: the records of this task may still be a whole
            by_task = strict_summary.get("by_task", {}).get(task)
            stats = by_task if by_task and by_task["kind"] == kind and by_task["count"] == n else None
        others.append({"dataset": ds, "task": task, "kind": kind, "count": n,
                       "parse_failure_rate": stats["parse_failure_rate"] if stats else None,
                       "metrics": dict(main_metrics(kind, stats)) if stats else {}})
    out = {"name": name, "title": layout.title, "paper": layout.paper, "rows": table_rows, "of": len(layout.rows),
           "others": others, "not_scored": len(strict_summary.get("data_errors") or [])}
    if not layout.paper:  # the paper prints no average; upstream's scorer does
        out["average"] = average
    return out


def _f(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    return f"{v:.{digits}f}" if abs(v) < 1000 else f"{v:.1f}"


def _paper_value(utype: str, cell: dict | None, upstream: bool) -> str:
    """A cell as the paper prints it: percentages and BLEU x100 to one decimal, DTW in whole pixels."""
    if cell is None:
        return "not evaluated"
    if utype == "traj":  # whole pixels as the paper prints them (hundreds); one decimal below 100 px
        dropped = f" ({cell['n_dropped']} dropped)" if upstream and cell["n_dropped"] else ""
        if cell["dtw_px"] is None:
            return "- (no w/h)" if not upstream and cell["no_size"] else f"-{dropped}"
        return f"{cell['dtw_px']:.{0 if cell['dtw_px'] >= 100 else 1}f}{dropped}"
    value = {"box": cell.get("acc@0.1"), "planning": cell.get("bleu"), "decide": cell.get("accuracy")}[utype]
    return "-" if value is None else f"{100.0 * value:.1f}"


def _value(utype: str, cell: dict | None, upstream: bool) -> str:
    if cell is None:
        return "not evaluated"
    if utype == "box":
        return f"{_f(cell['mean_iou'])} / {_f(cell['acc@0.1'])}"
    if utype == "traj" and upstream:
        return f"{_f(cell['dtw_px'], 2)} ({cell['n_dropped']} dropped)" if cell["n_dropped"] else _f(cell["dtw_px"], 2)
    if utype == "traj":
        return _f(cell["dtw_px"], 2) if cell["dtw_px"] is not None or not cell["no_size"] else "- (no w/h)"
    return _f(cell["bleu"] if utype == "planning" else cell["accuracy"])


def format_paper_table(table: dict) -> str:
    """The table as aligned text: group, line, n, metric, upstream-compatible, strict, strict parse failures."""
    paper = table.get("paper", False)
    value = _paper_value if paper else _value
    header = ["group", "column" if paper else "row", "file" if paper else "", "n", "metric", "upstream-compatible",
              "strict", "parse-fail"]
    body, group = [], None
    for r in table["rows"]:
        strict = r["strict"]
        fail = "-" if strict is None else f"{100.0 * strict['parse_failure_rate']:.1f}%"
        body.append(["" if r["group"] == group else r["group"], r["label"], r["key"] if paper else "",
                     str(r["count"]) if r["count"] else "-", r["metric"], value(r["type"], r["upstream"], True),
                     value(r["type"], strict, False), fail])
        group = r["group"]
    if not paper:  # upstream's scorer has no file column: its row is the file
        header.pop(2)
        for line_ in body:
            line_.pop(2)
        avg = table["average"]
        rows = str(avg["upstream_rows"]) if avg["upstream_rows"] == avg["strict_rows"] else \
            f"{avg['upstream_rows']} upstream, {avg['strict_rows']} strict"
        body.append(["Average Score", f"({rows} of {table['of']} rows)", "", "", _f(avg["upstream"], 4),
                     _f(avg["strict"], 4), ""])
    num = {header.index("n"), len(header) - 1}
    widths = [max(len(x[c]) for x in [header] + body) for c in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(widths[i]) if i in num else c.ljust(widths[i]) for i, c in enumerate(cells)).rstrip()

    out = [f"{table['name']} table ({table.get('title', '')}); upstream-compatible and strict side by side",
           line(header), line(["-" * w for w in widths]), *[line(x) for x in body]]
    if paper:
        cells = [_paper_value(r["type"], r["upstream"], True).split(" (")[0] for r in table["rows"]]
        out.append("upstream-compatible in the paper's column order: " + " | ".join(
            "-" if c == "not evaluated" else c for c in cells))
    else:
        out.append("Average Score: the mean of the rows' mIoU, DTW in pixels and accuracy, as upstream prints it (a "
                   "number DTW dominates); strict: the same over the strict numbers.")
    if any(r["upstream"] and r["type"] == "traj" and r["upstream"]["count"] and r["upstream"]["dtw_px"] is None
           for r in table["rows"]) and not paper:
        out.append("A trajectory row whose DTWs are all 0 (dropped) has no upstream number: upstream's script stops "
                   "there (division by zero); the Average Score here leaves that row out.")
    if any(r["strict"] and r["type"] == "traj" and r["strict"]["no_size"] for r in table["rows"]):
        out.append("strict DTW in pixels needs each record's image size (w / h or width / height).")
    if table["not_scored"]:
        out.append(f"{table['not_scored']} record(s) could not be scored (listed above) and are in no row.")
    if table["others"]:
        out.append("Not in this table (strict scoring):")
        for o in table["others"]:
            metrics = "  ".join(f"{k}={_f(v)}" for k, v in o["metrics"].items())
            fail = "-" if o["parse_failure_rate"] is None else f"{100.0 * o['parse_failure_rate']:.1f}%"
            task = f"  {o['task']}" if o.get("task") and o["task"] != o["dataset"] else ""
            out.append(f"  {o['dataset']}{task}  {o['kind']}  n={o['count']}  parse-fail={fail}  {metrics}".rstrip())
    return "\n".join(out)
