"""Output safety and small file helpers: atomic writes, one owner per output folder, no output over an input,
no leftovers.

- Files and folders are written to a temporary name beside the target and renamed into place, so nothing a user
  wrote is overwritten half-way and nothing half-written is left under the real name. They get the mode an
  ordinary file would get under the umask (mkstemp/mkdtemp would leave 0600/0700).
- `output_lock` gives an output folder one owner at a time: a lock file beside it (`.NAME.lock`) holding the
  owner's pid and host, kept under an flock for the owner's lifetime. The kernel drops the flock when the owner
  dies (kill -9 included), so a lock whose flock can be taken is stale: it is taken over with a warning.
- `guard_output` compares resolved paths (symlinks followed), so no command writes into or over its inputs;
  `check_output` adds the rules for a folder a command writes whole (no existing folder without --force, never a
  file) and is the guard `atomic_dir` and `owned_output` (merge, convert) share.
- Temporary folders are named `.NAME.XXXXXXXX.partial`; a run killed mid-write leaves one, and the next command
  that locks NAME removes it (`cleanup_partials`), with a message.
- `read_json` / `copy_files`: a config read with one-line errors naming the file; files copied byte for byte.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import logging
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

from .errors import UserError

log = logging.getLogger(__name__)

_HELD_ENV = "LORA_MANIP_LOCKS_HELD"  # lock files this process tree owns (torchrun children inherit them)
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


# ------------------------------------------------------------------------------------------------- modes


def current_umask() -> int:
    try:  # thread-safe where /proc exists; os.umask would briefly change it for every thread
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def normal_mode(path: Path, folder: bool) -> None:
    path.chmod((0o777 if folder else 0o666) & ~current_umask())


# ------------------------------------------------------------------------------------------------ reading


def read_json(path: str | os.PathLike) -> dict:
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


def copy_files(src: Path, dst: Path, names: Iterable[str]) -> list[str]:
    """Copy the named files that exist in `src` to `dst` (bytes as they are); returns those copied. Processor files
    go through data.processor.copy_processor_files, the one list of them."""
    done = []
    for name in names:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
            done.append(name)
    return done


# ---------------------------------------------------------------------------------------------- disk full


def is_disk_full(e: BaseException) -> bool:
    if isinstance(e, OSError) and e.errno in _DISK_FULL:
        return True
    text = str(e)  # safetensors and torch wrap the OSError in their own errors
    return any(s in text for s in ("No space left", "StorageFull", "os error 28", "code: 28", "Disk quota"))


def disk_full_error(e: BaseException, target: str | os.PathLike) -> UserError:
    return UserError(f"{target}: the disk is full (or over quota) while writing ({str(e).splitlines()[0]}); "
                     "nothing partial was kept; free space and run the command again")


@contextlib.contextmanager
def disk_errors(target: str | os.PathLike) -> Iterator[None]:
    """A full disk becomes a one-line UserError naming the output; other errors pass through."""
    try:
        yield
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - re-raised unless it is a full disk
        if is_disk_full(e):
            raise disk_full_error(e, target) from None
        raise


# ------------------------------------------------------------------------------------------ atomic writes


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to a temporary file beside `path`, then rename it over `path` (atomic on POSIX)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        normal_mode(Path(tmp), folder=False)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if is_disk_full(e):
            raise disk_full_error(e, path) from None
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def partial_dir(out: Path, tag: str = "") -> Path:
    """A fresh temporary folder beside `out`, named so that `cleanup_partials(out)` recognises it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.{tag}", suffix=".partial", dir=out.parent))
    normal_mode(tmp, folder=True)
    return tmp


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `out`; on success it replaces `out`, on failure it is removed.

    An existing `out` is an error unless `force`; with `force` the old folder is removed only after the new one
    is complete, so a crash never leaves the user with neither. A full disk is a one-line UserError.
    """
    out = Path(out)
    check_output(out, force)
    tmp = partial_dir(out)
    try:
        with disk_errors(out):
            yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = partial_dir(out, "old-")
        os.replace(out, old / out.name)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


# ---------------------------------------------------------------------------------------- partial folders


def _partial_pattern(name: str) -> re.Pattern:
    # mkdtemp's random part is 8 characters of [a-z0-9_]: `.run.foo.XXXXXXXX.partial` (of output `run.foo`) is
    # not taken for a leftover of output `run`.
    return re.compile(rf"^\.{re.escape(name)}\.(old-|aside-)?[a-z0-9_]{{8}}\.partial$")


def cleanup_partials(out: str | os.PathLike) -> list[Path]:
    """Remove the temporary folders an interrupted command left beside `out`. Call it holding out's lock."""
    out = Path(out)
    if not out.parent.is_dir():
        return []
    pattern = _partial_pattern(out.name)
    removed = []
    for p in sorted(out.parent.iterdir()):
        if pattern.match(p.name) and p.is_dir() and not p.is_symlink():
            log.warning("removing %s, left by an interrupted command writing %s", p, out)
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def move_aside(out: str | os.PathLike) -> None:
    """Take an existing output folder out of the way in one rename, then delete it. A kill during the delete
    leaves a `.partial` folder that the next command on `out` removes; never a mix of old and new files."""
    out = Path(out)
    aside = partial_dir(out, "aside-")
    os.replace(out, aside / out.name)
    log.warning("--overwrite: removed the previous contents of %s", out)
    shutil.rmtree(aside, ignore_errors=True)


# ------------------------------------------------------------------------------------------------- guard


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def guard_output(out: str | os.PathLike, inputs: dict[str, str | os.PathLike | None], flag: str = "--out",
                 may_nest_in: tuple[str, ...] = ()) -> None:
    """Refuse an output that is, lies inside, or contains one of the named inputs (paths resolved, symlinks
    followed). `may_nest_in`: inputs the output may lie inside (a data root), though never equal or contain."""
    o = Path(out).expanduser().resolve()
    for what, p in inputs.items():
        if p is None:
            continue
        r = Path(p).expanduser().resolve()
        if o == r or _inside(r, o):
            raise UserError(f"{flag} {out} would write into (or replace) the {what} {p}; choose another folder")
        if what not in may_nest_in and r.is_dir() and _inside(o, r):
            raise UserError(f"{flag} {out} would write into the {what} {p} (it lies inside it); choose a folder "
                            "outside it")


def check_output(out: str | os.PathLike, force: bool = False, inputs: dict[str, str | os.PathLike | None] | None = None,
                 flag: str = "--out") -> None:
    """The one guard of a folder a command writes whole: never over or inside one of its `inputs`, never over a
    file, and never over an existing folder unless `force`."""
    if inputs:
        guard_output(out, inputs, flag)
    out = Path(out)
    if out.exists() and not force:
        raise UserError(f"{out} already exists; pass --force to replace it or choose another output folder")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file, not a folder; choose another output folder")


@contextlib.contextmanager
def owned_output(out: str | os.PathLike, command: str, inputs: dict[str, str | os.PathLike | None],
                 force: bool = False, flag: str = "--out") -> Iterator[None]:
    """check_output, then own `out` (output_lock) with the leftovers of an interrupted run removed; write it with
    atomic_dir inside."""
    check_output(out, force, inputs, flag)
    with output_lock(out, command):
        cleanup_partials(out)
        yield


# -------------------------------------------------------------------------------------------------- locks


def lock_path(out: str | os.PathLike) -> Path:
    out = Path(out).expanduser().absolute()
    return out.parent / f".{out.name}.lock"


def _describe(holder: dict) -> str:
    return (f"`{holder.get('command', '?')}` (pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, "
            f"since {holder.get('started', '?')})")


@contextlib.contextmanager
def output_lock(out: str | os.PathLike, command: str) -> Iterator[None]:
    """Own the output folder `out` for the duration; UserError naming the holder when another process owns it.
    Nested use (a torchrun child of the owner, the same process twice) is a no-op."""
    path = lock_path(out)
    held = [p for p in os.environ.get(_HELD_ENV, "").split(os.pathsep) if p]
    if str(path) in held:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise
            holder = _read_holder(fd)
            os.close(fd)
            raise UserError(f"{out} is in use by {_describe(holder)}; wait for it to finish or choose another "
                            f"output folder (lock file {path})") from None
        # The file may have been unlinked by a finishing owner between open and flock: lock what the name points to.
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    stale = _read_holder(fd)
    if stale:
        log.warning("%s: taking over the lock left by %s, which is no longer running", out, _describe(stale))
    me = {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
          "started": datetime.datetime.now().isoformat(timespec="seconds")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
    os.environ[_HELD_ENV] = os.pathsep.join(held + [str(path)])
    try:
        yield
    finally:
        os.environ[_HELD_ENV] = os.pathsep.join(held)
        if not held:
            os.environ.pop(_HELD_ENV, None)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # unlinked while still locked: a waiter re-checks the inode (above)
        os.close(fd)


def _read_holder(fd: int) -> dict:
    try:
        data = os.pread(fd, 4096, 0)
        holder = json.loads(data) if data.strip() else {}
        return holder if isinstance(holder, dict) else {"command": "an unknown command"}
    except (OSError, ValueError):
        return {"pid": "?", "host": "?", "command": "an unknown command"}
