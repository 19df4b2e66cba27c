"""Folders written whole or in place, built on guard.py's ownership: temporary `.partial` folders and their
cleanup, moving an old run aside, atomic folders, and the locked output folders of merge / convert and of eval /
score."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

from ..errors import UserError
from ..fsutil import disk_errors, finish_tree, is_disk_full, make_parents, normal_mode, output_lock, remove_empty, \
    write_error
from .guard import (RESULTS, contents, _inside, check_owned, check_replace, claim_folder, kind_of, read_marker,
                    resolve, shown, write_marker, _what)

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------- partial folders


def _partial_pattern(name: str) -> re.Pattern:
    # mkdtemp's random part is 8 characters of [a-z0-9_]: `.run.foo.XXXXXXXX.partial` (of output `run.foo`) is
    # not taken for a leftover of output `run`.
    return re.compile(rf"^\.{re.escape(name)}\.(old-|aside-)?[a-z0-9_]{{8}}\.partial$")


def partial_dir(out: Path, tag: str = "", kind: str | None = None) -> Path:
    """A fresh temporary folder beside `out`, named so that `cleanup_partials(out)` recognises it, with the marker
    of `kind` (it becomes the output's marker when the folder is renamed into place)."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.{tag}", suffix=".partial", dir=out.parent))
    try:
        normal_mode(tmp, folder=True)
        if kind is not None and kind_of(out.parent) != kind:  # inside a folder of its own kind, that one's covers it
            write_marker(tmp, kind)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp


def cleanup_partials(out: str | os.PathLike) -> list[Path]:
    """Remove the temporary folders an interrupted command left beside `out`: those the kit marked (or that lie
    in a kit folder, or are empty), never a link. Call it holding out's lock."""
    out = Path(out)
    if not out.parent.is_dir():
        return []
    pattern, parent_owned = _partial_pattern(out.name), kind_of(out.parent) is not None
    removed = []
    for p in sorted(out.parent.iterdir()):
        if not pattern.match(p.name) or p.is_symlink() or not p.is_dir():
            continue
        if parent_owned or read_marker(p) is not None or not any(p.iterdir()):
            log.warning("removing %s, left by an interrupted command writing %s", p, out)
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def holds_cwd(folder: Path) -> bool:
    try:
        return _inside(Path.cwd().resolve(), folder)
    except OSError:
        return False


def move_aside(out: Path, kind: str, flag: str = "--out") -> None:
    """Take the kit's output folder `out` (resolved) out of the way in one rename, then delete it. A kill during the
    delete leaves a `.partial` folder that the next command on `out` removes; never a mix of old and new files."""
    if kind_of(out) != kind:
        check_owned(out, kind, flag)  # a folder without the marker is never moved, whatever the flag
        raise UserError(f"{flag} {out}: no {_what(kind)} to replace")
    if holds_cwd(out):
        raise UserError(f"{flag} {out} is (or holds) the working folder: replacing it would delete the folder you "
                        "are in; cd elsewhere, or choose another folder")
    with disk_errors(out):
        aside = partial_dir(out, "aside-", kind)
        os.replace(out, aside / out.name)
    shutil.rmtree(aside, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike, force: bool = False, kind: str = "", flag: str = "--out") -> Iterator[Path]:
    """Yield a temporary folder beside `out`; on success it replaces `out`, on failure it is removed.

    An existing `out` is refused unless `force` and it is the kit's `kind` of output (its marker, or its parent's
    for a folder written inside one); with `force` the old folder is removed only after the new one is complete,
    so a crash never leaves neither. Files get the umask's mode and are on disk before the rename. A full disk or
    a read-only folder is a one-line UserError.
    """
    out = resolve(out)
    if os.path.lexists(out) and not out.is_dir():
        raise UserError(f"{flag} {out} is a file, not a folder; choose another output folder")
    check_owned(out, kind, flag, inside=True)
    if os.path.lexists(out) and not force:
        raise UserError(f"{out} already exists; pass --force to replace it or choose another output folder")
    with disk_errors(out):
        made = make_parents(out.parent)
        try:
            tmp = partial_dir(out, kind=kind)
        except BaseException:
            remove_empty(made)
            raise
    try:
        with disk_errors(out):
            yield tmp
            finish_tree(tmp)
            if os.path.lexists(out):
                old = partial_dir(out, "old-", kind)
                os.replace(out, old / out.name)
                try:
                    os.replace(tmp, out)
                except BaseException:  # the old folder goes back: never neither
                    os.replace(old / out.name, out)
                    shutil.rmtree(old, ignore_errors=True)
                    raise
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        remove_empty(made)
        raise


@contextlib.contextmanager
def owned_output(out: str | os.PathLike, command: str, kind: str, inputs: dict[str, str | os.PathLike | None],
                 force: bool = False, flag: str = "--out") -> Iterator[Path]:
    """check_replace, then own `out` (output_lock) with the leftovers of an interrupted run removed; yields the
    resolved path, to be written with atomic_dir inside."""
    o = check_replace(out, kind, force, flag, inputs)
    with output_lock(o, command):
        cleanup_partials(o)
        yield o


# ------------------------------------------------------------------------------------- results (eval, score)


def _same_file(a: Path, b: str | os.PathLike) -> bool:
    try:
        return a.resolve() == resolve(b)
    except (OSError, UserError):
        return False


def check_results(out: str | os.PathLike, names: Iterable[str] = (), force: bool = True, *, flag: str = "--out",
                  folders: dict[str, str | os.PathLike | None] | None = None,
                  files: Iterable[str | os.PathLike] = ()) -> Path:
    """The resolved results folder of eval / score: never a file, never one of the input `folders` (the model),
    none of `names` in it an input file (ever) or earlier results (unless `force`) or a link, and a folder
    lora-manip made for results (or a new or empty one)."""
    o = resolve(out)
    label = shown(out, o)
    if os.path.lexists(o) and not o.is_dir():
        raise UserError(f"{flag} {label} is a file, not a folder; choose a folder for the results")
    for what, p in (folders or {}).items():
        if p is not None and Path(p).exists() and o == resolve(p):
            raise UserError(f"{flag} {label} is the {what} {p}; its results would change the folder they "
                            "describe: choose another folder")
    files = list(files)
    for name in names:
        if any(_same_file(o / name, src) for src in files):
            raise UserError(f"{o / name} is an input of this run; choose another --out (it is never overwritten)")
    check_owned(o, RESULTS, flag, label)
    for name in names:
        target = o / name
        if target.is_symlink():
            raise UserError(f"{target} is a symbolic link; results are never written through one: remove it or "
                            "choose another --out")
        if target.exists() and not force:
            raise UserError(f"{target} already exists; choose another --out or pass --force to replace it")
    return o


def _remove_leftover_tmp_files(folder: Path, names: Iterable[str]) -> None:
    # atomic_write_* leaves `.NAME.XXXXXXXX.tmp` behind only when killed between write and rename
    for name in names:
        pattern = re.compile(rf"^\.{re.escape(name)}\.[a-z0-9_]{{8}}\.tmp$")
        for p in folder.iterdir() if folder.is_dir() else ():
            if pattern.match(p.name) and p.is_file() and not p.is_symlink():
                log.warning("removing %s, left by an interrupted command writing %s", p, folder / name)
                p.unlink(missing_ok=True)


@contextlib.contextmanager
def results_folder(out: str | os.PathLike, command: str, names: tuple[str, ...], subfolders: tuple[str, ...] = (),
                   on_full_disk: str | None = None, keep: tuple[str, ...] = ()) -> Iterator[Path]:
    """Own the results folder `out` while results are written into it (yields its resolved path): created or
    adopted with the marker, leftovers of a killed run removed, a full disk or a read-only folder one line. A
    failure takes back the folder this command made, unless one of `keep` holds something (answers an
    `eval --resume` continues from); `on_full_disk`: what the user can do then."""
    o = resolve(out)
    with output_lock(o, command):
        check_results(o, names)
        claim = claim_folder(o, RESULTS)
        try:
            for sub in subfolders:
                cleanup_partials(o / sub)
            _remove_leftover_tmp_files(o, names)
            yield o
        except BaseException as e:
            kept = any((o / k).is_file() and (o / k).stat().st_size for k in keep)
            if claim.new and not kept:
                claim.undo()
            if isinstance(e, UserError) or not isinstance(e, Exception):
                raise
            if kept and on_full_disk and is_disk_full(e):
                raise UserError(f"{o}: the disk is full (or over quota) while writing ({str(e).splitlines()[0]}); "
                                f"{on_full_disk}") from None
            raise write_error(e, o) or e from None


