"""Annotation records (LLaVA conversation JSON, RoboInter flavour) -> validated samples.

Accepted: `.json` (an array) and `.jsonl`; images under `images` (list or string) or LLaVA's `image`; turns with
`from: human|gpt` or `user|assistant` (also `role`/`content` keys); an optional leading system turn. Every problem
is reported with file, index (JSON) or line (JSONL), record id and field; nothing is skipped silently.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError

IMAGE_PLACEHOLDER = "<image>"
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass(frozen=True)
class Sample:
    """One training example: chat messages with `<image>` placeholders inline, and absolute image paths."""

    id: str
    messages: list[dict]  # [{"role": "system"|"user"|"assistant", "content": str}]
    images: list[str]
    source: str  # "file:index" for error messages
    size: tuple[int, int] | None = None  # (width, height) of the single image when the record states it
    extra: dict = field(default_factory=dict, compare=False)  # task, width, height, dataset name...


@dataclass(frozen=True)
class Problem:
    file: str
    where: str  # "index 3" or "line 4"
    record_id: str | None
    field: str
    reason: str

    def __str__(self) -> str:
        rid = f" id={self.record_id!r}" if self.record_id is not None else ""
        return f"{self.file} {self.where}{rid} field `{self.field}`: {self.reason}"


def read_raw_records(path: str | os.PathLike) -> list[tuple[str, object]]:
    """[(where, raw record)] from a .json array or .jsonl file; malformed JSON is a UserError with its line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"annotation file {path} not found")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        out = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                out.append((f"line {lineno}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise UserError(f"{path} line {lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
        return out
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path} line {e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a JSON array of records (or use .jsonl, one record per line)")
    return [(f"index {i}", r) for i, r in enumerate(data)]


def to_sample(raw: object, file: str, where: str, data_root: str | os.PathLike) -> Sample | Problem:
    """Validate one raw record; return a Sample or the first Problem found."""
    def problem(fld: str, reason: str) -> Problem:
        rid = raw.get("id") if isinstance(raw, dict) else None
        return Problem(file, where, None if rid is None else str(rid), fld, reason)

    if not isinstance(raw, dict):
        return problem("<record>", f"expected an object, got {type(raw).__name__}")
    rid = raw.get("id")
    if rid is None:
        return problem("id", "missing")
    images = raw.get("images", raw.get("image", []))
    key = "images" if "images" in raw else "image"
    if isinstance(images, str):
        images = [images]
    if not isinstance(images, list) or not all(isinstance(x, str) and x for x in images):
        return problem(key, "must be a path or a list of paths")
    convs = raw.get("conversations")
    if not isinstance(convs, list) or not convs:
        return problem("conversations", "missing or empty")
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
            return problem(f"conversations[{i}].from", "a system turn may only come first")
        messages.append({"role": role, "content": value})
    turns = [m for m in messages if m["role"] != "system"]
    for i, m in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            return problem("conversations", f"turns must alternate human/gpt starting with human; turn {i} is "
                           f"{m['role']}")
        if m["role"] == "assistant" and not m["content"].strip():
            return problem(f"conversations[{messages.index(m)}].value", "empty answer")
        if m["role"] == "assistant" and IMAGE_PLACEHOLDER in m["content"]:
            return problem(f"conversations[{messages.index(m)}].value", f"{IMAGE_PLACEHOLDER} inside an answer")
    if not turns or turns[-1]["role"] != "assistant":
        return problem("conversations", "must end with a gpt answer (nothing to learn otherwise)")
    n_placeholders = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in messages)
    if n_placeholders != len(images):
        return problem("conversations", f"{n_placeholders} {IMAGE_PLACEHOLDER} placeholder(s) but {len(images)} "
                       f"image(s) in `{key}`")
    root = Path(data_root).resolve()
    paths = []
    for rel in images:
        p = (root / rel).resolve()
        if not p.is_relative_to(root):
            return problem(key, f"path {rel!r} escapes the data root {root}")
        paths.append(str(p))
    size = None
    if len(images) == 1 and isinstance(raw.get("width"), int) and isinstance(raw.get("height"), int):
        size = (raw["width"], raw["height"])
    extra = {k: raw[k] for k in ("task", "width", "height") if k in raw}
    return Sample(str(rid), messages, paths, f"{file} {where}", size, extra)


def load_samples(annotation_path: str, data_root: str) -> tuple[list[Sample], list[Problem]]:
    samples, problems = [], []
    for where, raw in read_raw_records(annotation_path):
        s = to_sample(raw, str(annotation_path), where, data_root)
        (problems if isinstance(s, Problem) else samples).append(s)
    return samples, problems
