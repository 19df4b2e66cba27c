"""Reading prediction files, the printed table, and writing metrics.json / scores.jsonl (no torch)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

from ..errors import UserError
from ..fsutil import atomic_write_json, atomic_write_text
from ..answers.kinds import task_from_filename
from .upstream import format_files

__all__ = ["load_predictions", "format_table", "check_outputs", "write_outputs", "OUTPUT_FILES"]

OUTPUT_FILES = ("metrics.json", "scores.jsonl")


def _check_record(path: Path, rec: Any, index: int, where: str, task: str | None) -> dict:
    if not isinstance(rec, dict):
        raise UserError(f"{path}: {where}: record {index} is a {type(rec).__name__}, expected a JSON object")
    if rec.get("id") is None:
        raise UserError(f"{path}: {where}: record {index} has no 'id' field (every record needs id, pred, gt)")
    if task and not rec.get("task"):
        rec["task"] = task
    return rec


def load_predictions(path: str | os.PathLike) -> list[dict]:
    """Read prediction records from a ``.json`` file (an array of objects) or a ``.jsonl`` file (one object a line).

    Other extensions are read as a JSON array when the file starts with ``[``, else as JSON lines. Every record needs
    an ``id`` (missing ``pred`` / ``gt`` are reported per record by the scorer). Records without ``task`` take it
    from a file named for one task (upstream's ``eval_details_<task>.json``). Bad JSON raises UserError naming the
    file and line.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: predictions file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read predictions file: {e}") from None
    task = task_from_filename(str(path))
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
            records.append(_check_record(path, rec, i, "array", task))
    else:
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}: line {lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
            records.append(_check_record(path, rec, len(records), f"line {lineno}", task))
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
            metrics = "  ".join(f"{k}={_fmt(v)}" for k, v in _main_metrics(kind, stats))
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
    elif coords:
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


def _same(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False


def check_outputs(out_dir: str | os.PathLike, force: bool, inputs: Iterable[str | os.PathLike] = (),
                  names: Iterable[str] = OUTPUT_FILES) -> None:
    """Refuse, before any work, to write over an input file (ever) or over earlier results (unless `force`)."""
    out = Path(out_dir)
    for name in names:
        target = out / name
        for src in inputs:
            if _same(target, Path(src)):
                raise UserError(f"{target} is an input of this run; choose another --out (it is never overwritten)")
        if target.exists() and not force:
            raise UserError(f"{target} already exists; choose another --out or pass --force to replace it")


def write_outputs(out_dir: str | os.PathLike, rows: list[dict], summary: dict) -> None:
    """Write ``metrics.json`` (the summary) and ``scores.jsonl`` (one scored record a line) into `out_dir`,
    each atomically. Call `check_outputs` first."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "metrics.json", summary)
    atomic_write_text(out / "scores.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
