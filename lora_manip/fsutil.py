"""Small file primitives every writer shares: atomic files, exclusive creation that never goes through a link,
modes that follow the umask, one-line errors for a full disk or a read-only folder, and the output lock.

- Files are written to a temporary name beside the target and renamed into place, so nothing a user wrote is
  overwritten half-way and nothing half-written is left under the real name. They get the mode an ordinary file
  would get under the umask (mkstemp/mkdtemp, and safetensors, would leave 0600/0700).
- `create_exclusive` makes a file that must not exist yet (markers, launch files): complete under a temporary name,
  then hard-linked to its name, so it never opens a file someone else put there, nor follows a link planted at its
  name, and no reader sees it half-written.
- `output_lock` gives an output one owner at a time: a lock file beside it (`.NAME.lock`) holding the owner's pid
  and host, kept under an flock for the owner's lifetime. The kernel drops the flock when the owner dies (kill -9
  included), so a lock whose flock can be taken is stale: it is taken over with a warning, but only when it is a
  lock file this kit wrote (a regular file with one link whose content is a kit lock): never a link, never a user's
  file. Nesting in one process is a no-op; nothing in the environment can make a process skip it.
- The ownership rules built on these (markers, guards, atomic folders) are in outputs/.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import logging
import os
import shutil
import socket
import stat
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

from .errors import UserError

log = logging.getLogger(__name__)

KIT = "lora-manip"  # written into every marker and lock, so a file of the same name from elsewhere is never taken
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_NO_WRITE = (errno.EROFS, errno.EACCES, errno.EPERM)
_HELD: set[str] = set()  # lock files this process holds (nested use is a no-op)


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


def finish_tree(folder: str | os.PathLike) -> None:
    """Before a folder is published: every file and folder under it gets the umask's mode (safetensors writes
    0600) and every file is on disk (fsync), so a rename that makes it visible never publishes empty files."""
    mask = current_umask()
    for root, dirs, files in os.walk(folder):
        for d in dirs:
            p = os.path.join(root, d)
            if not os.path.islink(p):
                os.chmod(p, 0o777 & ~mask)
        for f in files:
            p = os.path.join(root, f)
            if os.path.islink(p):
                continue
            os.chmod(p, 0o666 & ~mask)
            fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


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


# ------------------------------------------------------------------------------------- full or read-only disks


def is_disk_full(e: BaseException) -> bool:
    if isinstance(e, OSError) and e.errno in _DISK_FULL:
        return True
    text = str(e)  # safetensors and torch wrap the OSError in their own errors
    return any(s in text for s in ("No space left", "StorageFull", "os error 28", "code: 28", "Disk quota"))


def disk_full_error(e: BaseException, target: str | os.PathLike) -> UserError:
    return UserError(f"{target}: the disk is full (or over quota) while writing ({str(e).splitlines()[0]}); "
                     "nothing partial was kept; free space and run the command again")


def write_error(e: BaseException, target: str | os.PathLike) -> UserError | None:
    """The one-line error for a write that failed for a reason the user fixes (full disk, read-only or
    permission-denied folder); None for anything else."""
    if is_disk_full(e):
        return disk_full_error(e, target)
    if isinstance(e, OSError) and e.errno in _NO_WRITE:
        where = e.filename or target
        return UserError(f"cannot write {where} ({e.strerror}); nothing was written to {target}: choose a "
                         "folder you can write to")
    return None


@contextlib.contextmanager
def disk_errors(target: str | os.PathLike) -> Iterator[None]:
    """A full disk or a folder that cannot be written becomes a one-line UserError naming the output; other
    errors pass through."""
    try:
        yield
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - re-raised unless the user can fix it
        err = write_error(e, target)
        if err is not None:
            raise err from None
        raise


# ------------------------------------------------------------------------------------------ atomic writes


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to a temporary file beside `path`, then rename it over `path` (atomic on POSIX; a link at
    `path` is replaced, never written through)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a read-only folder
        raise write_error(e, path) or e from None
    with _complete_beside(path, data) as tmp:
        os.replace(tmp, path)


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def create_exclusive(path: str | os.PathLike, data: bytes) -> None:
    """Create `path` holding `data`; refused (FileExistsError) when anything, a link included, is there already.
    The name appears only once the content is complete (written to a temporary file beside it, then hard-linked to
    the name, which fails when the name exists): a reader racing the creator (eight ranks claiming one cache folder)
    never sees an empty file. Where the file system has no hard links, O_CREAT|O_EXCL|O_NOFOLLOW at the name.
    Nothing is left behind when the write fails."""
    path = Path(path)
    with _complete_beside(path, data) as tmp:
        try:
            os.link(tmp, path)  # EEXIST for anything at the name, a dangling link included
            return
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                raise
        _create_in_place(path, data)  # no hard links here (some FUSE / SMB mounts)


@contextlib.contextmanager
def _complete_beside(path: Path, data: bytes) -> Iterator[str]:
    """A temporary file beside `path` holding all of `data`, synced, with the umask's mode, for the block to put in
    place; removed afterwards (a rename leaves nothing to remove). A full disk or a read-only folder, in the block
    too, is one line naming `path`; FileExistsError passes as it is."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise write_error(e, path) or e from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        normal_mode(Path(tmp), folder=False)
        yield tmp
    except FileExistsError:
        raise
    except BaseException as e:
        err = write_error(e, path)
        if err is not None:
            raise err from None
        raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _create_in_place(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    try:
        os.write(fd, data)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        raise
    os.close(fd)


def make_parents(folder: Path) -> list[Path]:
    """mkdir -p `folder`; returns the folders it created, deepest last, so a command that fails can remove them."""
    missing = []
    p = folder
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    made = []
    for p in reversed(missing):
        try:
            p.mkdir()
            made.append(p)
        except FileExistsError:
            pass
        except OSError as e:
            remove_empty(made)
            raise write_error(e, folder) or e from None
    return made


def remove_empty(folders: list[Path]) -> None:
    """rmdir the folders (deepest first) that are still empty."""
    for p in reversed(folders):
        try:
            p.rmdir()
        except OSError:
            break


# -------------------------------------------------------------------------------------------------- locks


def home_paths(value: Any) -> Any:
    """A command's argument with `~` expanded when it is a path (or a list of paths): the shell leaves `~` in quotes
    and after `--opt=`, and a path must mean the same folder to every reader. Anything else is returned as given."""
    if isinstance(value, Path):
        return Path(os.path.expanduser(value))
    if isinstance(value, list) and value and all(isinstance(v, Path) for v in value):
        return [Path(os.path.expanduser(v)) for v in value]
    return value


def lock_path(out: str | os.PathLike) -> Path:
    out = Path(out).expanduser().absolute()
    return out.parent / f".{out.name}.lock"


def _describe(holder: dict) -> str:
    return (f"`{holder.get('command', '?')}` (pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, "
            f"since {holder.get('started', '?')})")


@contextlib.contextmanager
def output_lock(out: str | os.PathLike, command: str) -> Iterator[None]:
    """Own the output `out` for the duration; UserError naming the holder when another process owns it. Folders
    it had to create for the lock are removed again when they are still empty at the end."""
    path = lock_path(out)
    if str(path) in _HELD:
        yield
        return
    made = make_parents(path.parent)
    try:
        fd = _acquire(path, out)
        try:
            me = {"kit": KIT, "pid": os.getpid(), "host": socket.gethostname(), "command": command,
                  "started": datetime.datetime.now().isoformat(timespec="seconds")}
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
                os.fsync(fd)
            except OSError as e:  # a full disk: the lock does not stay behind
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                raise write_error(e, out) or e from None
            _HELD.add(str(path))
            try:
                yield
            finally:
                _HELD.discard(str(path))
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)  # unlinked while still locked: a waiter re-checks the inode (_acquire)
        finally:
            os.close(fd)
    finally:
        remove_empty(made)


def _acquire(path: Path, out) -> int:
    """An open, flock'ed descriptor of the lock file at `path`, created here or taken over from a dead owner."""
    while True:
        created = True
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
        except FileExistsError:
            created = False
            try:
                fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
            except FileNotFoundError:
                continue  # its owner finished meanwhile
            except OSError as e:
                if e.errno == errno.ELOOP:
                    raise UserError(f"{path}, the lock file of {out}, is a symbolic link; lora-manip never writes "
                                    "through one: remove it (rm, not the file it points to) and run again") from None
                raise write_error(e, out) or e from None
        except OSError as e:
            raise write_error(e, out) or e from None
        st = os.fstat(fd)
        if not created and (not stat.S_ISREG(st.st_mode) or st.st_nlink != 1):
            os.close(fd)
            raise UserError(f"{path} (the lock file of {out}) is not a lock file lora-manip wrote (a hard link or "
                            "not a regular file); it is left as it is: remove it and run again")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise
            holder = _read_holder(fd) or {}
            os.close(fd)
            raise UserError(f"{out} is in use by {_describe(holder)}; wait for it to finish or choose another "
                            f"output folder (lock file {path})") from None
        try:  # a finishing owner may have unlinked the file between open and flock: lock what the name points to
            same = os.stat(path, follow_symlinks=False).st_ino == st.st_ino
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            continue
        if not created:
            holder = _read_holder(fd)
            if holder is None:
                os.close(fd)
                raise UserError(f"{path} is in the way of {out}'s lock file and is not one lora-manip wrote; it is "
                                "left as it is: move it away and run again")
            if holder:
                log.warning("%s: taking over the lock left by %s, which is no longer running", out, _describe(holder))
        return fd


def _read_holder(fd: int) -> dict | None:
    """The lock's holder; {} for an empty file (its creator has not written yet), None for content that is no
    lock of this kit."""
    try:
        data = os.pread(fd, 4096, 0)
    except OSError:
        return None
    if not data.strip():
        return {}
    try:
        holder = json.loads(data)
    except ValueError:
        return None
    if isinstance(holder, dict) and (holder.get("kit") == KIT or {"pid", "host", "command"} <= holder.keys()):
        return holder  # (the second form: locks of kit versions before the kit field)
    return None
