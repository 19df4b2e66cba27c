"""How the kit reads the JSON files a user gives it, one rule for every reader (annotation files, prediction files,
the eval's own predictions.jsonl), and how it tells that a file changed (scan cache, `eval --resume`).

Format: `.jsonl` means one record a line and `.json` a JSON array, in any letter case (`.JSONL` too); any other
name is a JSON array when its first character is `[`, else JSON lines. A leading UTF-8 byte order mark is skipped
wherever a record can start. An object that gives a key twice is refused: JSON leaves it open which value counts
(Python keeps the last, other readers the first), so the record would mean different things to different tools.

Identity: a file's content digest (annotation files: small next to their images, and an edit in place keeps the
path) and an image's stamp (size and modification time: hashing every image would cost as much as decoding it).
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
from pathlib import Path

BOM = codecs.BOM_UTF8
SIZE_FIELDS = (("width", "height"), ("w", "h"))  # the kit's and LLaVA's, then RoboInter's


def size_fields(rec) -> tuple[str, str] | None:
    """The pair of a record's fields that states its image's size: `width` / `height`, else RoboInter's `w` / `h`,
    the first pair of which either field is given (so a missing half is named, not passed over); None if neither.
    One rule for every reader: data check, normalize, eval's records and the scorer."""
    return next((pair for pair in SIZE_FIELDS if any(rec.get(k) is not None for k in pair)), None)


def resized_size(rec) -> tuple[int, int] | str | None:
    """(width, height) of the resized image a record's coordinates may be pixels of: RoboInter's `new_w` / `new_h`
    (its dataset card: smart_resize_format is pixels of new_h x new_w); None when it states neither, or why the
    fields cannot be used. Every reader of resized pixels takes the record's own size over a recomputed one."""
    w, h = rec.get("new_w"), rec.get("new_h")
    if w is None and h is None:
        return None
    if all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (w, h)):
        return w, h
    return f"`new_w` / `new_h` must both be positive whole numbers of pixels, not {w!r} / {h!r}"


class DuplicateKey(ValueError):
    """An object with a key given twice; `value` is what the text decodes to otherwise (for the record's id)."""

    def __init__(self, key, value):
        super().__init__(f"duplicate key {key!r} in one object (which value is meant?)")
        self.key, self.value = key, value


def loads(data: bytes | str):
    """One JSON value: a leading BOM skipped, duplicate keys refused (DuplicateKey, a ValueError). Raises
    json.JSONDecodeError / UnicodeDecodeError like json.loads."""
    if isinstance(data, bytes):
        data = data[len(BOM):] if data.startswith(BOM) else data
        data = data.decode("utf-8")
    elif data.startswith("\ufeff"):
        data = data[1:]
    twice: list = []

    def pairs(items: list) -> dict:
        out = dict(items)
        if len(out) != len(items):
            keys = [k for k, _ in items]
            twice.extend(k for i, k in enumerate(keys) if k in keys[:i])
        return out

    value = json.loads(data, object_pairs_hook=pairs)
    if twice:
        raise DuplicateKey(twice[0], value)
    return value


def json_format(path: str | os.PathLike) -> str:
    """"jsonl" or "json" (an array) for a file, by its extension in any case, else by its first character."""
    suffix = Path(path).suffix.lower()
    if suffix in (".json", ".jsonl"):
        return suffix[1:]
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return "json"
    head = head[len(BOM):] if head.startswith(BOM) else head
    return "json" if head.lstrip()[:1] == b"[" else "jsonl"


def file_digest(path: str | os.PathLike, chunk: int = 8 << 20) -> str:
    """The content's blake2b digest (40 hex digits)."""
    h = hashlib.blake2b(digest_size=20)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_stamp(path: str | os.PathLike) -> tuple[int, int]:
    """(size in bytes, modification time in ns), or (-1, -1) for a file that is not there: a rewritten, truncated or
    replaced image changes it."""
    try:
        st = os.stat(path)
    except OSError:
        return -1, -1
    return st.st_size, st.st_mtime_ns


def path_under(root: str | os.PathLike, rel: str) -> str | None:
    """`rel` (a path a record names) resolved against `root`, normalised and absolute, or None when it lies outside
    it (`..`, an absolute path elsewhere). Lexical, no file system access: symlinks inside the root are followed
    when the file is read (roots assembled from links to other disks are common; images.py reports them)."""
    base = os.path.abspath(root)
    p = os.path.normpath(os.path.join(base, rel))
    return p if p.startswith(base.rstrip(os.sep) + os.sep) else None


def not_an_array(buf: str, p: int, decoder: json.JSONDecoder) -> str:
    """Why a .json file that does not start with `[` is not read, saying what it holds where that is clear from its
    start: JSON lines under a .json name, or one object (a COCO file, {"results": [...]}) whose records are inside."""
    plain = "expected a JSON array of records (or use .jsonl, one record per line)"
    if p >= len(buf) or buf[p] != "{":
        return plain
    try:
        obj, end = decoder.raw_decode(buf, p)
    except json.JSONDecodeError:
        return plain  # malformed, or longer than what was read: the plain rule is enough
    rest = buf[end:].lstrip()
    if rest.startswith("{"):
        return ("expected a JSON array of records, found one JSON object per line: that is JSON lines, which this "
                "reads from a file named .jsonl (rename it)")
    lists = [k for k, v in obj.items() if isinstance(v, list)][:5]
    inside = f"; its list(s) {', '.join(map(repr, lists))} may hold the records: write one as its own file" \
        if lists else ""
    coco = "; a COCO file: `lora-manip data normalize` converts it" if {"images", "annotations"} <= set(obj) else ""
    return f"expected a JSON array of records, found a JSON object{coco}{inside}"
