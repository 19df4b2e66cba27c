"""Streaming safetensors I/O shared by `merge` and `convert`: read a checkpoint shard by shard and tensor by tensor
(in row chunks, so not even one large tensor has to be resident at once), write bounded-size output shards with an
index, and name LLaVA-OneVision tensors in one canonical layout whatever layout a checkpoint uses.

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

import errno
import json
import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

from .errors import UserError

log = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 5 * 1000**3  # as transformers' save_pretrained default ("5GB")
CHUNK_BYTES = 64 * 2**20  # fp32 working set per row chunk when a tensor is transformed
_MAX_HEADER = 100 * 2**20

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_CODES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
ITEMSIZE: dict[str, int] = {k: torch.empty((), dtype=v).element_size() for k, v in DTYPES.items()}
FLOAT_CODES = {"F64", "F32", "F16", "BF16"}


# ---------------------------------------------------------------------------------------------------------------
# Reading


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

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


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
            ok = (dtype in DTYPES and all(isinstance(d, int) and d >= 0 for d in shape)
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
                raise UserError(f"{index} maps tensors to shards that do not hold them: {_listing(absent)}")
            unlisted = [k for k in seen if k not in weight_map]
            if unlisted:
                raise UserError(f"{index} does not list tensors present in the shards: {_listing(unlisted)}")

    def tensors(self) -> Iterator[TensorRef]:
        """Every tensor, shard by shard, in file order (sequential reads)."""
        for refs in self.shards:
            yield from refs

    @property
    def nbytes(self) -> int:
        return sum(r.nbytes for r in self.tensors())


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
    return buf.view(DTYPES[ref.dtype]).reshape(shape)


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
    out_dtype = DTYPES[dtype]

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


# ---------------------------------------------------------------------------------------------------------------
# Writing


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


# ---------------------------------------------------------------------------------------------------------------
# LLaVA-OneVision key layouts

# Checkpoint/adapter key -> canonical (transformers' in-memory) name. Old transformers (< 4.52) and what 5.x writes:
# language_model.model.*, language_model.lm_head.*, vision_tower.(vision_model.)*, multi_modal_projector.*,
# image_newline; newer in-memory names (model.language_model.*, ...) map to themselves. SigLIP's `vision_model.`
# level is gone in transformers 5 (it loads older checkpoints by dropping it).
_TO_CANONICAL = [
    (re.compile(r"^language_model\.model\."), "model.language_model."),
    (re.compile(r"^language_model\.lm_head\."), "lm_head."),
    (re.compile(r"^model\.language_model\."), "model.language_model."),
    (re.compile(r"^lm_head\."), "lm_head."),
    (re.compile(r"^(?:model\.)?vision_tower\.(?:vision_model\.)?"), "model.vision_tower."),
    (re.compile(r"^(?:model\.)?multi_modal_projector\."), "model.multi_modal_projector."),
    (re.compile(r"^(?:model\.)?image_newline$"), "model.image_newline"),
]
# Canonical name -> the key the llava-hf hub checkpoints hold (transformers' conversion writes them; transformers
# 5.x loads them and re-saves a model loaded from them under the same names).
_TO_SAVED = [
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
    ("model.vision_tower.", "vision_tower.vision_model."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("model.image_newline", "image_newline"),
]


def hf_canonical(key: str) -> str | None:
    """Canonical name of a LLaVA-OneVision checkpoint key in any transformers layout; None if it is not one."""
    for pattern, repl in _TO_CANONICAL:
        if pattern.match(key):
            return pattern.sub(repl, key, count=1)
    return None


def hf_saved_name(canonical: str) -> str:
    """The key transformers writes for a canonical name (the layout `from_pretrained` loads as is)."""
    for prefix, repl in _TO_SAVED:
        if canonical.startswith(prefix):
            return repl + canonical[len(prefix):]
    raise KeyError(canonical)


def canonical_tensors(ckpt: Checkpoint, what: str = "checkpoint") -> dict[str, TensorRef]:
    """Canonical name -> TensorRef for every tensor of a LLaVA-OneVision checkpoint, in file order; keys of no
    known layout (or two keys naming the same tensor) are an error that lists them."""
    out: dict[str, TensorRef] = {}
    unknown, dup = [], []
    for ref in ckpt.tensors():
        name = hf_canonical(ref.name)
        if name is None:
            unknown.append(ref.name)
        elif name in out:
            dup.append(f"{out[name].name} / {ref.name}")
        else:
            out[name] = ref
    if unknown:
        raise UserError(f"{ckpt.folder}: {len(unknown)} tensor(s) are not in a LLaVA-OneVision (transformers) "
                        f"layout: {_listing(unknown)}. An original LLaVA-NeXT checkpoint needs `lora-manip convert "
                        f"SRC OUT --from llava-next --to hf` first")
    if dup:
        raise UserError(f"{ckpt.folder}: {what} holds the same tensor under two names: {_listing(dup)}")
    return out


# ---------------------------------------------------------------------------------------------------------------
# Small helpers


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


def dtype_code(name: str | torch.dtype | None) -> str | None:
    """bf16 / bfloat16 / torch.bfloat16 -> 'BF16' (None stays None)."""
    if name is None:
        return None
    if isinstance(name, torch.dtype):
        return DTYPE_CODES[name]
    key = str(name).lower().replace("torch.", "")
    table = {"bf16": "BF16", "bfloat16": "BF16", "fp16": "F16", "float16": "F16", "half": "F16",
             "fp32": "F32", "float32": "F32", "float": "F32", "fp64": "F64", "float64": "F64"}
    if key not in table:
        raise UserError(f"unknown dtype {name}")
    return table[key]


CODE_TO_CONFIG_DTYPE = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64"}


def _listing(items: list[str], limit: int = 20) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


listing = _listing


def copy_files(src: Path, dst: Path, names: Iterable[str]) -> list[str]:
    """Copy the named files that exist in `src` to `dst` (bytes as they are); returns those copied. Processor files
    go through model.processor.copy_processor_files, the one list of them."""
    import shutil

    done = []
    for name in names:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
            done.append(name)
    return done


def read_json(path: Path) -> dict:
    """A JSON object from `path`; anything else (missing, a folder, not JSON, a list) is a UserError naming it."""
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path} does not exist") from None
    except ValueError as e:  # UnicodeDecodeError included
        raise UserError(f"{path} is not valid JSON: {e}") from None
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path}: expected a JSON object ({{...}}), got a {type(obj).__name__}")
    return obj
