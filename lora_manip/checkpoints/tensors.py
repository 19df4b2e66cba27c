"""Reading safetensors checkpoints: a folder's shards and their headers, and one tensor's bytes (or a range of its
rows) at a time, so not even one large tensor has to be resident at once.

The reader parses the safetensors header itself and reads tensor bytes with plain file reads instead of
memory-mapping the shard: pages of a mapped file count towards the process's resident set while it stays mapped,
so reading a 5 GB shard through a mapping shows up as ~5 GB of RSS. The header is validated strictly (offsets
contiguous, sizes consistent with dtype and shape, data section exactly as long as the file) so a corrupt or
truncated file is reported by file and tensor before anything is written.

safetensors format: 8-byte little-endian header length N, N bytes of JSON header
{"__metadata__": {...}, name: {"dtype": "BF16", "shape": [...], "data_offsets": [begin, end]}, ...}, then the data
section; offsets are relative to the data section, which the tensors cover contiguously.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from ..dtypes import CODE_TO_TORCH, ITEMSIZE
from ..errors import UserError
from ..model.layouts import canonical

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_MAX_HEADER = 100 * 2**20


@dataclass(frozen=True)
class TensorRef:
    """Where one tensor's bytes are: file, key, dtype code, shape and absolute byte range in the file."""

    file: Path
    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def read_header(path: str | os.PathLike) -> tuple[dict, list[TensorRef]]:
    """(metadata, tensors in file order) of one safetensors file; UserError naming the file (and tensor) when the
    file is not a complete, well-formed safetensors file."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise UserError(f"{path}: not a safetensors file (only {size} bytes; truncated?)")
            n = int.from_bytes(head, "little")
            if n <= 0 or n > _MAX_HEADER or 8 + n > size:
                raise UserError(f"{path}: corrupt or truncated safetensors file (header length {n}, file size "
                                f"{size} bytes)")
            raw = f.read(n)
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (UnicodeDecodeError, ValueError) as e:
        raise UserError(f"{path}: corrupt safetensors header ({str(e).splitlines()[0]})") from None
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + n
    refs = []
    for name, entry in header.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
            ok = (dtype in CODE_TO_TORCH and all(isinstance(d, int) and d >= 0 for d in shape)
                  and isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end)
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:
            raise UserError(f"{path}: corrupt safetensors header entry for tensor {name}: {entry}")
        if end - begin != math.prod(shape) * ITEMSIZE[dtype]:
            raise UserError(f"{path}: tensor {name}: {end - begin} bytes for {dtype} {list(shape)} (corrupt header)")
        refs.append(TensorRef(path, name, dtype, shape, data_start + begin, data_start + end))
    refs.sort(key=lambda r: (r.start, r.end))
    pos = data_start
    for r in refs:
        if r.end > size:
            raise UserError(f"{path} is truncated: tensor {r.name} needs bytes {r.start}..{r.end}, the file has "
                            f"{size}")
        if r.start != pos:
            raise UserError(f"{path}: corrupt safetensors file: tensor {r.name} starts at byte {r.start}, expected "
                            f"{pos} (overlapping or non-contiguous data)")
        pos = r.end
    if pos != size:
        raise UserError(f"{path}: corrupt safetensors file: {size - pos} bytes after the last tensor")
    return metadata, refs


class Checkpoint:
    """The safetensors weights of a checkpoint folder: `model.safetensors`, or shards listed by
    `model.safetensors.index.json`. Headers are read and cross-checked on construction; no tensor data is read."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        index = self.folder / INDEX_FILE
        single = self.folder / SINGLE_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                if not isinstance(weight_map, dict):
                    raise TypeError
            except (ValueError, KeyError, TypeError):
                raise UserError(f"{index}: not a valid safetensors index (no weight_map)") from None
            names = list(dict.fromkeys(weight_map.values()))
            missing = [n for n in names if not (self.folder / n).is_file()]
            if missing:
                raise UserError(f"{index} lists shard(s) that do not exist: {', '.join(missing)}")
            self.files = [self.folder / n for n in names]
        elif single.is_file():
            weight_map, self.files = None, [single]
        else:
            other = sorted(p.name for p in self.folder.glob("*.bin")) if self.folder.is_dir() else []
            hint = f" (found {', '.join(other[:3])}: only safetensors checkpoints are supported)" if other else ""
            raise UserError(f"{self.folder}: no {SINGLE_FILE} or {INDEX_FILE}{hint}")
        self.shards: list[list[TensorRef]] = []
        self.metadata: list[dict] = []
        seen: dict[str, Path] = {}
        for path in self.files:
            meta, refs = read_header(path)
            self.metadata.append(meta)
            self.shards.append(refs)
            for r in refs:
                if r.name in seen:
                    raise UserError(f"tensor {r.name} is in both {seen[r.name]} and {path}")
                seen[r.name] = path
        if weight_map is not None:
            absent = [k for k, f in weight_map.items() if seen.get(k) != self.folder / f]
            if absent:
                raise UserError(f"{index} maps tensors to shards that do not hold them: {listing(absent)}")
            unlisted = [k for k in seen if k not in weight_map]
            if unlisted:
                raise UserError(f"{index} does not list tensors present in the shards: {listing(unlisted)}")

    def tensors(self) -> Iterator[TensorRef]:
        """Every tensor, shard by shard, in file order (sequential reads)."""
        for refs in self.shards:
            yield from refs


def read_tensor(ref: TensorRef, row_start: int = 0, row_end: int | None = None,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """Rows [row_start, row_end) of a tensor (all of it by default), read from disk into a fresh tensor, or into
    the front of `out` (a 1-D uint8 buffer at least that large) when given."""
    if not ref.shape:
        nbytes, offset, shape = ref.nbytes, ref.start, ()
    else:
        row_end = ref.shape[0] if row_end is None else row_end
        row_bytes = math.prod(ref.shape[1:]) * ITEMSIZE[ref.dtype]
        nbytes, offset, shape = (row_end - row_start) * row_bytes, ref.start + row_start * row_bytes, \
            (row_end - row_start, *ref.shape[1:])
    buf = torch.empty(nbytes, dtype=torch.uint8) if out is None else out[:nbytes]
    if nbytes:
        view, done = memoryview(buf.numpy()), 0
        with open(ref.file, "rb", buffering=0) as f:
            f.seek(offset)
            while done < nbytes:
                got = f.readinto(view[done:])
                if not got:
                    raise UserError(f"{ref.file} is truncated: tensor {ref.name} ends at byte {ref.end}, the file "
                                    f"ends sooner")
                done += got
    return buf.view(CODE_TO_TORCH[ref.dtype]).reshape(shape)


def canonical_tensors(ckpt: Checkpoint, what: str = "checkpoint") -> dict[str, TensorRef]:
    """Canonical name -> TensorRef for every tensor of a LLaVA-OneVision checkpoint, in file order; keys of no
    known layout (or two keys naming the same tensor) are an error that lists them."""
    out: dict[str, TensorRef] = {}
    unknown, dup = [], []
    for ref in ckpt.tensors():
        name = canonical(ref.name)
        if name is None:
            unknown.append(ref.name)
        elif name in out:
            dup.append(f"{out[name].name} / {ref.name}")
        else:
            out[name] = ref
    if unknown:
        raise UserError(f"{ckpt.folder}: {len(unknown)} tensor(s) are not in a LLaVA-OneVision (transformers) "
                        f"layout: {listing(unknown)}. An original LLaVA-NeXT checkpoint needs `lora-manip convert "
                        f"SRC OUT --from llava-next --to hf` first")
    if dup:
        raise UserError(f"{ckpt.folder}: {what} holds the same tensor under two names: {listing(dup)}")
    return out


def listing(items: list[str], limit: int = 20) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")

