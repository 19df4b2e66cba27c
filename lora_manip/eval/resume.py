"""predictions.jsonl written as generation goes, so an interrupted `eval` resumes without redoing answers.

Each batch's records are appended and flushed to disk before the next batch starts; a run killed mid-write loses at
most that batch's last line, which is cut off on resume. ``predictions.meta.json`` (written atomically before the
first answer) records what produced the answers: model (resolved path and a fingerprint of its weight files), base,
data file, system prompt and generation length. `--resume` refuses to add answers to a file whose metadata differs,
so results of two models are never mixed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from pathlib import Path

from ..errors import UserError
from ..fsutil import atomic_write_json

log = logging.getLogger(__name__)

__all__ = ["PredictionLog", "model_identity", "PREDICTIONS", "META"]

PREDICTIONS = "predictions.jsonl"
META = "predictions.meta.json"
_DERIVED = ("metrics.json", "scores.jsonl")
# Settings that change the answers: a resumed run must match them all.
_MUST_MATCH = ("model", "model_fingerprint", "base", "data", "limit", "system_prompt", "max_new_tokens")


def model_identity(model_path: str) -> tuple[str, str | None]:
    """(resolved path or hub id, fingerprint of the weight files' names, sizes and modification times)."""
    p = Path(model_path)
    if not p.exists():
        return model_path, None
    files = sorted(f for f in p.iterdir() if f.suffix in (".safetensors", ".bin", ".json") and f.is_file())
    h = hashlib.sha1()
    for f in files:
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return str(p.resolve()), h.hexdigest()[:16]


class PredictionLog:
    """The append-only predictions file of one eval run in `out_dir`.

    fresh run: refuses a folder with earlier predictions or metrics unless `force` (which starts over);
    `resume`: keeps the answers already there (metadata must match `meta`), or starts fresh when there are none.
    """

    def __init__(self, out_dir: str | os.PathLike, meta: dict, resume: bool = False, force: bool = False):
        self.dir = Path(out_dir)
        self.path, self.meta_path = self.dir / PREDICTIONS, self.dir / META
        self.records: list[dict] = []
        if resume and self.path.exists():
            self._check_meta(meta)
            self.records = self._read()
            log.info("resuming %s: %d answers already there", self.path, len(self.records))
        else:
            existing = [n for n in (PREDICTIONS, META, *_DERIVED) if (self.dir / n).exists()]
            if existing and not force:
                raise UserError(f"{self.dir} already holds an eval ({', '.join(existing)}); pass --resume to "
                                "continue it, --force to start over, or choose another --out")
            if resume:
                log.info("--resume: no %s yet in %s, starting fresh", PREDICTIONS, self.dir)
            self.dir.mkdir(parents=True, exist_ok=True)
            self.path.unlink(missing_ok=True)
            atomic_write_json(self.meta_path, meta)
        for name in _DERIVED:  # scored from the finished file at the end; until then they would describe another run
            (self.dir / name).unlink(missing_ok=True)
        self.done = Counter(str(r.get("id")) for r in self.records)
        self._fh = open(self.path, "a", encoding="utf-8")

    def _check_meta(self, meta: dict) -> None:
        try:
            old = json.loads(self.meta_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UserError(f"{self.meta_path} is missing, so the answers in {self.path} cannot be matched to a "
                            "model; pass --force to start over") from None
        except (OSError, ValueError) as e:
            raise UserError(f"{self.meta_path}: unreadable ({e}); pass --force to start over") from None
        for key in _MUST_MATCH:
            if old.get(key) != meta.get(key):
                raise UserError(f"--resume: {self.path} holds answers made with {key}={old.get(key)!r}, this run has "
                                f"{key}={meta.get(key)!r}; answers of different runs are never mixed: use the same "
                                "settings, another --out, or --force to start over")

    def _read(self) -> list[dict]:
        raw = self.path.read_bytes()
        complete, newline, tail = raw.rpartition(b"\n")
        records = []
        for lineno, line in enumerate(complete.split(b"\n") if newline else [], start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError as e:
                rec = e
            if not isinstance(rec, dict) or "id" not in rec:
                raise UserError(f"{self.path}: line {lineno} is not a prediction record; the file is damaged, "
                                "pass --force to start over")
            records.append(rec)
        if tail.strip():  # a batch's writes were cut short when the run was killed: its last line is partial
            log.warning("%s: dropping an incomplete last line (the run was interrupted while writing it)", self.path)
            with open(self.path, "r+b") as f:
                f.truncate(len(complete) + len(newline))
        return records

    def append(self, records: list[dict]) -> None:
        self._fh.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self.records.extend(records)
        self.done.update(str(r.get("id")) for r in records)

    def close(self) -> None:
        self._fh.close()
