"""Annotation records (LLaVA conversation JSON, RoboInter flavour): a lazy index of a file, and validation of one
record into a `Sample` or a `Problem`.

Accepted: `.json` (an array) and `.jsonl`, read by files.py's one rule (extension in any case, a BOM, duplicate
keys refused); images under `images` (list or string) or LLaVA's `image`; turns with `from: human|gpt` or
`user|assistant` (also `role`/`content` keys); an optional leading system turn. Every problem is reported with
file, index (JSON) or line (JSONL), record id and field; nothing is skipped silently.

Laziness. A training process holds a `RecordIndex` per file: the byte offset and size of every record (numpy
arrays, 16 bytes a record), never the decoded records; a record is decoded again (`os.pread` + `json.loads`) when
it is needed. For `.jsonl` the index is one pass over the lines, no JSON parsing. A `.json` array has no line
structure, so it is indexed by decoding its elements one at a time from a sliding buffer (`JSONDecoder.raw_decode`)
and keeping only where each one starts and ends: peak memory is one buffer plus one record, not the whole array
as Python objects; the price is that the file is parsed once more than a `.jsonl` would be (see
benchmarks/data_index.py). Storing each record's raw bytes instead would keep the whole file in RAM.
"""

from __future__ import annotations

import array
import codecs
import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import UserError
from .files import DuplicateKey, json_format, loads, not_an_array, path_under

IMAGE_PLACEHOLDER = "<image>"
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}

# Problem kinds: `data check` groups by them, and `skip_bad_records` logs one count per kind.
PROBLEM_KINDS = {
    "missing_file": "annotation file missing or unreadable",
    "malformed_json": "malformed JSON",
    "duplicate_key": "JSON object with a key given twice",
    "invalid_record": "record is not an object, lacks an id, or has fields of the wrong type",
    "empty_conversation": "empty conversation",
    "non_alternating": "conversation does not alternate human/gpt",
    "empty_answer": "empty answer",
    "placeholder_mismatch": "<image> placeholders != images",
    "path_escapes_root": "image path escapes its data root",
    "missing_image": "image file missing",
    "unreadable_image": "image file unreadable",
    "coords_out_of_range": "grounding coordinates outside [0, 1]",
    "coords_not_finite": "grounding coordinates that are NaN or infinite",
    "coords_malformed": "grounding coordinates that are not numbers, or not a box / points of the right shape",
    "box_inverted": "box whose second corner lies left of or above its first",
    "duplicate_id": "id used by more than one record",
    "symlink_outside_root": "image reached through a symlink leading out of the data root",
    "short_trajectory": "trajectory with too few points",
}


@dataclass(frozen=True)
class Sample:
    """One training example: chat messages with `<image>` placeholders inline, and absolute image paths."""

    id: str
    messages: list[dict]  # [{"role": "system"|"user"|"assistant", "content": str}]
    images: list[str]
    source: str  # "file line N" / "file index N" for error messages
    size: tuple[int, int] | None = None  # (width, height) of the single image when the record states it
    extra: dict = field(default_factory=dict, compare=False)  # task, width/height or w/h, dataset name...


@dataclass(frozen=True)
class Problem:
    file: str
    where: str  # "index 3 (line 12)" or "line 4"
    record_id: str | None
    field: str
    reason: str
    kind: str = "invalid_record"  # a key of PROBLEM_KINDS

    def __str__(self) -> str:
        rid = f" id={self.record_id!r}" if self.record_id is not None else ""
        return f"{self.file} {self.where}{rid} field `{self.field}`: {self.reason}"

    def to_dict(self) -> dict:
        return {"file": self.file, "where": self.where, "record_id": self.record_id, "field": self.field,
                "reason": self.reason, "kind": self.kind}


# ------------------------------------------------------------------------------------------------- the index

_WS = re.compile(r"[ \t\n\r]*")
_CHUNK = 8 << 20


class RecordIndex:
    """Byte offsets of the records of one annotation file (see the module docstring).

    `problems` holds what was found while indexing: a malformed `.json` array (with its line; the records before
    the error stay indexed, `complete` is False) or a file that is not an array. Malformed `.jsonl` lines are found
    when they are read (`read`), so indexing a `.jsonl` file never parses JSON.
    """

    def __init__(self, path: str | os.PathLike, what: str = "annotation file"):
        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f"{what} {self.path} not found")
        self.kind = json_format(self.path)
        self.problems: list[Problem] = []
        self.complete = True
        self._fd: int | None = None
        self._pid = None
        starts, sizes, lines = array.array("q"), array.array("i"), array.array("i")
        try:
            (self._scan_jsonl if self.kind == "jsonl" else self._scan_json)(starts, sizes, lines)
        except OSError as e:
            raise UserError(f"cannot read annotation file {self.path}: {e}") from None
        self.starts = np.frombuffer(starts, dtype=np.int64) if starts else np.zeros(0, np.int64)
        self.sizes = np.frombuffer(sizes, dtype=np.int32) if sizes else np.zeros(0, np.int32)
        self.lines = np.frombuffer(lines, dtype=np.int32) if lines else np.zeros(0, np.int32)

    # -- indexing

    def _scan_jsonl(self, starts, sizes, lines) -> None:
        offset = 0
        with open(self.path, "rb") as f:
            for lineno, line in enumerate(f, 1):
                n = len(line)
                if line.strip():
                    starts.append(offset)
                    sizes.append(n)
                    lines.append(lineno)
                offset += n

    def _scan_json(self, starts, sizes, lines) -> None:
        decoder = json.JSONDecoder()
        utf8 = codecs.getincrementaldecoder("utf-8-sig")(errors="strict")
        f = open(self.path, "rb")
        # buf holds the unread text; buf[cur] is at byte `cur_byte`, line `cur_line` of the file. Positions only
        # move forward; refill() drops buf[:cur], so it is called only right after advance(p) and p becomes 0.
        buf, cur, eof, read_size = "", 0, False, _CHUNK
        cur_byte, cur_line = (3 if f.read(3) == codecs.BOM_UTF8 else 0), 1
        f.seek(0)

        def advance(p: int) -> None:
            nonlocal cur, cur_byte, cur_line
            piece = buf[cur:p]
            cur_byte += len(piece) if piece.isascii() else len(piece.encode("utf-8"))
            cur_line += piece.count("\n")
            cur = p

        def refill(grow: bool = False) -> None:
            nonlocal buf, cur, eof, read_size
            if grow:  # a record larger than the buffer: read more at a time, so it is not re-parsed often
                read_size = min(read_size * 2, 1 << 30)
            data = f.read(read_size)
            eof = not data
            try:
                text = utf8.decode(data, final=eof)
            except UnicodeDecodeError as e:
                raise UserError(f"{self.path}: not UTF-8 text ({e.reason})") from None
            buf, cur = buf[cur:] + text, 0

        def skip_ws(p: int) -> int:
            while True:
                q = _WS.match(buf, p).end()
                if q < len(buf) or eof:
                    return q
                advance(q)
                refill()
                p = 0

        def fail(p: int, msg: str) -> None:
            advance(min(p, len(buf)))
            self.complete = False
            self.problems.append(Problem(str(self.path), f"line {cur_line}", None, "<file>", msg, "malformed_json"))

        with f:
            refill()
            p = skip_ws(0)
            if p >= len(buf) or buf[p] != "[":
                fail(p, not_an_array(buf, p, decoder))
                return
            p = skip_ws(p + 1)
            if p < len(buf) and buf[p] == "]":
                return
            while True:
                last_error = None
                while True:  # decode one element; refill when the buffer may end inside it
                    try:
                        _, end = decoder.raw_decode(buf, p)
                        if end < len(buf) or eof:
                            break
                    except json.JSONDecodeError as e:
                        # A truncated element fails differently once more text arrives; a real error does not
                        # (except an unterminated string, which can only be settled by reading on).
                        error = (e.msg, e.pos - p)
                        if eof or (error == last_error and not e.msg.startswith("Unterminated string")):
                            fail(e.pos, f"malformed JSON ({e.msg}) in record {len(starts)}")
                            return
                        last_error = error
                    grow = p == 0  # the element already fills the whole buffer
                    advance(p)
                    refill(grow)
                    p = 0
                advance(p)
                start_byte, start_line = cur_byte, cur_line
                advance(end)
                starts.append(start_byte)
                sizes.append(cur_byte - start_byte)
                lines.append(start_line)
                p = skip_ws(end)
                if p >= len(buf):
                    fail(p, "malformed JSON (the array is not closed with `]`)")
                    return
                if buf[p] == "]":
                    q = skip_ws(p + 1)
                    if q < len(buf):
                        fail(q, "malformed JSON (extra data after the closing `]`)")
                    return
                if buf[p] != ",":
                    fail(p, f"malformed JSON (expected `,` or `]` after record {len(starts) - 1})")
                    return
                p = skip_ws(p + 1)

    # -- reading

    def __len__(self) -> int:
        return len(self.starts)

    def where(self, i: int) -> str:
        return f"line {self.lines[i]}" if self.kind == "jsonl" else f"index {i} (line {self.lines[i]})"

    def _file(self) -> int:
        # One descriptor per process (DataLoader workers fork); pread never moves a shared file position.
        if self._fd is None or self._pid != os.getpid():
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        return self._fd

    def read(self, i: int) -> object:
        """Record i decoded, or a Problem when its line is malformed JSON."""
        data = os.pread(self._file(), int(self.sizes[i]), int(self.starts[i]))
        try:
            return loads(data)
        except DuplicateKey as e:
            rid = e.value.get("id") if isinstance(e.value, dict) else None
            return Problem(str(self.path), self.where(i), rid if rid is None else str(rid), "<record>", str(e),
                           "duplicate_key")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            msg = f"{e.msg} at column {e.colno}" if isinstance(e, json.JSONDecodeError) else f"not UTF-8 ({e.reason})"
            return Problem(str(self.path), self.where(i), None, "<record>", f"malformed JSON ({msg})",
                           "malformed_json")

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("_fd", "_pid")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _fd=None, _pid=None)

    def __del__(self):
        fd = getattr(self, "_fd", None)
        if fd is not None and self._pid == os.getpid():
            try:
                os.close(fd)
            except OSError:
                pass

    @property
    def nbytes(self) -> int:
        return self.starts.nbytes + self.sizes.nbytes + self.lines.nbytes


# ------------------------------------------------------------------------------------------------ validation


def to_sample(raw: object, file: str, where: str, data_root: str | os.PathLike) -> Sample | Problem:
    """Validate one raw record; return a Sample or the first Problem found."""
    def problem(fld: str, reason: str, kind: str = "invalid_record") -> Problem:
        rid = raw.get("id") if isinstance(raw, dict) else None
        return Problem(file, where, None if rid is None else str(rid), fld, reason, kind)

    if isinstance(raw, Problem):
        return raw
    if not isinstance(raw, dict):
        return problem("<record>", f"expected an object, got {type(raw).__name__}")
    rid = raw.get("id")
    if rid is None or (isinstance(rid, str) and not rid.strip()):
        return problem("id", "missing" if rid is None else "empty")
    if isinstance(rid, bool) or not isinstance(rid, (str, int)):  # str() of an object is no id anyone can look up
        return problem("id", f"must be a string or an integer, got {type(rid).__name__} {rid!r:.60}")
    for k, v in ((k, raw[k]) for k in ("width", "height", "w", "h") if k in raw):  # bool is an int to Python
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < float("inf"):
            return problem(k, f"must be a positive number of pixels, got {v!r:.60}")
    images = raw.get("images", raw.get("image", []))
    key = "images" if "images" in raw else "image"
    if isinstance(images, str):
        images = [images]
    if images is None:
        images = []
    if not isinstance(images, list) or not all(isinstance(x, str) and x for x in images):
        return problem(key, "must be a path or a list of paths")
    convs = raw.get("conversations")
    if not isinstance(convs, list) or not convs:
        return problem("conversations", "missing or empty", "empty_conversation")
    messages = []
    for i, turn in enumerate(convs):
        if not isinstance(turn, dict):
            return problem(f"conversations[{i}]", "expected an object with `from` and `value`")
        role = _ROLES.get(str(turn.get("from", turn.get("role", ""))))
        value = turn.get("value", turn.get("content"))
        if role is None:
            return problem(f"conversations[{i}].from", f"unknown speaker {turn.get('from', turn.get('role'))!r}; "
                           "expected human/gpt, user/assistant or system")
        if not isinstance(value, str):
            return problem(f"conversations[{i}].value", "missing or not a string")
        if role == "system" and i != 0:
            return problem(f"conversations[{i}].from", "a system turn may only come first", "non_alternating")
        if role == "system" and IMAGE_PLACEHOLDER in value:
            return problem(f"conversations[{i}].value", system_prompt_error(value, "the system turn"),
                           "placeholder_mismatch")
        messages.append({"role": role, "content": value})
    turns = [(i, m) for i, m in enumerate(messages) if m["role"] != "system"]
    if not turns:
        return problem("conversations", "only a system turn, no human/gpt turns", "empty_conversation")
    for k, (i, m) in enumerate(turns):
        expected = "user" if k % 2 == 0 else "assistant"
        if m["role"] != expected:
            return problem(f"conversations[{i}].from", f"turns must alternate human/gpt starting with human; "
                           f"turn {k} is {'gpt' if m['role'] == 'assistant' else 'human'}", "non_alternating")
        if m["role"] == "assistant" and not m["content"].strip():
            return problem(f"conversations[{i}].value", "empty answer", "empty_answer")
        if m["role"] == "assistant" and IMAGE_PLACEHOLDER in m["content"]:
            return problem(f"conversations[{i}].value", f"{IMAGE_PLACEHOLDER} inside an answer",
                           "placeholder_mismatch")
    if turns[-1][1]["role"] != "assistant":
        return problem("conversations", "must end with a gpt answer (nothing to learn otherwise)",
                       "non_alternating")
    n_placeholders = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in messages)
    if n_placeholders != len(images):
        return problem("conversations", f"{n_placeholders} {IMAGE_PLACEHOLDER} placeholder(s) but {len(images)} "
                       f"image(s) in `{key}`", "placeholder_mismatch")
    # Lexical check (`..`, absolute paths): symlinks inside the root are followed when reading, so a data root
    # assembled from symlinks to other disks works; data/images.py warns about each one that leads out of the root.
    # No file system access here.
    root = os.path.abspath(data_root)
    paths = []
    for rel in images:
        p = path_under(root, rel)
        if p is None:
            return problem(key, f"path {rel!r} escapes the data root {root}", "path_escapes_root")
        paths.append(p)
    size = None
    if len(images) == 1 and isinstance(raw.get("width"), int) and isinstance(raw.get("height"), int):
        size = (raw["width"], raw["height"])
    extra = {k: raw[k] for k in ("task", "width", "height", "w", "h") if k in raw}
    return Sample(str(rid), messages, paths, f"{file} {where}", size, extra)


def system_prompt_error(prompt: str | None, source: str) -> str | None:
    """Why a system prompt (`source` names it) cannot be used, or None: an `<image>` in it would be taken for one of
    the sample's images (training, data check and eval refuse it alike)."""
    if isinstance(prompt, str) and IMAGE_PLACEHOLDER in prompt:
        return f"{source}: {IMAGE_PLACEHOLDER} inside a system prompt; images belong in a human turn (remove it)"
    return None


def read_raw_records(path: str | os.PathLike) -> list[tuple[str, object]]:
    """[(where, raw record)] of a whole file, decoded (small files only; training uses RecordIndex). Malformed
    JSON is a UserError naming its line."""
    index = RecordIndex(path)
    out = []
    for i in range(len(index)):
        raw = index.read(i)
        if isinstance(raw, Problem):
            raise UserError(str(raw))
        out.append((index.where(i), raw))
    if index.problems:
        raise UserError(str(index.problems[0]))
    return out


def load_samples(annotation_path: str | os.PathLike, data_root: str | os.PathLike
                 ) -> tuple[list[Sample], list[Problem]]:
    """All samples of a (small) file, decoded, and every problem (malformed JSON included)."""
    index = RecordIndex(annotation_path)
    samples, problems = [], list(index.problems)
    for i in range(len(index)):
        s = to_sample(index.read(i), str(annotation_path), index.where(i), data_root)
        (problems if isinstance(s, Problem) else samples).append(s)
    return samples, problems


def problem_summary(problems: list[Problem], limit: int = 20) -> str:
    """A bounded listing: counts per reason, then the first `limit` problems."""
    counts = Counter(p.kind for p in problems)
    lines = ["per reason: " + ", ".join(f"{PROBLEM_KINDS.get(k, k)} {n}" for k, n in counts.most_common())]
    lines += [f"  - {p}" for p in problems[:limit]]
    if len(problems) > limit:
        lines.append(f"  ... and {len(problems) - limit} more")
    return "\n".join(lines)
