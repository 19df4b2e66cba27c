"""Ownership, in one place: which path an output is (resolved once), whose a folder or file is (the marker, the
sidecar), what may never be touched (inputs, folders the kit did not make), and what a command made (Claim), so
that a failure can take it back. The package docstring (outputs/__init__.py) states the rules."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import shutil
import socket
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from ..errors import UserError
from ..fsutil import (KIT, atomic_write_bytes, atomic_write_json, create_exclusive, make_parents, remove_empty,
                      write_error)

MARKER = ".lora-manip.json"
RESULTS = "results"  # eval and score write the same kind of folder
KINDS = {"train": "a training run", "merge": "a merged checkpoint", "convert": "a converted checkpoint",
         "tiny-model": "a tiny model", "synth": "a synthetic data set", RESULTS: "evaluation results",
         "cache": "a cache"}

# ------------------------------------------------------------------------------------------ paths, markers


def resolve(path: str | os.PathLike) -> Path:
    """The one path an output is written at: `~` expanded, made absolute, symbolic links followed."""
    try:
        return Path(os.path.expanduser(os.fspath(path))).resolve()
    except (OSError, RuntimeError) as e:  # a loop of links
        raise UserError(f"{path}: cannot be resolved ({e})") from None


def read_marker(folder: Path) -> dict | None:
    """The folder's own marker; None when there is none, it is a link, or it is not the kit's."""
    try:
        fd = os.open(Path(folder) / MARKER, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        info = json.loads(os.read(fd, 1 << 16))
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)
    ok = isinstance(info, dict) and info.get("kit") == KIT and info.get("kind") in KINDS and info.get("id")
    return info if ok else None


def kind_of(folder: Path) -> str | None:
    info = read_marker(folder)
    return info["kind"] if info else None


def write_marker(folder: Path, kind: str) -> None:
    info = {"kit": KIT, "kind": kind, "id": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid(),
            "created": datetime.datetime.now().isoformat(timespec="seconds")}
    try:
        create_exclusive(Path(folder) / MARKER, (json.dumps(info, indent=1) + "\n").encode())
    except FileExistsError:
        raise UserError(f"{Path(folder) / MARKER} is in the way (a link, or a file lora-manip did not write); it is "
                        "left as it is: remove it or choose another folder") from None


def contents(folder: Path) -> list[str]:
    """What a folder holds besides its marker ([] for one that does not exist)."""
    try:
        return sorted(n for n in os.listdir(folder) if n != MARKER)
    except (FileNotFoundError, NotADirectoryError):
        return []
    except OSError as e:
        raise UserError(f"cannot read the folder {folder} ({e.strerror})") from None


def listing(names: list[str], n: int = 4) -> str:
    more = f" and {len(names) - n} more" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def _what(kind: str) -> str:
    return KINDS.get(kind, kind)


def shown(given, resolved: Path) -> str:
    """A path as the user gave it, with where it really leads when that differs (a link, `~`, a relative path)."""
    return str(given) if str(given) == str(resolved) else f"{given} ({resolved})"


# -------------------------------------------------------------------------------------------------- guards


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def guard_inputs(out: str | os.PathLike, inputs: dict[str, str | os.PathLike | None], flag: str = "--out",
                 may_nest_in: tuple[str, ...] = ()) -> None:
    """Refuse an output that is, lies inside, or contains one of the named inputs (paths resolved). `may_nest_in`:
    inputs the output may lie inside (a data root), though never equal or contain."""
    o = resolve(out)
    for what, p in inputs.items():
        if p is None:
            continue
        r = resolve(p)
        if o == r or _inside(r, o):
            raise UserError(f"{flag} {out} would write into (or replace) the {what} {p}; choose another folder")
        if what not in may_nest_in and r.is_dir() and _inside(o, r):
            raise UserError(f"{flag} {out} would write into the {what} {p} (it lies inside it); choose a folder "
                            "outside it")


def check_owned(o: Path, kind: str, flag: str, shown=None, accept: Iterable[str] = (), inside: bool = False) -> None:
    """A folder with anything in it must carry the marker of `kind` (or of an `accept`ed kind); with `inside`,
    its parent's marker covers it (a folder the kit writes inside its own)."""
    names = contents(o)
    if not names:
        return
    k = kind_of(o) or (kind_of(o.parent) if inside else None)
    shown = shown if shown is not None else o
    if k is None:
        raise UserError(f"{flag} {shown} already exists and lora-manip did not make it (it holds {listing(names)}); "
                        "it is never written into, replaced or deleted, whatever the flag: choose a new or empty "
                        "folder")
    if k != kind and k not in accept:
        raise UserError(f"{flag} {shown} holds {_what(k)} (made by lora-manip), not {_what(kind)}; choose another "
                        "folder")


def check_folder(out: str | os.PathLike, kind: str, *, flag: str = "--out",
                 inputs: dict[str, str | os.PathLike | None] | None = None, may_nest_in: tuple[str, ...] = (),
                 accept: Iterable[str] = (), name: str | None = None) -> Path:
    """The resolved output folder, after every refusal that needs no lock: an input, a file, a folder the kit did
    not make or of another kind. `name`: how messages show it (default: as given, and where it leads)."""
    o = resolve(out)
    name = name or shown(out, o)
    if inputs:
        guard_inputs(o, inputs, flag, may_nest_in)
    if os.path.lexists(o) and not o.is_dir():
        raise UserError(f"{flag} {name} is a file, not a folder; choose another output folder")
    check_owned(o, kind, flag, name, accept)
    return o


def check_replace(out: str | os.PathLike, kind: str, force: bool, flag: str = "--out",
                  inputs: dict[str, str | os.PathLike | None] | None = None) -> Path:
    """check_folder for an output written whole (merge, convert, tiny-model): an existing one only with --force."""
    o = check_folder(out, kind, flag=flag, inputs=inputs)
    if o.exists() and not force:
        raise UserError(f"{out} already exists; pass --force to replace it or choose another output folder")
    return o


# ------------------------------------------------------------------------------------------ claiming folders


@dataclass
class Claim:
    """What a command made of its output folder, so that a failure can take it back."""
    path: Path
    created: bool = False  # the folder did not exist
    adopted: bool = False  # it existed, empty: the marker is this command's
    parents: list[Path] = field(default_factory=list)

    @property
    def new(self) -> bool:
        return self.created or self.adopted

    def undo(self) -> None:
        """Remove the folder this command created, or everything in the empty folder it adopted."""
        if self.created:
            shutil.rmtree(self.path, ignore_errors=True)
        elif self.adopted and self.path.is_dir():
            for p in self.path.iterdir():
                remove_path(p)
        remove_empty(self.parents)


def remove_path(p: Path) -> None:
    """Delete a file, a link (never what it points to) or a folder tree."""
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def claim_folder(out: Path, kind: str) -> Claim:
    """Make `out` (resolved, checked) the kit's: create it, or adopt it when it is empty, with the marker."""
    out = Path(out)
    parents = make_parents(out.parent)
    claim = Claim(out, parents=parents)
    try:
        out.mkdir()
        claim.created = True
    except FileExistsError:
        pass
    except OSError as e:
        remove_empty(parents)
        raise write_error(e, out) or e from None
    info = read_marker(out)
    if info is not None and (info["kind"] == kind or contents(out)):
        return claim
    try:
        if contents(out):
            check_owned(out, kind, "output folder")  # filled since it was checked: refused the same way
        if info is None:
            write_marker(out, kind)
        else:  # an empty kit folder of another kind becomes this kind's
            atomic_write_json(out / MARKER, {**info, "kind": kind}, indent=1)
    except BaseException:
        claim.undo()
        raise
    claim.adopted = not claim.created
    return claim


# ------------------------------------------------------------------------------------------------ one file


def _sidecar(path: Path) -> Path:
    return path.parent / f".{path.name}{MARKER}"


def wrote_file(path: Path) -> bool:
    """The kit wrote `path` (resolved) and it has not changed since: its sidecar says so."""
    try:
        fd = os.open(_sidecar(path), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            info = json.loads(os.read(fd, 1 << 16))
        finally:
            os.close(fd)
        st = os.stat(path, follow_symlinks=False)
    except (OSError, ValueError):
        return False
    return isinstance(info, dict) and info.get("kit") == KIT and \
        [info.get("size"), info.get("mtime_ns"), info.get("ino")] == [st.st_size, st.st_mtime_ns, st.st_ino]


def check_file(dst: str | os.PathLike, force: bool, *, flag: str,
               inputs: dict[str, str | os.PathLike | None] | None = None) -> Path:
    """The resolved path of a one-file output (data normalize, predict --draw): never an input, never a folder,
    and an existing file is replaced only with `force` and only when the kit wrote it."""
    d = resolve(dst)
    name = shown(dst, d)
    for what, p in (inputs or {}).items():
        if p is not None and d == resolve(p):
            raise UserError(f"{flag} {name} is the {what}; choose another file (the input is never modified)")
    if d.is_dir():
        raise UserError(f"{flag} {name} is a folder; give the file to write")
    if os.path.lexists(d):
        if not wrote_file(d):
            raise UserError(f"{flag} {name} already exists and lora-manip did not write it (or it changed since); "
                            "it is never replaced, whatever the flag: choose another file or move it away")
        if not force:
            raise UserError(f"{flag} {name} already exists; pass --force to replace it, or choose another file")
    return d


def write_file(dst: Path, data: bytes, kind: str) -> None:
    """Write a one-file output atomically (dst resolved and checked by check_file), then its sidecar."""
    made = make_parents(dst.parent)
    try:
        atomic_write_bytes(dst, data)
    except BaseException:
        remove_empty(made)
        raise
    try:
        st = os.stat(dst, follow_symlinks=False)
        atomic_write_json(_sidecar(dst), {"kit": KIT, "kind": kind, "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                                          "ino": st.st_ino}, indent=None)
    except BaseException:  # a file the kit cannot later prove it wrote is not left behind
        dst.unlink(missing_ok=True)
        remove_empty(made)
        raise


def write_cache_file(path: str | os.PathLike, data: bytes, suffix: str = ".npz") -> None:
    """A cache entry, written atomically (a link at its name is replaced, never followed) into a cache folder of
    the kit's: one it made, found empty, or holding nothing but `suffix` entries (a cache of a kit version before
    markers, adopted). Anything else is refused like any folder the kit did not make."""
    folder = resolve(Path(path).parent)
    names = contents(folder)
    if names and kind_of(folder) is None and all(n.endswith(suffix) for n in names):
        write_marker(folder, "cache")
    check_owned(folder, "cache", "cache folder")
    claim_folder(folder, "cache")
    atomic_write_bytes(folder / Path(path).name, data)
