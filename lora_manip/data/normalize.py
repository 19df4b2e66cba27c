"""`lora-manip data normalize`: rewrite an annotation file's grounding coordinates to [0, 1], or turn a lab's own
labels (a CSV table or a COCO-style JSON, labels.py) into the kit's records.

Which numbers, in an annotation file (.json array / .jsonl), of each gpt answer and of a record's `gt` (RoboInter's
records repeat the answer there; both are converted, and must be in one unit):
- JSON with keys ending in bbox/box/point/traj (the rule `data check` validates by): those keys' values, numbers
  alternating x, y (`[x, y]`, `[[x1, y1], [x2, y2]]`, `[x1, y1, x2, y2]`);
- any other answer of a box / point / trajectory record (its kind as the scorer classifies it: the `task` field,
  else the answer's format): its coordinates in every shape the scorer's parser reads (answers/units.py), rescaled
  in place and read back with the scorer's parser, which must find the same coordinates. Molmo's `<point x= y=>`
  tags are percent by definition and stay as they are;
- the coordinate lists of the human turns ("the gripper starts at [320, 240]"), with the answer, or on their own
  when the answer holds none (a yes/no or choice record whose question names a position).
A record is refused, with its reason, when its numbers cannot be converted safely (a geometric answer the parser
cannot read, an odd number of numbers, a choice / yes-no / planning answer holding lists of numbers above 1 (its
prose numbers, "pick up 2 cups", are words), an inverted box in any shape (x, y, width, height), a question in
pixels beside an answer in [0, 1]), when an image is missing, or when `data check` would refuse what it became (a
one-point trajectory, an inverted box). Everything else is copied unchanged; the input is never modified (the
output is a new .json / .jsonl file, written atomically), and any problem means nothing is written.

Units (`--from`):
  pixels   pixels of the original image: x / width, y / height
  resized  pixels of the image as Qwen2-VL / Qwen2.5-VL resized it: x / resized width, y / resized height, the
           record's `new_w` / `new_h` when it states them (RoboInter's "smart_resize_format"; a size that differs
           from the kit's is said per record), else `smart_resize`'s (sides rounded to multiples of 28, area
           clamped to [min_pixels, max_pixels])
  thousand Qwen-VL's integer grid 0..1000: v / 1000
Image sizes come from the record's `width`/`height` (or `w`/`h`) fields, else from the image header; a converted
record without those fields gets `width`/`height` (eval reports pixel distances with them). Image paths are
rewritten relative to OUT's folder when it holds the data root (the output then works on its own), else kept
relative to the data root, as the summary says.
"""

from __future__ import annotations

import json
import math
import os
import posixpath
from pathlib import Path

from ..answers.coordinates import COORD_KEY, answer_json, numbers
from ..answers.kinds import GEOMETRIC, classify_task
from ..answers.parse import parse_answer
from ..answers.units import find, rescale_text, value_points
from ..errors import UserError
from ..outputs import check_file, write_file
from .files import path_under, resized_size
from .images import record_size
from .labels import is_coco, read_labels
from .records import Problem, RecordIndex
from .report import MIN_TRAJ_POINTS
from .validate import stray_in_lists, text_problems

MODES = ("pixels", "resized", "thousand")
OUT_SUFFIXES = (".json", ".jsonl")
QWEN_FACTOR, QWEN_MIN_PIXELS, QWEN_MAX_PIXELS = 28, 56 * 56, 28 * 28 * 16384  # Qwen2.5-VL processor defaults
_TOLERANCE = 1e-6


def smart_resize(height: int, width: int, factor: int = QWEN_FACTOR, min_pixels: int = QWEN_MIN_PIXELS,
                 max_pixels: int = QWEN_MAX_PIXELS) -> tuple[int, int]:
    """(height, width) of an image after Qwen2-VL's resize: each side a multiple of `factor`, the area within
    [min_pixels, max_pixels], the aspect ratio kept as closely as that allows."""
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        scale = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / scale / factor) * factor)
        w = max(factor, math.floor(width / scale / factor) * factor)
    elif h * w < min_pixels:
        scale = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * scale / factor) * factor
        w = math.ceil(width * scale / factor) * factor
    return h, w


def _scale(value, sx: float, sy: float, decimals: int, out_of_range: list):
    """Divide x (even positions of each innermost list) by sx and y by sy; nested lists kept."""
    if isinstance(value, list) and value and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                 for v in value):
        out = []
        for k, v in enumerate(value):
            x = v / (sx if k % 2 == 0 else sy)
            if -_TOLERANCE <= x <= 1 + _TOLERANCE:
                x = min(max(x, 0.0), 1.0)
            else:
                out_of_range.append(x)
            out.append(round(x, decimals))
        return out
    if isinstance(value, list):
        return [_scale(v, sx, sy, decimals, out_of_range) for v in value]
    return value


def _convert(obj, sx: float, sy: float, decimals: int, out_of_range: list):
    if isinstance(obj, dict):
        return {k: (_scale(v, sx, sy, decimals, out_of_range) if isinstance(k, str) and COORD_KEY.search(k)
                    and numbers(v) is not None else _convert(v, sx, sy, decimals, out_of_range))
                for k, v in obj.items()}
    if isinstance(obj, list):
        return [_convert(v, sx, sy, decimals, out_of_range) for v in obj]
    return obj


def _coordinates(obj) -> list[float]:
    if isinstance(obj, dict):
        out = []
        for k, v in obj.items():
            nums = numbers(v) if isinstance(k, str) and COORD_KEY.search(k) else None
            out += nums if nums is not None else _coordinates(v)
        return out
    if isinstance(obj, list):
        return [x for v in obj for x in _coordinates(v)]
    return []


class _Scaler:
    """The --from unit (what a record's coordinates are divided by) and where the output's image paths start."""

    def __init__(self, mode: str, root: Path, decimals: int, factor: int, min_pixels: int, max_pixels: int,
                 out_dir: Path):
        self.mode, self.root, self.decimals = mode, root, decimals
        self.factor, self.min_pixels, self.max_pixels = factor, min_pixels, max_pixels
        # A plain file's image paths are read relative to its own folder (data check, eval --data), and may not
        # leave it: paths are rewritten to start at OUT's folder when it holds the data root, else they stay
        # relative to the data root (`..` or an absolute path would be refused as escaping).
        r = root.resolve()
        self.prefix = r.relative_to(out_dir).as_posix() if r.is_relative_to(out_dir) else None
        self.image_root = out_dir if self.prefix is not None else r

    def size(self, rec: dict) -> tuple[int, int] | str:
        return record_size(rec, self.root)

    def divisors(self, rec: dict, size: tuple[int, int]) -> tuple[float, float, str] | str:
        """(x divisor, y divisor, where the resized size came from) or why the record's own size is unusable."""
        if self.mode == "thousand":
            return 1000.0, 1000.0, ""
        w, h = size
        if self.mode != "resized":
            return float(w), float(h), ""
        h, w = smart_resize(h, w, self.factor, self.min_pixels, self.max_pixels)
        own = resized_size(rec)
        if own is None or isinstance(own, str):
            return own or (float(w), float(h), "")
        said = "" if own == (w, h) else f", not the {w} x {h} that smart_resize gives for {size[0]} x {size[1]}"
        return float(own[0]), float(own[1]), f", the record's new_w x new_h{said}"

    def rebase(self, rel: str) -> str | None:
        """An image path (relative to the data root) as the output writes it; None when it leaves the root."""
        if self.prefix in (None, "."):
            return rel
        p = path_under(self.root, rel)
        return None if p is None else posixpath.join(self.prefix, Path(os.path.relpath(p, os.path.abspath(
            self.root))).as_posix())


def _rebase_images(rec: dict, scaler: _Scaler) -> str | None:
    """Rewrite `rec`'s image paths for the output (_Scaler.rebase), or why not."""
    for key in ("images", "image"):
        value = rec.get(key)
        paths = [value] if isinstance(value, str) else value if isinstance(value, list) else []
        new = [scaler.rebase(p) if isinstance(p, str) else p for p in paths]
        if None in new:
            return f"image path {paths[new.index(None)]!r} escapes the data root {scaler.root}"
        if paths:
            rec[key] = new[0] if isinstance(value, str) else new
    return None


def _turns(rec: dict):
    """(holder, its text key, whether it is an answer, the field it is) of each turn with text, then the record's
    `gt` (RoboInter's records repeat the answer there; JSON values held as their text, put back once converted)."""
    turns = rec.get("conversations")
    for t in turns if isinstance(turns, list) else []:
        if isinstance(t, dict):
            key = "value" if "value" in t else "content"
            if isinstance(t.get(key), str):
                yield t, key, t.get("from", t.get("role")) in ("gpt", "assistant"), "conversations"
    gt = rec.get("gt")
    if isinstance(gt, str):
        yield rec, "gt", True, "gt"
    elif isinstance(gt, (list, dict)):
        yield _JsonGt(gt=json.dumps(gt)), "gt", True, "gt"


class _JsonGt(dict):
    """A `gt` that is a JSON value, not text: converted as its text, put back as a value."""


def _same(a, b, tol: float) -> bool:
    pa, pb = value_points(a), value_points(b)
    return len(pa) == len(pb) and all(abs(u - v) <= tol for p, q in zip(pa, pb) for u, v in zip(p, q))


def _convert_record(rec: dict, scaler: _Scaler) -> tuple[str, str, str, str]:
    """Rewrite `rec`'s coordinates in place: (action, detail, problem kind, field). Actions: converted,
    already_normalised, no_coordinates, refused (detail: the reason)."""
    task = rec.get("task") if isinstance(rec.get("task"), str) else None
    keyed, texts, questions, notes = [], [], [], []
    values: dict[str, list] = {"conversations": [], "gt": []}  # the answer's numbers and gt's, to compare units
    for t, key, is_answer, fld in _turns(rec):
        text = t[key]
        if not is_answer:
            questions.append((t, key))
            continue
        obj = answer_json(text)
        if obj is not None and _coordinates(obj):
            keyed.append((t, key, obj, fld))
            values[fld] += _coordinates(obj)
            continue
        found, kind = find(text), classify_task(task, text).kind
        if found.percent:
            notes.append("Molmo tags: percent of the image by definition, unchanged")
        elif kind in GEOMETRIC:
            if found.odd or not found.lists:
                why = parse_answer(text, kind).error or "no coordinate list"
                return "refused", f"a {kind} answer whose coordinates cannot be read ({why}): {text[:60]!r}", "", fld
            texts.append((t, key, kind, fld))
            values[fld] += found.values
        elif (why := stray_in_lists(text, task)) is not None:
            return "refused", why, "", fld
    in_questions = [v for t, key in questions for v in find(t[key], bare=False).values]
    if not keyed and not texts and not any(abs(v) > 1 for v in in_questions):  # a question in pixels is converted
        return "no_coordinates", "; ".join(notes), "", ""
    unit = {fld: all(0 <= x <= 1 for x in v) for fld, v in values.items() if v}
    if len(set(unit.values())) > 1 and scaler.mode != "thousand":
        return "refused", ("`gt` and the answer are in different units (one in [0, 1], the other not): which is "
                           "the ground truth?"), "coords_out_of_range", "gt"
    if unit and all(unit.values()) and scaler.mode != "thousand":
        if any(abs(v) > 1 for v in in_questions):
            return "refused", ("the answer is in [0, 1] but the question holds coordinate lists above 1 "
                               f"({', '.join(f'{v:g}' for v in in_questions[:4])})"), "", "conversations"
        return "already_normalised", "; ".join(notes), "", ""
    size = scaler.size(rec)
    if isinstance(size, str):
        return "refused", size, "missing_image", "images"
    got = scaler.divisors(rec, size)
    if isinstance(got, str):
        return "refused", got, "", "new_w"
    sx, sy, source = got
    tol, outside = 10.0 ** -scaler.decimals, []
    for t, key, obj, fld in keyed:
        t[key] = json.dumps(_convert(obj, sx, sy, scaler.decimals, outside), ensure_ascii=False)
    for t, key, kind, fld in texts:
        before = parse_answer(t[key], kind, "pixels", (sx, sy))  # what the scorer reads, divided as we divide
        new, out, err = rescale_text(t[key], sx, sy, scaler.decimals)
        after = parse_answer(new, kind)
        if err or not before.ok:
            return "refused", err or f"the {kind} answer does not parse: {before.error}", "", fld
        if not out and not (after.ok and _same(before.value, after.value, tol)):
            return "refused", (f"the scorer would read other numbers than those rescaled ({t[key][:60]!r} -> "
                               f"{new[:60]!r})"), "", fld
        t[key] = new
        outside += out
    n_lists = 0
    for t, key in questions:
        new, out, err = rescale_text(t[key], sx, sy, scaler.decimals, bare=False)
        if err:
            return "refused", f"question: {err}", "", "conversations"
        n_lists += len(find(t[key], bare=False).lists)
        t[key], outside = new, outside + out
    if outside:
        return "refused", (f"{len(outside)} coordinate(s) outside the image after dividing by {sx:g} x {sy:g}"
                           f"{source} (e.g. {outside[0]:.3f}): wrong --from mode or image size?"),\
            "coords_out_of_range", ""
    for t, key, *_, fld in keyed + texts:  # what data check would refuse (a one-point trajectory...) is refused here
        for kind, reason in text_problems(t[key], task, size, MIN_TRAJ_POINTS):
            return "refused", f"once converted: {reason}", kind, fld
        if isinstance(t, _JsonGt):
            rec["gt"] = json.loads(t["gt"])
    if not any(k in rec for k in ("width", "height", "w", "h")):
        rec["width"], rec["height"] = size  # the size read from the image: eval reports pixel distances with it
    notes.insert(0, f"divided by {sx:g} x {sy:g}{source}" + (f"; {n_lists} coordinate list(s) in the question too"
                                                      if n_lists and (keyed or texts) else
                                                      f": {n_lists} coordinate list(s) in the question" if n_lists
                                                      else ""))
    return "converted", "; ".join(notes), "", ""


def normalize_file(src: str | os.PathLike, dst: str | os.PathLike, mode: str = "pixels",
                   data_root: str | os.PathLike | None = None, decimals: int = 3, factor: int = QWEN_FACTOR,
                   min_pixels: int = QWEN_MIN_PIXELS, max_pixels: int = QWEN_MAX_PIXELS,
                   force: bool = False, keypoints: str = "points") -> dict:
    """Write `dst` (.json array or .jsonl, by its suffix) with normalised coordinates: from an annotation file, a
    CSV table or a COCO-style JSON (labels.py; `keypoints`: points | trajectory). Returns a summary with every
    problem and, in `rows`, what was done with each input record or row; when there are problems nothing is
    written."""
    if mode not in MODES:
        raise UserError(f"--from {mode!r}: choose one of {', '.join(MODES)}")
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise UserError(f"{src} not found")
    # resolved once; never the input, and an existing file only with `force` and only one this command wrote
    dst = check_file(dst, force, flag="OUT", inputs={"input file": src})
    if dst.suffix and dst.suffix.lower() not in OUT_SUFFIXES:  # out.csv would get a JSON array
        raise UserError(f"OUT {dst.name}: write a .json (a JSON array) or a .jsonl file (one record a line), not "
                        f"{dst.suffix}")
    root = Path(data_root) if data_root else src.parent
    scaler = _Scaler(mode, root, decimals, factor, min_pixels, max_pixels, dst.parent)
    where_images = {"images_relative_to": str(scaler.image_root), "images_from_out": scaler.prefix is not None}
    if src.suffix.lower() == ".csv" or is_coco(src):
        if is_coco(src) and mode != "pixels":
            raise UserError(f"--from {mode}: COCO coordinates are pixels by definition; use --from pixels")
        records, rows, problems = read_labels(src, scaler, keypoints)
        counts = {"records": len(rows), **{a: sum(r["action"] == a for r in rows) for a in ROW_ACTIONS}}
        _write(dst, [json.dumps(r, ensure_ascii=False) for r in records], problems)
        return {**counts, "input": "coco" if is_coco(src) else "csv", "output": None if problems else str(dst),
                "mode": mode, **where_images, "rows": rows, "problems": [p.to_dict() for p in problems]}
    index = RecordIndex(src)
    problems: list[Problem] = list(index.problems)
    counts = {"records": len(index), "converted": 0, "already_normalised": 0, "no_coordinates": 0, "refused": 0}
    rows, texts = [], []  # texts: the output's records; none kept once a problem means nothing is written
    for i in range(len(index)):
        rec = index.read(i)
        where = index.where(i)
        if isinstance(rec, Problem):
            problems.append(rec)
            continue
        rid = str(rec.get("id")) if isinstance(rec, dict) and rec.get("id") is not None else None
        if not isinstance(rec, dict):
            problems.append(Problem(str(src), where, None, "-", f"not an object ({type(rec).__name__})"))
            continue
        action, detail, kind, fld = _convert_record(rec, scaler)
        if action != "refused" and (why := _rebase_images(rec, scaler)):
            action, detail, kind, fld = "refused", why, "path_escapes_root", "images"
        counts[action] += 1
        rows.append({"where": where, "id": rid, "action": action, "detail": detail})
        if action == "refused":
            problems.append(Problem(str(src), where, rid, fld or "conversations", detail, kind or "invalid_record"))
        elif not problems:
            texts.append(json.dumps(rec, ensure_ascii=False))
    _write(dst, texts, problems)
    return {**counts, "input": "records", "output": None if problems else str(dst), "mode": mode, **where_images,
            "rows": rows, "problems": [p.to_dict() for p in problems]}


def _write(dst: Path, texts: list[str], problems: list) -> None:
    """The output, only when nothing was refused: a half-converted file would be trained on."""
    if not problems:
        text = ("".join(t + "\n" for t in texts) if dst.suffix.lower() == ".jsonl"
                else "[\n" + ",\n".join(texts) + "\n]\n")
        write_file(dst, text.encode("utf-8"), "normalize")


ROW_ACTIONS = ("converted", "copied", "skipped", "refused")
_SAID = {"converted": "converted", "already_normalised": "already in [0, 1] (unchanged)",
         "no_coordinates": "without coordinates (copied)", "copied": "copied (no coordinates)", "skipped": "skipped",
         "refused": "refused"}


def format_summary(s: dict, show: int = 20) -> str:
    """`data normalize`'s report: what was done with each input row (for an annotation file: each record it
    changed; the first `show` of each action, all with show=0), the problems, then the totals."""
    lines, shown = [], {}
    # refusals are listed as problems, below; of a records file, only the records that changed
    skip = {"refused"} | ({"no_coordinates", "already_normalised"} if s["input"] == "records" else set())
    for r in s["rows"]:
        if r["action"] in skip:
            continue
        shown[r["action"]] = shown.get(r["action"], 0) + 1
        if show and shown[r["action"]] > show:
            continue
        rid = f" id={r['id']!r}" if r["id"] is not None else ""
        lines.append(f"  {r['where']}{rid}: {r['action']}" + (f" ({r['detail']})" if r["detail"] else ""))
    hidden = sum(max(0, n - show) for n in shown.values()) if show else 0
    if hidden:
        lines.append(f"  ... {hidden} more rows (--json lists every one)")
    for pr in s["problems"][: show or None]:
        lines.append(f"  - {Problem(**pr)}")
    if show and len(s["problems"]) > show:
        lines.append(f"  ... {len(s['problems']) - show} more problems (--json lists every one)")
    kinds = [k for k in ROW_ACTIONS if k != "skipped" or s.get(k)] if s["input"] != "records" else (
        "converted", "already_normalised", "no_coordinates", "refused")
    totals = ", ".join(f"{s.get(k, 0)} {_SAID[k]}" for k in kinds)
    noun = "records" if s["input"] == "records" else "rows"
    if s["output"]:
        images = ("image paths relative to OUT's folder" if s["images_from_out"] else
                  f"image paths relative to {s['images_relative_to']}, which OUT's folder does not hold: give "
                  f"--data-root {s['images_relative_to']} to data check and eval (data_path in a recipe)")
        return "\n".join(lines + [f"wrote {s['output']}: {s['records']} {noun}, {totals}; {images}"])
    return "\n".join(lines + [f"{len(s['problems'])} problem(s) in {s['records']} {noun} ({totals}); nothing written"])
