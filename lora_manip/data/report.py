"""The report of `lora-manip data check`: per dataset the records, valid ones, tasks, images per record, token
length distribution and how many exceed model_max_length; ids used twice in a file; the padding efficiency of
random vs length-grouped batches; every problem, grouped by kind (format_report prints it, --json dumps it).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..recipe import DataCfg
from .records import PROBLEM_KINDS, Problem, RecordIndex
from .sampler import GroupedSampler, padding_efficiency, random_batches
from .scan import ScanResult, scan

MAX_LENGTH = DataCfg.model_fields["model_max_length"].default
MIN_TRAJ_POINTS = DataCfg.model_fields["min_traj_points"].default


@dataclass
class Entry:
    """One dataset to check: a name, its files, and the split it belongs to in the recipe. `hints`: per field
    (annotation_path, data_path), what to check when that file or folder is missing (a registry's root)."""

    name: str
    annotation_path: str
    data_path: str
    split: str = "train"
    hints: dict[str, str] = field(default_factory=dict)


def _missing(e: Entry, key: str, message: str) -> str:
    hint = e.hints.get(key)
    return f"{message}; {hint}" if hint else message


def length_distribution(lengths: np.ndarray) -> dict | None:
    if len(lengths) == 0 or (lengths < 0).any():
        return None
    q = np.percentile(lengths, [50, 90, 99])
    return {"min": int(lengths.min()), "p50": int(q[0]), "p90": int(q[1]), "p99": int(q[2]),
            "max": int(lengths.max()), "mean": round(float(lengths.mean()), 1)}


# How training orders its batches (`batching` of check_entries), which decides the padding figure that applies
BATCHINGS = {"length-grouped": "data.group_by_length: true", "random": "data.group_by_length: false",
             "token-budget": "train.max_tokens_per_batch", "grpo": "objective grpo: TRL batches the prompts"}


def check_entries(entries: list[Entry], chat=None, max_length: int = MAX_LENGTH, batch_size: int = 8,
                  min_traj_points: int = MIN_TRAJ_POINTS, seed: int = 0, workers: int | None = None,
                  batching: str | None = None) -> dict:
    """The machine-readable report of `data check` (format_report prints it). `batching`: how the recipe's training
    orders batches (a BATCHINGS key), or None for a file checked without a recipe."""
    datasets, problems, warnings = [], [], []
    all_lengths, all_images = [], []
    for e in entries:
        row: dict = {"name": e.name, "split": e.split, "annotation_path": e.annotation_path,
                     "data_path": e.data_path, "records": 0, "valid": 0, "bad_records": 0}
        datasets.append(row)
        try:
            index = RecordIndex(e.annotation_path)
        except UserError as err:
            message = _missing(e, "annotation_path", str(err)) if not Path(e.annotation_path).is_file() else str(err)
            problems.append(Problem(e.annotation_path, "-", None, "annotation_path", message, "missing_file"))
            row["bad_records"] = None
            continue
        if not Path(e.data_path).is_dir():
            problems.append(Problem(e.annotation_path, "-", None, "data_path",
                                    _missing(e, "data_path", f"data root {e.data_path} is not a folder"),
                                    "missing_file"))
        problems += index.problems
        r = scan(index, e.data_path, None, chat, min_traj_points, workers)
        problems += r.problems + duplicate_ids(index, r)
        warnings += r.warnings
        row.update(records=len(index), valid=len(r.positions), bad_records=r.bad_records,
                   complete=index.complete, tasks=dict(sorted(r.tasks.items())),
                   images_per_record={str(k): int(v) for k, v in sorted(Counter(r.n_images.tolist()).items())})
        dist = length_distribution(r.lengths)
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
        "tokens_computed": chat is not None and chat.processor is not None,
    }
    if all_lengths:
        lengths, n_images = np.concatenate(all_lengths), np.concatenate(all_images)
        report["_lengths"] = lengths  # for run_check's before/after comparison; popped before printing
        fits = lengths <= max_length
        lengths, has_images = lengths[fits], n_images[fits] > 0
        if len(lengths):
            grouped = GroupedSampler(lengths, has_images, batch_size, seed).batches(0)
            report["padding_efficiency"] = {
                "batch_size": batch_size, "batching": batching,
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
        lines.append(_padding_line(report["padding_efficiency"]))
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


def _padding_line(pe: dict) -> str:
    """Padding efficiency, labelled by what applies: the order training uses, and the other only as what it would
    give (a recipe with data.group_by_length: false never groups)."""
    head = f"padding efficiency (real tokens / all tokens), batch size {pe['batch_size']}: "
    random, grouped = f"{100 * pe['random']:.1f}%", f"{100 * pe['grouped']:.1f}%"
    batching = pe.get("batching")
    if batching == "random":
        return f"{head}{random} in random order ({BATCHINGS[batching]}); length grouping would give {grouped}"
    if batching == "length-grouped":
        return f"{head}{grouped} length-grouped ({BATCHINGS[batching]}); random order would give {random}"
    both = f"{head}random order {random}, length-grouped {grouped}"
    if batching in BATCHINGS:  # training batches otherwise: neither figure is what it will see
        return f"{both} (training batches by {BATCHINGS[batching]}, not by this batch size)"
    return both


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
