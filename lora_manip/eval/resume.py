"""predictions.jsonl written as generation goes, so an interrupted `eval` resumes without redoing answers.

Each batch's records are appended and flushed to disk before the next batch starts; a run killed mid-write loses at
most that batch's last line, which is cut off on resume. ``predictions.meta.json`` (written atomically before the
first answer) records everything the answers depend on (`run_identity`): the model (resolved path and a fingerprint
of its weight, config and processor files) and the base an adapter sits on; each data file's content (a hash: an
edit in place keeps the path, and old answers would be scored against the new ground truth), its dataset name and
every image's size and modification time; and each setting that changes an answer (system prompt, max_new_tokens,
the training run's image cap data.max_image_tiles, --limit, the backend). `--resume` refuses to add answers to a file
whose metadata differs, naming every difference, so results of two models, data sets or settings are never mixed.

Nothing is written before the first answer exists: a run that fails earlier (a missing image, a model that does not
load, a bad flag) leaves no file that would refuse the next try. A run interrupted after it made answers keeps them
for `--resume`. An answer is matched to its record by (dataset, id, occurrence): one eval may read several files, and
a file may repeat an id.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from pathlib import Path

from ..data.files import file_digest, file_stamp, loads
from ..errors import UserError
from ..fsutil import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

__all__ = ["PredictionLog", "model_identity", "run_identity", "record_keys", "PREDICTIONS", "META"]

PREDICTIONS = "predictions.jsonl"
META = "predictions.meta.json"
_DERIVED = ("metrics.json", "scores.jsonl")
# What the answers depend on: a resumed run must match it all (run_identity writes these keys).
_MUST_MATCH = ("model", "model_fingerprint", "base", "base_fingerprint", "data", "data_digest", "datasets", "images",
               "limit", "system_prompt", "max_new_tokens", "max_image_tiles", "backend")
# Keys a one-file eval does not write (its meta reads as before several files could be evaluated at once).
_ABSENT_IS_NONE = ("datasets",)
# Weights, configs, tokenizer and processor files, the chat template. Not recipe.yaml: the settings in it that
# change answers are keys of their own (system_prompt, max_image_tiles), so the refusal can name them.
_MODEL_FILES = (".safetensors", ".bin", ".json", ".jinja", ".model", ".txt", ".tiktoken")


def model_identity(model_path: str) -> tuple[str, str | None]:
    """(resolved path or hub id, fingerprint of the weight, config and processor files' names, sizes and
    modification times)."""
    p = Path(model_path)
    if not p.exists():
        return model_path, None
    files = sorted(f for f in p.iterdir() if f.suffix in _MODEL_FILES and f.is_file())
    h = hashlib.sha1()
    for f in files:
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return str(p.resolve()), h.hexdigest()[:16]


def record_keys(pairs) -> list[tuple[str, str, int]]:
    """(dataset, id, occurrence) for every (dataset, id) pair, in order: the key an answer is matched to its record
    by (a file may repeat an id, and two files may share one)."""
    seen: Counter = Counter()
    out = []
    for dataset, rid in pairs:
        key = (str(dataset), str(rid))
        out.append((*key, seen[key]))
        seen[key] += 1
    return out


def run_identity(model_path: str, data: list[tuple[str, str]], samples: list, *, base: str | None,
                 limit: int | None, system_prompt: str | None, system_prompt_from: str, max_new_tokens: int,
                 backend: str) -> dict:
    """predictions.meta.json: what the answers of an eval depend on (see the module docstring). `data`: the
    (dataset name, annotation file) pairs, in order; one file is written as before (a path, not a list)."""
    from ..model.adapters import adapter_base, is_adapter_dir
    from .generate import run_data_setting

    model_id, fingerprint = model_identity(model_path)
    base_path = base or (adapter_base(model_path) if is_adapter_dir(model_path) else None)
    images = {p: list(file_stamp(p)) for s in samples for p in s.images}
    data = sorted(data)  # the order --data names the files in does not change an answer
    paths = [str(Path(p).resolve()) for _, p in data]
    digests = [file_digest(p) for _, p in data]
    one = len(data) == 1
    return {"model": model_id, "model_fingerprint": fingerprint, "base": base,
            "base_fingerprint": model_identity(base_path)[1] if base_path else None,
            "data": paths[0] if one else paths, "data_digest": digests[0] if one else digests,
            "datasets": None if one else [name for name, _ in data], "images": images, "limit": limit,
            "system_prompt": system_prompt, "system_prompt_from": system_prompt_from,
            "max_new_tokens": max_new_tokens, "max_image_tiles": run_data_setting(model_path, "max_image_tiles"),
            "backend": backend}


def _difference(key: str, old, new) -> str:
    """One change, in words: what it was when the answers were made and what it is now."""
    if old is _UNRECORDED:
        return f"{key} (not recorded: an older lora-manip wrote the file)"
    if key == "data_digest":
        return "the data file's content (edited since the answers were made: they hold its old ground truth)"
    if key in ("data", "datasets") and isinstance(old, list) and isinstance(new, list):
        gone, added = [x for x in old if x not in new], [x for x in new if x not in old]
        return (f"{key}: {len(old)} file(s) then, {len(new)} now" + (f"; not now: {', '.join(gone[:3])}" if gone else "")
                + (f"; new: {', '.join(added[:3])}" if added else ""))
    if key in ("model_fingerprint", "base_fingerprint"):
        return f"the {key.split('_')[0]} files (weights, config or processor files changed)"
    if key == "images":
        changed = [p for p in sorted(set(old) | set(new)) if old.get(p) != new.get(p)]
        more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
        return f"image(s) {', '.join(changed[:3])}{more} (size or modification time differ, or not in both runs)"
    return f"{key}={old!r:.80} (now {key}={new!r:.80})"


_UNRECORDED = object()


class PredictionLog:
    """The append-only predictions file of one eval run in `out_dir`.

    fresh run: refuses a folder with earlier answers or metrics unless `force` (which starts over);
    `resume`: keeps the answers already there (metadata must match `meta`), or starts fresh when there are none.
    Nothing in the folder changes until the first `append`: a run that makes no answer leaves it as it was.
    """

    def __init__(self, out_dir: str | os.PathLike, meta: dict, resume: bool = False, force: bool = False,
                 images_of: dict | None = None):
        self.dir = Path(out_dir)
        self.path, self.meta_path = self.dir / PREDICTIONS, self.dir / META
        self.meta = meta
        self.records: list[dict] = []
        self.fresh = not (resume and self._has_answers())
        self._restamp = False  # images no answer was made from changed: the metadata takes their new stamps
        if not self.fresh:
            records, cut = self._read()
            self._check_meta(meta, records, images_of)
            if cut is not None:  # a batch's writes were cut short when the run was killed: its last line is partial
                log.warning("%s: dropping an incomplete last line (the run was interrupted while writing it)",
                            self.path)
                with open(self.path, "r+b") as f:
                    f.truncate(cut)
            self.records = records
            log.info("resuming %s: %d answers already there", self.path, len(self.records))
        else:
            # A meta file beside no answer is what a run that failed before its first answer left: no eval.
            existing = [n for n in (PREDICTIONS, *_DERIVED) if (self.dir / n).exists()
                        and (n != PREDICTIONS or self._has_answers())]
            if existing and not force:
                raise UserError(f"{self.dir} already holds an eval ({', '.join(existing)}); pass --resume to "
                                "continue it, --force to start over, or choose another --out")
            if resume:
                log.info("--resume: no answers yet in %s, starting fresh", self.dir)
        self._fh = None

    def _has_answers(self) -> bool:
        return self.path.is_file() and self.path.stat().st_size > 0

    def _open(self) -> None:
        """The first answer: only now is the folder changed (an old eval replaced, the metadata written)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        if self.fresh:
            self.path.unlink(missing_ok=True)
        if self.fresh or self._restamp:
            atomic_write_json(self.meta_path, self.meta)
        for name in _DERIVED:  # scored from the finished file at the end; until then they would describe another run
            (self.dir / name).unlink(missing_ok=True)
        self._fh = open(self.path, "a", encoding="utf-8")

    def _check_meta(self, meta: dict, records: list[dict], images_of: dict | None) -> None:
        """Refuse answers made from other inputs or settings. `images_of` ({record key: its image paths}): an image
        only records without an answer show may have changed (a broken image fixed after it stopped the run)."""
        try:
            old = json.loads(self.meta_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UserError(f"{self.meta_path} is missing, so the answers in {self.path} cannot be matched to a "
                            "model; pass --force to start over") from None
        except (OSError, ValueError) as e:
            raise UserError(f"{self.meta_path}: unreadable ({e}); pass --force to start over") from None
        recorded = {k: old.get(k, None if k in _ABSENT_IS_NONE else _UNRECORDED) for k in _MUST_MATCH}
        then, now = recorded["images"], meta.get("images")
        if images_of is not None and isinstance(then, dict) and isinstance(now, dict) and then != now:
            seen = {p for k in record_keys((r.get("dataset"), r["id"]) for r in records) for p in images_of.get(k, ())}
            # an unanswered record's image is compared as it is now; an answered record's as it was then
            recorded["images"] = {**{p: v for p, v in now.items() if p not in seen},
                                  **{p: v for p, v in then.items() if p in seen}}
            self._restamp = recorded["images"] == now
        changes = [_difference(key, recorded[key], meta.get(key)) for key in _MUST_MATCH
                   if recorded[key] != meta.get(key)]
        if changes:
            raise UserError(f"--resume: {self.path} holds answers made with other inputs or settings: "
                            f"{'; '.join(changes)}; answers of different runs are never mixed: use the same inputs "
                            "and settings, another --out, or --force to start over")

    def _read(self) -> tuple[list[dict], int | None]:
        """(the records, the length to cut the file to when its last line is partial, else None)."""
        raw = self.path.read_bytes()
        complete, newline, tail = raw.rpartition(b"\n")
        records = []
        for lineno, line in enumerate(complete.split(b"\n") if newline else [], start=1):
            if not line.strip():
                continue
            try:
                rec = loads(line)  # the one JSON rule of every reader (data/files.py)
            except ValueError as e:
                rec = e
            if not isinstance(rec, dict) or "id" not in rec:
                raise UserError(f"{self.path}: line {lineno} is not a prediction record; the file is damaged, "
                                "pass --force to start over")
            records.append(rec)
        return records, len(complete) + len(newline) if tail.strip() else None

    def append(self, records: list[dict]) -> None:
        if self._fh is None:
            self._open()
        self._fh.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self.records.extend(records)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()

    def put_in_order(self, records: list[dict]) -> None:
        """Rewrite the finished file with `records` (every answer it holds) in the data's order: answers are appended
        in generation order (longest first, batches, resumed runs), and `lora-manip score` of the file must sum in the
        order eval scored, so both give the same numbers to the last bit. Atomic: a kill leaves one file or the other."""
        if len(records) != len(self.records) or not self.path.exists():
            return
        atomic_write_text(self.path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        self.records = list(records)
