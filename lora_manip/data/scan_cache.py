"""The pre-training scan (every record checked and measured, data/scan.py) cached on disk, so a restart of a
large run starts training in seconds instead of re-reading every record and image header (0.55-0.67 ms a record:
~10 minutes per million on 2 cores).

The key is what the result depends on: the annotation file's bytes (a hash of its content, not its name or
mtime), the records chosen (positions), the data root, the system prompt and trajectory rule, and the processor's
settings that change token counts (chat template, tokenizer vocabulary, image processor, image tokens per tile,
anyres caps). Change any of them and the scan runs again. Image files themselves are not hashed: a record whose
image changed size since is caught when it is encoded (data/dataset.py checks the encoded length against the
measured one). The cache lives in $LORA_MANIP_CACHE (default ~/.cache/lora-manip/scan); entries are written
atomically (arrays and JSON, never pickle) and a corrupt one is scanned again.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..fsutil import atomic_write_bytes

from .scan import ScanResult, scan
from .records import Problem

log = logging.getLogger(__name__)
_VERSION = 1  # bump when ScanResult or the measurement changes


def cache_dir() -> Path:
    return Path(os.environ.get("LORA_MANIP_CACHE") or Path.home() / ".cache" / "lora-manip") / "scan"


def file_digest(path: Path, chunk: int = 8 << 20) -> str:
    h = hashlib.blake2b(digest_size=20)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def processor_fingerprint(processor) -> dict | None:
    if processor is None:
        return None
    ip = processor.image_processor.to_dict()
    tok = processor.tokenizer
    vocab = hashlib.blake2b(tok.backend_tokenizer.to_str().encode(), digest_size=16).hexdigest() \
        if hasattr(tok, "backend_tokenizer") else str(len(tok))
    return {"template": processor.chat_template, "vocab": vocab, "num_image_tokens": processor.num_image_tokens,
            "strategy": processor.vision_feature_select_strategy, "aspect": processor.vision_aspect_ratio,
            "image_processor": {k: ip.get(k) for k in ("size", "crop_size", "image_grid_pinpoints", "do_pad")},
            "pinpoints": [list(p) for p in processor.image_processor.image_grid_pinpoints]}


def _code_digest() -> str:
    """The measuring code itself: an upgraded kit (or an edited checkout) never reads an older kit's results."""
    here = Path(__file__).parent
    answers = here.parent / "answers"
    h = hashlib.blake2b(digest_size=16)
    for f in (here / "scan.py", here / "validate.py", here / "images.py", here / "lengths.py", here / "records.py",
              here / "encode.py", here / "processor.py", answers / "coordinates.py", answers / "kinds.py",
              answers / "geometry.py"):
        h.update(f.read_bytes())
    return h.hexdigest()


def scan_key(index, data_root, positions: np.ndarray, processor, system_prompt, min_traj_points) -> str:
    parts = {"v": _VERSION, "code": _code_digest(), "file": file_digest(index.path),
             "root": str(Path(data_root).resolve()),
             "positions": hashlib.blake2b(np.asarray(positions, np.int64).tobytes(), digest_size=16).hexdigest(),
             "system_prompt": system_prompt, "min_traj_points": min_traj_points,
             "processor": processor_fingerprint(processor)}
    return hashlib.blake2b(json.dumps(parts, sort_keys=True, default=str).encode(), digest_size=20).hexdigest()


def cached_scan(index, data_root, positions, processor=None, system_prompt=None, min_traj_points: int = 2,
                workers: int | None = None) -> ScanResult:
    """`scan(...)`, from the cache when the same inputs were scanned before."""
    positions = np.asarray(positions, np.int64)
    key = scan_key(index, data_root, positions, processor, system_prompt, min_traj_points)
    path = cache_dir() / f"{key}.npz"
    if path.is_file():
        result = _load(path)
        if result is not None and len(result.positions) + result.bad_records == len(positions):
            log.info("%s: %d records measured before (scan cache %s)", index.path, result.scanned, path.name)
            return result
        log.warning("scan cache %s is unreadable; scanning again", path)
    result = scan(index, data_root, positions, processor, system_prompt, min_traj_points, workers)
    buf = io.BytesIO()
    _save(buf, result)
    try:
        atomic_write_bytes(path, buf.getvalue())
    except (OSError, UserError) as e:  # a read-only or full cache disk costs a rescan next time, never the run
        log.warning("could not write the scan cache %s (%s); the next run scans again", path,
                    getattr(e, "strerror", None) or e)
    return result


# Arrays and JSON only (no pickle): nothing in a cache file is executed when it is read.

def _save(f, r: ScanResult) -> None:
    meta = {"problems": [p.to_dict() for p in r.problems], "tasks": dict(r.tasks), "scanned": r.scanned,
            "bad_records": r.bad_records, "has_tiles": r.tiles is not None}
    np.savez(f, positions=r.positions, lengths=r.lengths, n_images=r.n_images,
             tiles=r.tiles if r.tiles is not None else np.zeros(0, np.int16), meta=np.asarray(json.dumps(meta)))


def _load(path: Path) -> ScanResult | None:
    from collections import Counter

    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            return ScanResult(z["positions"], z["lengths"], z["n_images"],
                              z["tiles"] if meta["has_tiles"] else None,
                              [Problem(**p) for p in meta["problems"]], Counter(meta["tasks"]), meta["scanned"],
                              meta["bad_records"])
    except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError):
        return None
