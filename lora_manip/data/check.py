"""Checks every record of an annotation file, for `lora-manip data check` and for the start of training (the same
code: training refuses broken data unless the recipe says `skip_bad_records: true`).

Per record: the structural checks of `records.to_sample` (malformed JSON, placeholders, alternation, empty
answers, paths escaping the data root), then the images (decoded in full, so a truncated or corrupt file is caught
here rather than in the middle of training; the sizes feed the image token counts; an image reached through a
symlink that leads out of the data root is a warning), then the grounding answers: a gpt answer that parses as
JSON and has keys ending in bbox/box/point/traj must hold finite coordinates in [0, 1] (values above 1 get a hint
that they look like pixels; NaN/inf get their own message), and a trajectory needs at least `min_traj_points`
points. Then, with a processor, the exact token length of the sample, image tokens included.

`data check` also reports ids used by more than one record of a file.

Large files are scanned by a pool of forked processes (each reads its own slice of the index), so a million records
cost minutes of CPU spread over the cores, not of one core.
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing
import os
import re
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import UserError
from .records import PROBLEM_KINDS, Problem, RecordIndex, Sample, to_sample

log = logging.getLogger(__name__)

COORD_KEY = re.compile(r"(bbox|box|boxes|point|points|traj|trajectory)$", re.IGNORECASE)
TRAJ_KEY = re.compile(r"traj(ectory)?$", re.IGNORECASE)
PIXEL_HINT = ("; values above 1 look like pixel coordinates: convert the file with `lora-manip data normalize` "
              "(answers must be normalised to [0, 1])")
POOL_THRESHOLD = 5_000  # records; fewer are scanned in-process (forking costs more than decoding them saves)
_CHUNK = 4096  # records per pool task and per tokenizer batch


# -------------------------------------------------------------------------------------------------- images

_SIZE_CACHE: OrderedDict = OrderedDict()  # records about the same frame are usually adjacent


def read_image_size(path: str) -> tuple[int, int] | str:
    """(width, height) of an image that decodes in full, or the reason it does not. A header-only read would pass
    a truncated file that then stops training in the collator."""
    hit = _SIZE_CACHE.get(path)
    if hit is not None:
        _SIZE_CACHE.move_to_end(path)
        return hit
    try:
        with Image.open(path) as im:
            size = im.size
            im.load()
    except FileNotFoundError:
        return "missing"
    except Exception as e:  # PIL raises many kinds (UnidentifiedImageError, DecompressionBombError, OSError...)
        return f"unreadable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    if size[0] <= 0 or size[1] <= 0:
        return f"unreadable (size {size})"
    _SIZE_CACHE[path] = size
    if len(_SIZE_CACHE) > 4096:
        _SIZE_CACHE.popitem(last=False)
    return size


def symlink_warnings(sample: Sample, file: str, where: str, data_root: str) -> list[Problem]:
    """Images that a symlink inside the data root leads out of it: followed (roots assembled from links to other
    disks are common), but never silently."""
    root = os.path.realpath(data_root)
    out = []
    for k, path in enumerate(sample.images):
        real = os.path.realpath(path)
        if real != path and not real.startswith(root.rstrip(os.sep) + os.sep) and os.path.exists(real):
            out.append(Problem(file, where, sample.id, f"images[{k}]", f"image {path} is a symlink (or lies under "
                               f"one) that leads out of the data root, to {real}", "symlink_outside_root"))
    return out


def image_problems(sample: Sample, file: str, where: str) -> tuple[list[tuple[int, int]], list[Problem]]:
    sizes, problems = [], []
    for k, path in enumerate(sample.images):
        got = read_image_size(path)
        if isinstance(got, tuple):
            sizes.append(got)
            continue
        kind = "missing_image" if got == "missing" else "unreadable_image"
        reason = f"image {path} not found" if got == "missing" else f"cannot read image {path}: {got}"
        problems.append(Problem(file, where, sample.id, f"images[{k}]", reason, kind))
    return sizes, problems


# ------------------------------------------------------------------------------------------------- answers


def _numbers(value) -> list[float] | None:
    """All numbers of a nested list, or None when it holds anything else."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return [float(value)]
    if isinstance(value, list):
        out = []
        for v in value:
            got = _numbers(v)
            if got is None:
                return None
            out += got
        return out
    return None


def _coordinate_items(obj, path: str = ""):
    """(key path, value) of every key ending in bbox/box/point/traj, at any depth."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if isinstance(k, str) and COORD_KEY.search(k):
                yield (f"{path}.{k}" if path else k), v
            else:
                yield from _coordinate_items(v, f"{path}.{k}" if path else str(k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _coordinate_items(v, f"{path}[{i}]")


def _n_points(value) -> int:
    if isinstance(value, list) and value and all(isinstance(v, list) for v in value):
        return len(value)
    nums = _numbers(value) or []
    return len(nums) // 2


def parse_answer(text: str):
    """The answer as JSON when it looks like JSON (starts with { or [), else None."""
    t = text.strip()
    if not t or t[0] not in "{[":
        return None
    try:
        return json.loads(t)
    except ValueError:
        return None


def answer_problems(sample: Sample, file: str, where: str, min_traj_points: int = 2) -> list[Problem]:
    problems = []
    task = str(sample.extra.get("task", ""))
    for i, m in enumerate(sample.messages):
        if m["role"] != "assistant":
            continue
        obj = parse_answer(m["content"])
        if obj is None:
            continue
        items = list(_coordinate_items(obj))
        if not items and isinstance(obj, list) and COORD_KEY.search(task):
            items = [(task, obj)]  # a bare list answer; the record's task says what it is
        fld = f"conversations[{i}].value"
        for key, value in items:
            nums = _numbers(value)
            if nums is None:
                continue
            if not all(map(math.isfinite, nums)):
                problems.append(Problem(file, where, sample.id, fld, f"`{key}` has NaN/inf coordinate(s); every "
                                        "coordinate must be a finite number in [0, 1]", "coords_not_finite"))
                continue
            bad = [x for x in nums if not 0.0 <= x <= 1.0]
            if bad:
                shown = ", ".join(f"{x:g}" for x in bad[:3]) + (", ..." if len(bad) > 3 else "")
                reason = f"`{key}` has {len(bad)} coordinate(s) outside [0, 1] ({shown})"
                problems.append(Problem(file, where, sample.id, fld,
                                        reason + (PIXEL_HINT if any(x > 1 for x in bad) else ""),
                                        "coords_out_of_range"))
            if TRAJ_KEY.search(key):
                n = _n_points(value)
                if n < min_traj_points:
                    problems.append(Problem(file, where, sample.id, fld,
                                            f"`{key}` has {n} point(s); a trajectory needs at least "
                                            f"{min_traj_points}", "short_trajectory"))
    return problems


def task_of(sample: Sample) -> str:
    """The record's `task`, else the key of a JSON answer, else choice / yesno / text."""
    if sample.extra.get("task"):
        return str(sample.extra["task"])
    answer = sample.messages[-1]["content"].strip()
    obj = parse_answer(answer)
    if isinstance(obj, dict) and len(obj) == 1:
        return str(next(iter(obj)))
    if re.fullmatch(r"[A-H][.)]?", answer):
        return "choice"
    if answer.lower().rstrip(".") in ("yes", "no"):
        return "yesno"
    return "text"


# ---------------------------------------------------------------------------------------------------- scan


@dataclass
class ScanResult:
    """What a pass over (some of) the records of one file found."""

    positions: np.ndarray  # int64: positions (in the file's index) of the valid records, in file order
    lengths: np.ndarray  # int32: exact token length of each valid record (image tokens included); -1 if unknown
    n_images: np.ndarray  # int16: images per valid record
    tiles: np.ndarray | None = None  # int16: vision-tower tiles per valid record (with a processor)
    problems: list[Problem] = field(default_factory=list)
    tasks: Counter = field(default_factory=Counter)  # valid records per task
    scanned: int = 0
    bad_records: int = 0  # records with at least one problem
    ids: list = field(default_factory=list)  # ids of the valid records, aligned with positions
    warnings: list[Problem] = field(default_factory=list)  # reported, not disqualifying

    @staticmethod
    def merge(parts: list["ScanResult"]) -> "ScanResult":
        out = ScanResult(np.concatenate([p.positions for p in parts]) if parts else np.zeros(0, np.int64),
                         np.concatenate([p.lengths for p in parts]) if parts else np.zeros(0, np.int32),
                         np.concatenate([p.n_images for p in parts]) if parts else np.zeros(0, np.int16),
                         np.concatenate([p.tiles for p in parts]) if parts and all(
                             p.tiles is not None for p in parts) else None)
        for p in parts:
            out.problems += p.problems
            out.tasks.update(p.tasks)
            out.scanned += p.scanned
            out.bad_records += p.bad_records
            out.ids += p.ids
            out.warnings += p.warnings
        return out


def check_record(index: RecordIndex, pos: int, data_root: str, min_traj_points: int = 2
                 ) -> tuple[Sample | None, list[tuple[int, int]], list[Problem]]:
    """Every check on one record: (sample or None, image sizes, problems)."""
    file, where = str(index.path), index.where(pos)
    s = to_sample(index.read(pos), file, where, data_root)
    if isinstance(s, Problem):
        return None, [], [s]
    sizes, problems = image_problems(s, file, where)
    problems += answer_problems(s, file, where, min_traj_points)
    return (None if problems else s), sizes, problems


def _scan_serial(index, data_root, positions, processor, system_prompt, min_traj_points) -> ScanResult:
    from .dataset import token_lengths

    from ..model.processor import image_tiles

    keep, lens, nimg, tiles, problems, tasks, bad = [], [], [], [], [], Counter(), 0
    ids, warnings = [], []
    pending: list = []

    def flush():
        if processor is not None and pending:
            lens.extend(token_lengths(processor, system_prompt, pending))
        elif pending:
            lens.extend([-1] * len(pending))
        pending.clear()

    for pos in positions:
        s, sizes, p = check_record(index, int(pos), data_root, min_traj_points)
        if p:
            problems += p
            bad += 1
            continue
        keep.append(int(pos))
        ids.append(s.id)
        warnings += symlink_warnings(s, str(index.path), index.where(int(pos)), data_root)
        nimg.append(len(s.images))
        if processor is not None:
            tiles.append(image_tiles(processor, sizes))
        tasks[task_of(s)] += 1
        pending.append((s, sizes))
        if len(pending) >= 256:
            flush()
    flush()
    return ScanResult(np.asarray(keep, np.int64), np.asarray(lens, np.int32), np.asarray(nimg, np.int16),
                      np.asarray(tiles, np.int16) if processor is not None else None, problems, tasks,
                      len(positions), bad, ids, warnings)


_POOL_STATE: dict = {}


def _pool_init(state: dict) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _POOL_STATE.clear()
    _POOL_STATE.update(state)


def _pool_scan(bounds: tuple[int, int]) -> ScanResult:
    st = _POOL_STATE
    lo, hi = bounds
    return _scan_serial(st["index"], st["data_root"], st["positions"][lo:hi], st["processor"],
                        st["system_prompt"], st["min_traj_points"])


def default_workers() -> int:
    """Processes for scanning: the cores this process's share of the node, at most 16."""
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return max(1, min(16, (os.cpu_count() or 1) // max(per_node, 1)))


def scan(index: RecordIndex, data_root: str, positions: np.ndarray | None = None, processor=None,
         system_prompt: str | None = None, min_traj_points: int = 2, workers: int | None = None) -> ScanResult:
    """Check (and, with a processor, measure) the records of `index` at `positions` (default: all)."""
    positions = np.arange(len(index), dtype=np.int64) if positions is None else np.asarray(positions, np.int64)
    workers = default_workers() if workers is None else workers
    start = time.time()
    if workers <= 1 or len(positions) < POOL_THRESHOLD or "fork" not in multiprocessing.get_all_start_methods():
        result = _scan_serial(index, str(data_root), positions, processor, system_prompt, min_traj_points)
    else:
        state = dict(index=index, data_root=str(data_root), positions=positions, processor=processor,
                     system_prompt=system_prompt, min_traj_points=min_traj_points)
        step = min(_CHUNK, max(256, -(-len(positions) // (4 * workers))))  # >= 4 tasks per process
        bounds = [(lo, min(lo + step, len(positions))) for lo in range(0, len(positions), step)]
        # fork: the children inherit the index and the processor instead of unpickling them
        with multiprocessing.get_context("fork").Pool(workers, initializer=_pool_init, initargs=(state,)) as pool:
            # a large file takes minutes on a first run (later runs read data/scan_cache.py's copy): show it
            from tqdm.auto import tqdm

            parts = []
            with tqdm(total=len(positions), desc=f"checking {index.path.name}", unit="rec") as bar:
                for part in pool.imap(_pool_scan, bounds):
                    parts.append(part)
                    bar.update(part.scanned)
            result = ScanResult.merge(parts)
    took = time.time() - start
    if len(positions) >= POOL_THRESHOLD:
        log.info("read %d records of %s in %.1f s (%d process(es), %.0f records/s)", len(positions), index.path,
                 took, max(1, workers), len(positions) / max(took, 1e-9))
    return result


# ------------------------------------------------------------------------------------------------- reports


@dataclass
class Entry:
    """One dataset to check: a name, its files, and the split it belongs to in the recipe."""

    name: str
    annotation_path: str
    data_path: str
    split: str = "train"


def _distribution(lengths: np.ndarray) -> dict | None:
    if len(lengths) == 0 or (lengths < 0).any():
        return None
    q = np.percentile(lengths, [50, 90, 99])
    return {"min": int(lengths.min()), "p50": int(q[0]), "p90": int(q[1]), "p99": int(q[2]),
            "max": int(lengths.max()), "mean": round(float(lengths.mean()), 1)}


def check_entries(entries: list[Entry], processor=None, system_prompt: str | None = None,
                  max_length: int = 32768, batch_size: int = 8, min_traj_points: int = 2, seed: int = 0,
                  workers: int | None = None) -> dict:
    """The machine-readable report of `data check` (format_report prints it)."""
    from .sampler import GroupedSampler, padding_efficiency, random_batches

    datasets, problems, warnings = [], [], []
    all_lengths, all_images = [], []
    for e in entries:
        row: dict = {"name": e.name, "split": e.split, "annotation_path": e.annotation_path,
                     "data_path": e.data_path, "records": 0, "valid": 0, "bad_records": 0}
        datasets.append(row)
        try:
            index = RecordIndex(e.annotation_path)
        except UserError as err:
            problems.append(Problem(e.annotation_path, "-", None, "annotation_path", str(err), "missing_file"))
            row["bad_records"] = None
            continue
        if not Path(e.data_path).is_dir():
            problems.append(Problem(e.annotation_path, "-", None, "data_path",
                                    f"data root {e.data_path} is not a folder", "missing_file"))
        problems += index.problems
        r = scan(index, e.data_path, None, processor, system_prompt, min_traj_points, workers)
        problems += r.problems + duplicate_ids(index, r)
        warnings += r.warnings
        row.update(records=len(index), valid=len(r.positions), bad_records=r.bad_records,
                   complete=index.complete, tasks=dict(sorted(r.tasks.items())),
                   images_per_record={str(k): int(v) for k, v in sorted(Counter(r.n_images.tolist()).items())})
        dist = _distribution(r.lengths)
        if dist is not None:
            over = int((r.lengths > max_length).sum())
            row.update(token_lengths=dist, over_max_length=over,
                       over_max_length_share=round(over / max(len(r.lengths), 1), 4))
            all_lengths.append(r.lengths)
            all_images.append(r.n_images)
    counts = Counter(p.kind for p in problems)
    report = {
        "ok": not problems,
        "problem_count": len(problems),
        "problem_counts": {k: counts[k] for k in sorted(counts)},
        "problems": [p.to_dict() for p in problems],
        "warnings": [w.to_dict() for w in warnings],
        "datasets": datasets,
        "model_max_length": max_length,
        "tokens_computed": processor is not None,
    }
    if all_lengths:
        lengths, n_images = np.concatenate(all_lengths), np.concatenate(all_images)
        report["_lengths"] = lengths  # for run_check's before/after comparison; popped before printing
        fits = lengths <= max_length
        lengths, has_images = lengths[fits], n_images[fits] > 0
        if len(lengths):
            grouped = GroupedSampler(lengths, has_images, batch_size, seed).batches(0)
            report["padding_efficiency"] = {
                "batch_size": batch_size,
                "random": round(padding_efficiency(lengths, random_batches(len(lengths), batch_size, seed)), 4),
                "grouped": round(padding_efficiency(lengths, grouped), 4)}
    return report


def format_report(report: dict, show: int = 5) -> str:
    lines = []
    for d in report["datasets"]:
        head = f"{d['name']} [{d['split']}]: {d['annotation_path']}"
        if d.get("bad_records") is None:
            lines += [head, "  not readable (see problems)"]
            continue
        lines.append(head)
        lines.append(f"  records: {d['records']}  valid: {d['valid']}  with problems: {d['bad_records']}")
        if d.get("tasks"):
            lines.append("  tasks: " + ", ".join(f"{k} {v}" for k, v in d["tasks"].items()))
        if d.get("images_per_record"):
            lines.append("  images per record: " + ", ".join(f"{k}: {v}" for k, v in d["images_per_record"].items()))
        if d.get("token_lengths"):
            t = d["token_lengths"]
            lines.append(f"  tokens (images included): min {t['min']}  p50 {t['p50']}  p90 {t['p90']}  "
                         f"p99 {t['p99']}  max {t['max']}  mean {t['mean']}")
            lines.append(f"  over model_max_length {report['model_max_length']}: {d['over_max_length']} "
                         f"({100 * d['over_max_length_share']:.1f}%, dropped at training)")
    if report.get("image_cap"):
        c = report["image_cap"]
        lines.append(f"data.max_image_tiles {c['max_image_tiles']}: {c['capped_records']} of {c['records']} records "
                     "have an image capped")
        for when in ("before", "after"):
            t = c[f"tokens_{when}"]
            if t:
                lines.append(f"  tokens {when}: p50 {t['p50']}  p90 {t['p90']}  p99 {t['p99']}  max {t['max']}  "
                             f"mean {t['mean']}")
    if not report["tokens_computed"]:
        lines.append("token lengths not computed: " + report.get("tokens_note", "no processor (pass --model)"))
    if "padding_efficiency" in report:
        pe = report["padding_efficiency"]
        lines.append(f"padding efficiency (real tokens / all tokens), batch size {pe['batch_size']}: "
                     f"random order {100 * pe['random']:.1f}%, length-grouped {100 * pe['grouped']:.1f}%")
    for w in report.get("warnings", [])[:show]:
        lines.append("warning: " + str(Problem(**w)))
    if len(report.get("warnings", [])) > show:
        lines.append(f"warning: ... and {len(report['warnings']) - show} more (--json lists all)")
    if report["ok"]:
        lines.append("no problems found")
        return "\n".join(lines)
    lines.append(f"{report['problem_count']} problem(s):")
    by_kind: dict[str, list] = {}
    for p in report["problems"]:
        by_kind.setdefault(p["kind"], []).append(p)
    for kind, items in by_kind.items():
        lines.append(f"  {PROBLEM_KINDS.get(kind, kind)} ({kind}): {len(items)}")
        for p in items[:show]:
            lines.append("    - " + str(Problem(**p)))
        if len(items) > show:
            lines.append(f"    ... and {len(items) - show} more (--json lists all)")
    return "\n".join(lines)


def duplicate_ids(index: RecordIndex, r: ScanResult) -> list[Problem]:
    """One problem per record whose id an earlier valid record of the same file already has."""
    first: dict[str, int] = {}
    out = []
    for rid, pos in zip(r.ids, r.positions.tolist()):
        if rid in first:
            out.append(Problem(str(index.path), index.where(pos), rid, "id",
                               f"duplicate id: {index.where(first[rid])} has the same id", "duplicate_id"))
        else:
            first[rid] = pos
    return out


def entries_from_recipe(recipe) -> list[Entry]:
    out = []
    for split, items in (("train", recipe.data.train), ("val", recipe.data.val)):
        for i, d in enumerate(items):
            out.append(Entry(d.name or f"{split}[{i}] {Path(d.annotation_path).stem}", d.annotation_path,
                             d.data_path, split))
    return out


def run_check(target: str, model: str | None = None, data_root: str | None = None, max_length: int | None = None,
              batch_size: int | None = None, system_prompt: str | None = None, min_traj_points: int | None = None,
              overrides: list[str] | None = None, workers: int | None = None) -> dict:
    """`data check` on a recipe (.yaml/.yml: every train and val dataset, whole files) or one annotation file."""
    path = Path(target)
    note = None
    if path.suffix in (".yaml", ".yml"):
        from ..recipe import load_recipe

        recipe = load_recipe(path, overrides or [])
        entries = entries_from_recipe(recipe)
        d = recipe.data
        max_length = max_length or d.model_max_length
        batch_size = batch_size or recipe.train.per_device_batch_size
        system_prompt = system_prompt if system_prompt is not None else d.system_prompt
        min_traj_points = min_traj_points or d.min_traj_points
        seed = recipe.train.seed if d.seed is None else d.seed
        model = model or recipe.model.path
        cap = d.max_image_tiles
    else:
        if overrides:
            raise UserError("--set applies to recipes; checking a single annotation file takes no overrides")
        if not path.is_file():
            raise UserError(f"{path} not found (expected a recipe .yaml or an annotation .json/.jsonl)")
        entries = [Entry(path.stem, str(path), str(data_root or path.parent))]
        max_length, batch_size = max_length or 32768, batch_size or 8
        system_prompt = system_prompt if system_prompt is not None else "You are a helpful assistant."
        min_traj_points, seed = min_traj_points or 2, 0
        cap = None
    processor = None
    if model and not Path(model).is_dir():
        # A hub id would mean network look-ups (and minutes of retries offline); lengths need a local checkpoint.
        note = f"model {model} is not a local folder; pass --model with a local checkpoint for token lengths"
    elif model:
        try:
            from ..model.processor import load_processor

            processor = load_processor(model, cap)
        except (UserError, OSError, ValueError) as e:
            note = f"cannot load a processor from {model} ({str(e).splitlines()[0]})"
    report = check_entries(entries, processor, system_prompt, max_length, batch_size, min_traj_points, seed,
                           workers)
    after = report.pop("_lengths", None)
    if cap and processor is not None and after is not None:
        # data.max_image_tiles: measure again without the cap; only image tokens differ, so a record whose length
        # changed had an image capped
        before = check_entries(entries, load_processor(model), system_prompt, max_length, batch_size,
                               min_traj_points, seed, workers).pop("_lengths")
        report["image_cap"] = {"max_image_tiles": cap, "capped_records": int((before != after).sum()),
                               "records": int(len(after)), "tokens_before": _distribution(before),
                               "tokens_after": _distribution(after)}
    if note:
        report["tokens_note"] = note
    report["target"] = str(target)
    return report


def problem_summary(problems: list[Problem], limit: int = 20) -> str:
    """A bounded listing: counts per reason, then the first `limit` problems."""
    counts = Counter(p.kind for p in problems)
    lines = ["per reason: " + ", ".join(f"{PROBLEM_KINDS.get(k, k)} {n}" for k, n in counts.most_common())]
    lines += [f"  - {p}" for p in problems[:limit]]
    if len(problems) > limit:
        lines.append(f"  ... and {len(problems) - limit} more")
    return "\n".join(lines)
