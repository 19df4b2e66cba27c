"""Writing safetensors checkpoints: bounded-size output shards with an index, as transformers' save_pretrained
writes them, filled tensor by tensor by producers that copy a tensor's bytes, cast it, or transform it in fp32 row
chunks, so peak memory stays near one row chunk whatever the model's size.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

from ..dtypes import CODE_TO_TORCH, ITEMSIZE
from ..errors import UserError
from .tensors import INDEX_FILE, SINGLE_FILE, TensorRef, read_tensor

DEFAULT_SHARD_BYTES = 5 * 1000**3  # as transformers' save_pretrained default ("5GB")
CHUNK_BYTES = 64 * 2**20  # fp32 working set per row chunk when a tensor is transformed


class _Workspace:
    """Row-chunk buffers reused from tensor to tensor. Fresh multi-MB allocations are handed back to the OS on free
    and page-fault on every use: measured here, filling new memory ran at ~1.5-2.5 GB/s, in-place work on
    memory already touched at ~25 GB/s, which made a merge 2-3x slower than it needs to be."""

    def __init__(self):
        self._bufs: dict[str, torch.Tensor] = {}

    def get(self, key: str, nbytes: int) -> torch.Tensor:
        buf = self._bufs.get(key)
        if buf is None or buf.numel() < nbytes:
            buf = self._bufs[key] = torch.empty(max(nbytes, 1), dtype=torch.uint8)
        return buf

    def clear(self) -> None:
        self._bufs.clear()


_workspace = _Workspace()  # one producer runs at a time (write_checkpoint is sequential)

RowFn = Callable[[torch.Tensor, int, int], None]


def row_producer(ref: TensorRef, dtype: str, fn: RowFn | None = None, chunk_bytes: int = CHUNK_BYTES) -> "Producer":
    """Write `ref` as `dtype`, row chunk by row chunk (first dimension; other dimensions flattened). With `fn`, each
    chunk is first converted to fp32 and `fn(rows, row_start, row_end)` modifies it in place.

    A pipeline: the next chunk is read (reader thread) and earlier chunks are written (the sink's writer thread)
    while this one is computed. Buffers are reused: about chunk_bytes of fp32 plus two source-dtype and three
    output-dtype chunks stay allocated."""
    rows_total = ref.shape[0] if ref.shape else 1
    cols = math.prod(ref.shape[1:]) if ref.shape else 1
    out_dtype = CODE_TO_TORCH[dtype]

    def produce(sink: "Sink") -> None:
        if rows_total == 0 or cols == 0:
            return
        step = max(1, chunk_bytes // (cols * 4))
        starts = list(range(0, rows_total, step))
        raws = [_workspace.get(f"raw{i}", step * cols * ITEMSIZE[ref.dtype]) for i in range(2)]
        outs = [_workspace.get(f"out{i}", step * cols * ITEMSIZE[dtype]) for i in range(Sink.DEPTH + 1)]
        work = _workspace.get("f32", step * cols * 4) if fn is not None else None

        def read(k: int) -> torch.Tensor:
            r0 = starts[k]
            n = min(step, rows_total - r0)
            src = read_tensor(ref, r0, r0 + n, out=raws[k % 2]) if ref.shape else read_tensor(ref, out=raws[k % 2])
            return src.reshape(n, cols)

        reader = _reader()
        ahead = reader.submit(read, 0)
        try:
            for k, r0 in enumerate(starts):
                src = ahead.result()
                # raws[(k + 1) % 2] held chunk k - 1, which was fully consumed before this iteration
                ahead = reader.submit(read, k + 1) if k + 1 < len(starts) else None
                n = src.shape[0]
                o = outs[k % len(outs)][:n * cols * ITEMSIZE[dtype]].view(out_dtype).view(n, cols)
                if fn is None:
                    o.copy_(src)
                else:
                    w = work[:n * cols * 4].view(torch.float32).view(n, cols)
                    w.copy_(src)
                    fn(w, r0, r0 + n)
                    o.copy_(w)
                sink.submit(o)
        finally:
            if ahead is not None:
                ahead.cancel() or ahead.exception()  # never leave a read writing into a reused buffer
        sink.drain()
    return produce


_reader_pool = None


def _reader():
    global _reader_pool
    if _reader_pool is None:
        from concurrent.futures import ThreadPoolExecutor

        _reader_pool = ThreadPoolExecutor(1, thread_name_prefix="shard-reader")
    return _reader_pool


class Sink:
    """The open output shard a producer writes one tensor's bytes to.

    `submit` hands a chunk to a background writer thread and returns at once, so the next chunks are computed while
    this one is written (write() blocks on the kernel's writeback throttling, and torch releases the GIL while it
    computes). At most DEPTH writes are in flight, in order: a producer may reuse a submitted buffer DEPTH + 1
    submits later."""

    DEPTH = 2

    def __init__(self, f):
        self._f = f
        self._pool = None
        self._pending: list = []

    def write(self, t: torch.Tensor) -> None:
        self.drain()
        self._write_now(t)

    def submit(self, t: torch.Tensor) -> None:
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(1, thread_name_prefix="shard-writer")
        while len(self._pending) >= self.DEPTH:
            self._pending.pop(0).result()
        self._pending.append(self._pool.submit(self._write_now, t))

    def drain(self) -> None:
        """Wait for the writes in flight (re-raising the first error)."""
        pending, self._pending = self._pending, []
        for i, fut in enumerate(pending):
            try:
                fut.result()
            except BaseException:
                for rest in pending[i + 1:]:
                    rest.cancel() or rest.exception()
                raise

    def close(self) -> None:
        try:
            self.drain()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)

    def _write_now(self, t: torch.Tensor) -> None:
        data = t.detach().contiguous().reshape(-1)
        if data.numel() == 0:
            return
        view = memoryview(data.view(torch.uint8).numpy())
        while len(view):
            n = self._f.write(view)
            view = view[n:]

    def copy_from(self, ref: TensorRef, chunk_bytes: int = CHUNK_BYTES) -> None:
        """Copy a tensor's bytes unchanged from its file (in the kernel where possible)."""
        self.drain()
        out_fd = self._f.fileno()
        with open(ref.file, "rb", buffering=0) as src:
            offset, left = ref.start, ref.nbytes
            try:
                while left:
                    n = os.copy_file_range(src.fileno(), out_fd, min(left, 1 << 30), offset)
                    if n == 0:
                        raise UserError(f"{ref.file} is truncated: tensor {ref.name} ends at byte {ref.end}")
                    offset += n
                    left -= n
                return
            except (AttributeError, OSError) as e:
                if isinstance(e, OSError) and e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL,
                                                               errno.EOPNOTSUPP, errno.EBADF):
                    raise
            buf = bytearray(min(left, chunk_bytes))
            view = memoryview(buf)
            src.seek(offset)
            while left:
                got = src.readinto(view[:min(left, len(buf))])
                if not got:
                    raise UserError(f"{ref.file} is truncated: tensor {ref.name} ends at byte {ref.end}")
                self._f.write(view[:got])
                left -= got


Producer = Callable[[Sink], None]


@dataclass
class OutTensor:
    """One tensor of the output: its key, dtype code, shape, and the function that writes its bytes."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    produce: Producer

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * ITEMSIZE[self.dtype]


def copy_tensor(ref: TensorRef) -> Producer:
    return lambda sink: sink.copy_from(ref)


def cast_tensor(ref: TensorRef, dtype: str) -> Producer:
    """Copy unchanged when the dtype already matches, else convert row chunk by row chunk."""
    return copy_tensor(ref) if dtype == ref.dtype else row_producer(ref, dtype)


def write_checkpoint(folder: str | os.PathLike, tensors: Iterable[OutTensor],
                     max_shard_bytes: int = DEFAULT_SHARD_BYTES, metadata: dict | None = None) -> list[Path]:
    """Write `tensors` (in order) as safetensors shards of at most `max_shard_bytes` each (a larger tensor gets a
    shard of its own): `model.safetensors` when one shard suffices, else `model-0000i-of-0000n.safetensors` plus
    `model.safetensors.index.json`, as transformers' save_pretrained names them. Only one tensor's bytes (or one row
    chunk of it) are in memory at a time. Returns the shard paths."""
    folder = Path(folder)
    tensors = list(tensors)
    names = [t.name for t in tensors]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"duplicate output tensor names: {dup}")
    groups: list[list[OutTensor]] = []
    size = 0
    for t in tensors:
        if not groups or (size + t.nbytes > max_shard_bytes and groups[-1]):
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += t.nbytes
    if not groups:
        groups = [[]]
    n = len(groups)
    files = [folder / (SINGLE_FILE if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors") for i in range(n)]
    meta = {"format": "pt", **(metadata or {})}
    try:
        for path, group in zip(files, groups):
            _write_shard(path, group, meta)
    finally:
        _workspace.clear()
    if n > 1:
        index = {"metadata": {"total_size": sum(t.nbytes for t in tensors)},
                 "weight_map": {t.name: path.name for path, group in zip(files, groups) for t in group}}
        index["weight_map"] = dict(sorted(index["weight_map"].items()))
        (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return files


def _write_shard(path: Path, group: list[OutTensor], metadata: dict) -> None:
    header: dict = {"__metadata__": {str(k): str(v) for k, v in metadata.items()}}
    offset = 0
    for t in group:
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned, as safetensors writes it
    with open(path, "wb", buffering=0) as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        sink = Sink(f)
        try:
            for t in group:
                before = f.tell()
                t.produce(sink)
                sink.drain()
                written = f.tell() - before
                if written != t.nbytes:
                    raise RuntimeError(f"{path}: wrote {written} bytes for tensor {t.name}, expected {t.nbytes}")
        finally:
            sink.close()


def parse_size(text: str | int) -> int:
    """'5GB' / '500MB' / '2GiB' / '1000' -> bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)?\s*", str(text).upper())
    if not m:
        raise UserError(f"size {text!r}: use a number of bytes or e.g. 500MB, 5GB")
    number, unit = float(m.group(1)), (m.group(2) or "B").rstrip("B") or ""
    scale = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}
    if unit not in scale:
        raise UserError(f"size {text!r}: unknown unit")
    value = int(number * scale[unit])
    if value <= 0:
        raise UserError(f"size {text!r} must be positive")
    return value

