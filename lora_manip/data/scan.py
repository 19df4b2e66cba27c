"""The pass over a file's records that training starts with and `data check` reports on: every record checked
(validate.py) and, with a processor, measured exactly (encode.token_lengths), into one ScanResult of numpy arrays.

Large files are scanned by a pool of forked processes (each reads its own slice of the index), so a million records
cost minutes of CPU spread over the cores, not of one core. scan_cache.py keeps the result across runs.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from ..errors import UserError
from .images import symlink_warnings
from .records import Problem, RecordIndex, system_prompt_error
from .validate import check_record, task_of

log = logging.getLogger(__name__)

POOL_THRESHOLD = 5_000  # records; fewer are scanned in-process (forking costs more than decoding them saves)
_CHUNK = 4096  # records per pool task and per tokenizer batch


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
    # every image read, as it was when read (files.file_stamp): a cached result is stale once one of them changes
    image_stamps: dict = field(default_factory=dict)

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
            out.image_stamps.update(p.image_stamps)
        return out


def _scan_serial(index, data_root, positions, chat, min_traj_points) -> ScanResult:
    keep, lens, nimg, tiles, problems, tasks, bad = [], [], [], [], [], Counter(), 0
    ids, warnings, stamps = [], [], {}
    pending: list = []
    processor = chat.processor if chat is not None else None
    if processor is not None:
        # here, not at the top: they import torch and transformers (seconds), which a check without a model skips
        from .encode import token_lengths
        from .processor import image_tiles

    def flush():
        if processor is not None and pending:
            lens.extend(token_lengths(chat, pending))
        elif pending:
            lens.extend([-1] * len(pending))
        pending.clear()

    for pos in positions:
        s, sizes, p = check_record(index, int(pos), data_root, min_traj_points, stamps)
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
                      len(positions), bad, ids, warnings, stamps)


_POOL_STATE: dict = {}


def _pool_init(state: dict) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _POOL_STATE.clear()
    _POOL_STATE.update(state)


def _pool_scan(bounds: tuple[int, int]) -> ScanResult:
    st = _POOL_STATE
    lo, hi = bounds
    return _scan_serial(st["index"], st["data_root"], st["positions"][lo:hi], st["chat"], st["min_traj_points"])


def default_workers() -> int:
    """Processes for scanning: the cores this process's share of the node, at most 16."""
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return max(1, min(16, (os.cpu_count() or 1) // max(per_node, 1)))


def scan(index: RecordIndex, data_root: str, positions: np.ndarray | None = None, chat=None,
         min_traj_points: int = 2, workers: int | None = None) -> ScanResult:
    """Check (and, with a chat's processor, measure) the records of `index` at `positions` (default: all)."""
    positions = np.arange(len(index), dtype=np.int64) if positions is None else np.asarray(positions, np.int64)
    problem = system_prompt_error(chat.system_prompt if chat is not None else None, "data.system_prompt")
    if problem:  # before a record is read: it would fail every one of them
        raise UserError(problem)
    workers = default_workers() if workers is None else workers
    start = time.time()
    if workers <= 1 or len(positions) < POOL_THRESHOLD or "fork" not in multiprocessing.get_all_start_methods():
        result = _scan_serial(index, str(data_root), positions, chat, min_traj_points)
    else:
        state = dict(index=index, data_root=str(data_root), positions=positions, chat=chat,
                     min_traj_points=min_traj_points)
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
