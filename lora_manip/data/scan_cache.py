"""The pre-training scan (every record checked and measured, data/scan.py) cached on disk, so a restart of a
large run starts training in seconds instead of re-reading every record and image header (0.55-0.67 ms a record:
~10 minutes per million on 2 cores).

The key is what the result depends on: the annotation file's bytes (a hash of its content, not its name or
mtime), the records chosen (positions), the data root, the system prompt and trajectory rule, and the processor's
settings that change token counts (chat template, tokenizer vocabulary, image processor, image tokens per tile,
anyres caps). Change any of them and the scan runs again. Images are too many to hash: an entry keeps the size and
modification time of every image the scan read (files.file_stamp), and one that differs now (rewritten, truncated,
removed, or added where it was missing) makes the entry stale, so the scan runs again.

The cache lives in $LORA_MANIP_CACHE (default ~/.cache/lora-manip/scan). An entry is arrays and JSON (never
pickle, so reading one executes nothing) followed by a checksum of them, written atomically; an entry whose
checksum does not match (truncated, corrupt) or that does not load is scanned again and rewritten, never trusted
and never fatal.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from collections import Counter
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..outputs import write_cache_file

from .files import file_digest, file_stamp
from .records import Problem
from .scan import ScanResult, scan

log = logging.getLogger(__name__)
_VERSION = 2  # bump when ScanResult or the measurement changes
_MAGIC = b"lora-manip scan v2\n"  # the trailer: magic + blake2b of everything before it
_DIGEST = 32


def cache_dir() -> Path:
    return Path(os.environ.get("LORA_MANIP_CACHE") or Path.home() / ".cache" / "lora-manip") / "scan"


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
    for f in (here / "scan.py", here / "validate.py", here / "images.py", here / "records.py", here / "files.py",
              here / "encode.py", here / "processor.py", answers / "coordinates.py", answers / "kinds.py",
              answers / "geometry.py"):
        h.update(f.read_bytes())
    return h.hexdigest()


def scan_key(index, data_root, positions: np.ndarray, chat, min_traj_points) -> str:
    parts = {"v": _VERSION, "code": _code_digest(), "file": file_digest(index.path),
             "root": str(Path(data_root).resolve()),
             "positions": hashlib.blake2b(np.asarray(positions, np.int64).tobytes(), digest_size=16).hexdigest(),
             "system_prompt": chat.system_prompt if chat is not None else None, "min_traj_points": min_traj_points,
             "processor": processor_fingerprint(chat.processor if chat is not None else None)}
    return hashlib.blake2b(json.dumps(parts, sort_keys=True, default=str).encode(), digest_size=20).hexdigest()


def cached_scan(index, data_root, positions, chat=None, min_traj_points: int = 2,
                workers: int | None = None) -> ScanResult:
    """`scan(...)`, from the cache when the same inputs were scanned before."""
    positions = np.asarray(positions, np.int64)
    key = scan_key(index, data_root, positions, chat, min_traj_points)
    path = cache_dir() / f"{key}.npz"
    if path.is_file():
        result = _load(path)
        stale = _changed_image(result) if result is not None else None
        if result is not None and stale is None and len(result.positions) + result.bad_records == len(positions):
            log.info("%s: %d records measured before (scan cache %s)", index.path, result.scanned, path.name)
            return result
        if stale is not None:
            log.warning("scan cache %s: image %s changed since it was scanned; scanning again", path.name, stale)
        else:
            log.warning("scan cache %s is damaged (checksum or format); scanning again", path)
    result = scan(index, data_root, positions, chat, min_traj_points, workers)
    try:
        write_cache_file(path, _encode(result))  # into a cache folder of the kit's only (outputs/)
    except (OSError, UserError) as e:  # a read-only or full cache disk costs a rescan next time, never the run
        log.warning("could not write the scan cache %s (%s); the next run scans again", path,
                    getattr(e, "strerror", None) or e)
    return result


def _changed_image(r: ScanResult) -> str | None:
    """The first image whose file is not as the scan read it, or None."""
    for path, stamp in r.image_stamps.items():
        if file_stamp(path) != tuple(stamp):
            return path
    return None


# Arrays and JSON only (no pickle): nothing in a cache file is executed when it is read.

def _encode(r: ScanResult) -> bytes:
    meta = {"problems": [p.to_dict() for p in r.problems], "warnings": [w.to_dict() for w in r.warnings],
            "tasks": dict(r.tasks), "scanned": r.scanned, "bad_records": r.bad_records,
            "has_tiles": r.tiles is not None}
    paths = list(r.image_stamps)
    buf = io.BytesIO()
    np.savez(buf, positions=r.positions, lengths=r.lengths, n_images=r.n_images,
             tiles=r.tiles if r.tiles is not None else np.zeros(0, np.int16), meta=np.asarray(json.dumps(meta)),
             image_paths=np.frombuffer(json.dumps(paths).encode("utf-8"), np.uint8),
             image_stamps=np.asarray([r.image_stamps[p] for p in paths], np.int64).reshape(-1, 2))
    payload = buf.getvalue()
    return payload + _MAGIC + hashlib.blake2b(payload, digest_size=_DIGEST).digest()


def _load(path: Path) -> ScanResult | None:
    """The entry, or None when it is damaged: checksum first, so a cut-off or altered file is never parsed."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    cut = len(data) - len(_MAGIC) - _DIGEST
    if cut < 0 or data[cut:cut + len(_MAGIC)] != _MAGIC or \
            hashlib.blake2b(data[:cut], digest_size=_DIGEST).digest() != data[cut + len(_MAGIC):]:
        return None
    try:
        with np.load(io.BytesIO(data[:cut]), allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            paths = json.loads(z["image_paths"].tobytes().decode("utf-8"))
            stamps = {p: tuple(int(v) for v in st) for p, st in zip(paths, z["image_stamps"].tolist())}
            return ScanResult(z["positions"], z["lengths"], z["n_images"],
                              z["tiles"] if meta["has_tiles"] else None,
                              [Problem(**p) for p in meta["problems"]], Counter(meta["tasks"]), meta["scanned"],
                              meta["bad_records"], warnings=[Problem(**w) for w in meta["warnings"]],
                              image_stamps=stamps)
    except Exception:  # noqa: BLE001 - whatever a damaged entry raises (BadZipFile, KeyError...): scan again
        return None
