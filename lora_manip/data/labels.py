"""A lab's own labels for `lora-manip data normalize`: a CSV table or a COCO-style JSON with coordinates in pixels,
in; the kit's records (LLaVA conversations, coordinates in [0, 1]) out, with one line of report per input row.

CSV: UTF-8, one header row, one row per image and question, separated by ',' (or ';' or tabs, as spreadsheets in
some locales save it). Columns (names case-insensitive, no others):
  image      the image's path, relative to --data-root (default: the CSV's folder); `~` and absolute paths
             inside the data root are written relative to it                                           required
  task       a kind (box, point, trajectory, choice, yesno, planning) or a task name the scorer knows
             (current_box, contact_point, traj, traj_choice, ...): how the answer is read and scored   required
  question   the question; "<image>\\n" is put in front when it has no <image>                           required
  answer     box, point and trajectory tasks: the geometry in the --from unit (pixels by default), in any
             shape the scorer reads: "x1 y1 x2 y2", "[x1, y1, x2, y2]", "[[x1, y1], [x2, y2]]", "(x, y),
             (x, y)", ... A box is two corners, not x, y, width, height (refused: the parser would sort it into
             another box). Numbers all in [0, 1]: already normalised, kept. Other tasks: the answer text. required
  id         the record's id (default: FILE-LINE)                                                         optional
  width, height   the image's size in pixels (default: read from the image)                              optional
Coordinate lists in a question ("starting at (320, 240)") are converted with the answer's.

COCO: a JSON object with `images` (id, file_name, width, height) and `annotations` (image_id, category_id, bbox,
keypoints); `categories` (id, name, keypoints) optional. Each annotation gives one record per geometry it has:
`bbox` ([x, y, width, height] in pixels, COCO's convention) a box; `keypoints` ([x, y, v] triples; v = 0 means
not labelled) a point record of its labelled points, or with `--keypoints trajectory` a trajectory in keypoint
order (keypoints all unlabelled beside a bbox: the box alone). The question is the annotation's `question`
field, else one made from the category's name; the task is the annotation's `task` field, else the kind. A crowd
region (`iscrowd` 1) is skipped, as COCO's training skips it. COCO coordinates are pixels by definition.

Output records: {"id", "task", "images": [image], "width", "height", "conversations": [human, gpt]}, the answer
{"bbox": [[x1, y1], [x2, y2]]} / {"points": [[x, y], ...]} / {"trajectory": [...]} (or the task's own name when
it names a coordinate key, as `current_bbox` does), rounded to --decimals; `width`/`height` the image's own size
(every row's image must exist), the image path as normalize.py's Scaler.rebase writes it. A row is refused, with
its field, when its task is no kind or task name the scorer knows, or when its record would fail `data check`.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from ..answers.coordinates import COORD_KEY
from ..answers.kinds import GEOMETRIC, KINDS, TASK_KINDS, classify_task
from ..answers.parse import parse_answer
from ..answers.units import find, rescale_text, value_points
from ..errors import UserError
from .files import path_under
from .records import IMAGE_PLACEHOLDER, Problem
from .report import MIN_TRAJ_POINTS
from .validate import box_order_problem, stray_in_lists, text_problems

CSV_REQUIRED = ("image", "task", "question", "answer")
CSV_OPTIONAL = ("id", "width", "height")
KEYPOINT_MODES = ("points", "trajectory")
_KEYS = {"box": "bbox", "point": "points", "pointing": "points", "trajectory": "trajectory"}
_TOLERANCE = 1e-6


class Scaler(Protocol):
    """What normalize.py supplies: the unit, a record's image size (or why there is none), the divisors (x, y, and
    where a resized size came from) of a record of that size, and an image path as the output writes it (None when
    it leaves the data root)."""

    mode: str
    decimals: int
    root: Path

    def size(self, rec: dict) -> tuple[int, int] | str: ...

    def divisors(self, rec: dict, size: tuple[int, int]) -> tuple[float, float, str] | str: ...

    def rebase(self, rel: str) -> str | None: ...


@dataclass
class Row:
    where: str  # "line 4" (CSV), "annotations[3] (id 17)" (COCO)
    rid: str | None
    image: str = ""
    task: str = ""
    question: str = ""
    answer: str | None = None  # CSV: the answer's text
    points: list | None = None  # COCO: the geometry in pixels
    kind: str | None = None  # COCO knows it; CSV rows are classified like every record
    width: int | None = None
    height: int | None = None
    error: tuple[str, str] | None = None  # (field, reason): the row cannot become a record
    skip: str | None = None  # why the row gives no record and needs none (a COCO crowd region)
    note: str = ""  # said on the row's line


def is_coco(path: Path) -> bool:
    """A .json file whose top level is an object (records files are arrays)."""
    if path.suffix.lower() != ".json":
        return False
    with open(path, "rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    return head.startswith(b"{")


def _int(value: str, name: str) -> int | None:
    if not value:
        return None
    try:
        n = int(float(value))
    except ValueError:
        raise ValueError(f"{name} {value!r} is not a number of pixels") from None
    if n <= 0 or n != float(value):
        raise ValueError(f"{name} {value!r} must be a positive whole number of pixels")
    return n


def read_csv(path: Path) -> list[Row]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            first = f.readline()
            f.seek(0)  # spreadsheets in locales with a decimal comma save ';'-separated "CSV"; some save tabs
            sep = next((d for d in (",", ";", "\t") if d in first), ",")
            reader = csv.DictReader(f, delimiter=sep)
            header = [(h or "").strip().lower() for h in reader.fieldnames or []]
            missing = [c for c in CSV_REQUIRED if c not in header]
            unknown = [h for h in header if h not in CSV_REQUIRED + CSV_OPTIONAL]
            if missing or unknown or len(set(header)) != len(header):
                raise UserError(f"{path}: header {header}: " + (f"lacks {', '.join(missing)}; " if missing else "")
                                + (f"unknown column(s) {', '.join(unknown)}; " if unknown else "")
                                + f"expected columns {', '.join(CSV_REQUIRED)} (required) and "
                                f"{', '.join(CSV_OPTIONAL)} (optional), each once (see `lora-manip data normalize "
                                "--help`)")
            reader.fieldnames = header
            rows, end = [], reader.line_num
            for raw in reader:
                start, end = end + 1, reader.line_num  # a quoted field may span lines: name the row's first
                where = f"line {start}"
                if None in raw:
                    rows.append(Row(where, None, error=("-", f"{len(raw[None])} more field(s) than columns")))
                    continue
                v = {k: (raw.get(k) or "").strip() for k in header}
                row = Row(where, v.get("id") or f"{path.stem}-{start}", v["image"], v["task"],
                          v["question"], answer=v["answer"])
                empty = [c for c in CSV_REQUIRED if not v[c]]
                try:
                    row.width, row.height = _int(v.get("width", ""), "width"), _int(v.get("height", ""), "height")
                except ValueError as e:
                    row.error = ("width/height", str(e))
                if empty:
                    row.error = (empty[0], "empty")
                rows.append(row)
            return rows
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def read_coco(path: Path, keypoints: str = "points") -> list[Row]:
    if keypoints not in KEYPOINT_MODES:
        raise UserError(f"--keypoints {keypoints!r}: choose {' or '.join(KEYPOINT_MODES)}")
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
            or not isinstance(data.get("annotations"), list):
        raise UserError(f"{path}: a JSON object that is not COCO-style (expected `images` and `annotations` lists); "
                        "a records file is a JSON array")
    images = {img["id"]: img for img in data["images"] if isinstance(img, dict) and "id" in img}
    cats = {c.get("id"): c for c in data.get("categories") or [] if isinstance(c, dict)}
    rows: list[Row] = []
    for i, ann in enumerate(data["annotations"]):
        aid = ann.get("id", i) if isinstance(ann, dict) else i
        where = f"annotations[{i}]" + (f" (id {aid})" if isinstance(ann, dict) and "id" in ann else "")
        if not isinstance(ann, dict):
            rows.append(Row(where, None, error=("-", f"not an object ({type(ann).__name__})")))
            continue
        img = images.get(ann.get("image_id"))
        if img is None or not isinstance(img.get("file_name"), str):
            rows.append(Row(where, str(aid), error=("image_id", f"no image with id {ann.get('image_id')!r} and a "
                                                               "file_name in `images`")))
            continue
        if cats and "category_id" in ann and ann["category_id"] not in cats:  # its name would become "object"
            rows.append(Row(where, str(aid), error=("category_id", f"{ann['category_id']!r} is not an id of "
                                                                   f"`categories` ({sorted(map(str, cats))[:8]})")))
            continue
        cat = cats.get(ann.get("category_id"), {})
        name = str(cat.get("name") or "object")
        try:  # a size COCO states must be one (640.0 is); a missing one is read from the image
            size = {k: _int(str(img[k]), k) for k in ("width", "height") if img.get(k) is not None}
        except ValueError as e:
            rows.append(Row(where, str(aid), error=("images", f"image id {img['id']!r}: {e}")))
            continue
        rows += _coco_geometries(ann, aid, where, name, cat, keypoints, dict(image=img["file_name"], **size))
    return rows


def _number_list(value, size: int | None = None) -> bool:
    return isinstance(value, list) and (size is None or len(value) == size) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)


def _coco_geometries(ann: dict, aid, where: str, name: str, cat: dict, keypoints: str, common: dict) -> list[Row]:
    out = []
    task, question = ann.get("task"), ann.get("question")
    if ann.get("iscrowd"):  # RLE over a group of objects: COCO's own training and evaluation leave it out
        return [Row(where, str(aid),
                    skip="iscrowd 1: a crowd region, not one object; COCO's training leaves it out too")]
    if "bbox" in ann:
        b = ann["bbox"]
        if not _number_list(b, 4) or b[2] <= 0 or b[3] <= 0:
            out.append(Row(where, f"{aid}-box", error=("bbox", f"{b!r} is not [x, y, width, height] with a positive "
                                                               "width and height")))
        else:
            out.append(Row(where, f"{aid}-box", task=task or "box", kind="box", points=[
                (b[0], b[1]), (b[0] + b[2], b[1] + b[3])], question=question or f"Give the bounding box of the "
                                                                               f"{name}.", **common))
    kp = ann.get("keypoints")
    if kp:
        kind = "trajectory" if keypoints == "trajectory" else "point"
        rid = f"{aid}-{'trajectory' if kind == 'trajectory' else 'points'}"
        names = cat.get("keypoints") if isinstance(cat.get("keypoints"), list) else []
        if not _number_list(kp) or len(kp) % 3:
            out.append(Row(where, rid, error=("keypoints", "not a list of [x, y, v] number triples")))
            return out
        seen = [k for k in range(len(kp) // 3) if kp[3 * k + 2] > 0]
        pts = [(kp[3 * k], kp[3 * k + 1]) for k in seen]
        if not pts and out:  # exporters write [0, 0, 0, ...] for an object whose keypoints nobody labelled
            out[-1].note = "its keypoints are all unlabelled (v = 0): no point record"
            return out
        if not pts:  # a trajectory's length: data check's rule, applied to every record (convert_row)
            out.append(Row(where, rid, error=("keypoints", "no labelled point (v > 0)")))
            return out
        what = ", ".join(str(names[k]) for k in seen if k < len(names)) or "keypoints"
        default = (f"Trace the path of the {name}." if kind == "trajectory" else f"Point to the {what} of the {name}.")
        out.append(Row(where, rid, task=task or kind, kind=kind, points=pts, question=question or default, **common))
    if not out:
        out.append(Row(where, str(aid), error=("-", "no bbox and no keypoints: nothing to convert")))
    return out


def _answer_key(task: str, kind: str) -> str:
    return task if COORD_KEY.search(task) and task not in _KEYS else _KEYS[kind]


def _task_problem(row: Row) -> str | None:
    """Why the row's task is not one the scorer reads a kind from (a kind, a task name of its table, or a name it
    guesses a kind from), or does not fit the geometry a COCO annotation gives."""
    tk = classify_task(row.task, None)
    if tk.source not in ("name", "guess"):
        return (f"{row.task!r} is not a kind ({', '.join(KINDS)}) or a task name the scorer knows "
                f"({', '.join(sorted(TASK_KINDS))})")
    if row.kind and tk.kind != row.kind:
        return f"{row.task!r} is scored as a {tk.kind}, but the annotation gives a {row.kind}"
    return None


def _under_root(image: str, root: Path) -> str | None:
    """A row's image path relative to the data root, as records name images: `~` expanded, an absolute path inside
    the root made relative (an absolute path in the output would tie it to this machine); None outside the root."""
    path = os.path.expanduser(image)
    if not os.path.isabs(path):
        return image
    inside = path_under(root, path)
    return None if inside is None else Path(os.path.relpath(inside, os.path.abspath(root))).as_posix()


def _in_unit_range(row: Row, kind: str, mode: str) -> bool:
    """A CSV answer whose coordinates all lie in [0, 1] (pixels or resized pixels would put the whole box within
    one pixel of the corner): labels already normalised, kept as they are. COCO is pixels by definition."""
    if row.points is not None or kind not in GEOMETRIC or mode == "thousand" or row.answer is None:
        return False
    found = find(row.answer)
    return bool(found.values) and not found.percent and all(0 <= v <= 1 for v in found.values)


def convert_row(row: Row, scaler: Scaler, seen: set) -> tuple[dict | None, str, str, str]:
    """(record, action, detail, problem kind) with action converted | copied, or (None, "refused" | "skipped",
    reason, kind)."""
    if row.skip:
        return None, "skipped", row.skip, ""
    if row.error:
        return None, "refused", f"{row.error[0]}: {row.error[1]}", ""
    if row.rid in seen:
        return None, "refused", f"id: {row.rid!r} is used by an earlier row", ""
    seen.add(row.rid)
    if (why := _task_problem(row)) is not None:
        return None, "refused", f"task: {why}", ""
    image = _under_root(row.image, scaler.root)
    if image is None:
        return None, "refused", (f"images: {row.image!r} is not under the data root {os.path.abspath(scaler.root)}: "
                                 "give --data-root a folder that holds every image"), "path_escapes_root"
    rec: dict = {"id": row.rid, "task": row.task, "images": [image]}
    if row.width and row.height:
        rec.update(width=row.width, height=row.height)
    size = scaler.size(rec)
    if isinstance(size, str):
        return None, "refused", f"images: {size}", "missing_image"
    rec.update(width=size[0], height=size[1])  # every record states its size: eval's pixel distances need it
    kind = row.kind or classify_task(row.task, row.answer).kind
    question = row.question if IMAGE_PLACEHOLDER in row.question else f"{IMAGE_PLACEHOLDER}\n{row.question}"
    in_question = find(question, bare=False)
    sx, sy, _ = scaler.divisors(rec, size)  # a row states no new_w / new_h: never a refusal, no note
    notes = [row.note] if row.note else []
    unit = _in_unit_range(row, kind, scaler.mode)
    if unit and any(abs(v) > 1 for v in in_question.values):
        return None, "refused", ("question: the answer is in [0, 1] but the question holds coordinates above 1 "
                                 f"({', '.join(f'{v:g}' for v in in_question.values[:4])})"), ""
    if unit:
        sx = sy = 1.0  # a lab's answers already in [0, 1]: divided again they would all collapse onto a corner
        notes.append("already in [0, 1]: kept")
    elif in_question.lists or in_question.odd:
        question, outside, err = rescale_text(question, sx, sy, scaler.decimals, bare=False)
        if err or outside:
            why = err or f"coordinates outside the image ({outside[0]:.3f})"
            return None, "refused", f"question: {why}", "coords_out_of_range" if outside else ""
        notes.append(f"{len(in_question.lists)} coordinate list(s) in the question converted")
    if kind in GEOMETRIC:
        percent = row.points is None and find(row.answer).percent  # Molmo tags: percent whatever --from says
        if row.points is not None:
            pts = [(x / sx, y / sy) for x, y in row.points]
        elif (why := box_order_problem(row.answer, row.task)) is not None:  # the parser would swap the corners
            return None, "refused", f"answer: {why}", "box_inverted"
        else:
            parsed = parse_answer(row.answer, kind, "pixels", (sx, sy))
            if not parsed.ok:
                return None, "refused", (f"answer: does not read as a {kind} ({parsed.error}): "
                                         f"{row.answer[:60]!r}"), ""
            pts = value_points(parsed.value)
        bad = [v for p in pts for v in p if not -_TOLERANCE <= v <= 1 + _TOLERANCE]
        if bad:
            how = ("read as percent (Molmo tags): above 100?" if percent else f"dividing by {sx:g} x {sy:g}: wrong "
                   f"--from, or the image is not {sx:g} x {sy:g}?")
            return None, "refused", f"answer: outside the image (e.g. {bad[0]:.3f}) {how}", "coords_out_of_range"
        pts = [[round(min(max(v, 0.0), 1.0), scaler.decimals) for v in p] for p in pts]
        answer = json.dumps({_answer_key(row.task, kind): pts})
        for problem_kind, reason in text_problems(answer, row.task, size, MIN_TRAJ_POINTS):  # data check's rule
            return None, "refused", f"answer: {reason}", problem_kind
        notes.insert(0, f"{kind} read from Molmo tags as percent of the image" if percent
                     else kind if unit else f"{kind} divided by {sx:g} x {sy:g}")
        action = "converted"
    else:
        stray = stray_in_lists(row.answer, row.task)
        if stray:
            return None, "refused", f"answer: {stray}", ""
        answer, action = row.answer, "copied"
        notes.insert(0, f"{kind} answer copied")
    rebased = scaler.rebase(image)
    if rebased is None:
        return None, "refused", f"images: path {row.image!r} escapes the data root", "path_escapes_root"
    rec["images"] = [rebased]
    rec["conversations"] = [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    return rec, action, "; ".join(notes), ""


def read_labels(src: Path, scaler: Scaler, keypoints: str = "points") -> tuple[list[dict], list[dict], list[Problem]]:
    """(records, one report line per row, problems) of a CSV or COCO file."""
    rows = read_csv(src) if src.suffix.lower() == ".csv" else read_coco(src, keypoints)
    if not rows:
        raise UserError(f"{src}: no rows to convert")
    records, report, problems, seen = [], [], [], set()
    for row in rows:
        rec, action, detail, kind = convert_row(row, scaler, seen)
        report.append({"where": row.where, "id": row.rid, "action": action, "detail": detail})
        if rec is None and action == "skipped":
            continue
        if rec is None:
            field, _, reason = detail.partition(": ")
            problems.append(Problem(str(src), row.where, row.rid, field, reason, kind or "invalid_record"))
        else:
            records.append(rec)
    return records, report, problems
