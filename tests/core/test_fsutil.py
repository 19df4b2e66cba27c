"""The file primitives every writer shares, at the edges a race or a file system brings."""

from __future__ import annotations

import errno
import os

import pytest

from lora_manip import fsutil


def test_an_exclusive_file_appears_only_complete(tmp_path, monkeypatch):
    """Eight ranks claiming one folder: a reader racing the creator must never see the name empty or half-written.
    Every write and fsync of the creator happens while the name does not exist yet."""
    target = tmp_path / ".marker"
    seen = []
    real_fsync = os.fsync

    def fsync(fd):
        seen.append(os.path.lexists(target))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    fsutil.create_exclusive(target, b'{"kit": "lora-manip"}\n')
    assert seen and not any(seen)
    assert target.read_bytes() == b'{"kit": "lora-manip"}\n' and os.stat(target).st_nlink == 1
    assert [p.name for p in tmp_path.iterdir()] == [".marker"]  # no temporary file left


def test_an_exclusive_file_never_replaces_or_follows_what_is_there(tmp_path):
    (tmp_path / "elsewhere").write_text("user's")
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere")
    (tmp_path / "dangling").symlink_to(tmp_path / "nothing")
    (tmp_path / "file").write_text("user's")
    for name in ("link", "dangling", "file"):
        with pytest.raises(FileExistsError):
            fsutil.create_exclusive(tmp_path / name, b"kit")
    assert (tmp_path / "elsewhere").read_text() == "user's" and (tmp_path / "file").read_text() == "user's"
    assert not (tmp_path / "nothing").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dangling", "elsewhere", "file", "link"]


def test_an_exclusive_file_without_hard_links_is_still_exclusive(tmp_path, monkeypatch):
    def no_links(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    fsutil.create_exclusive(tmp_path / "m", b"kit")
    assert (tmp_path / "m").read_bytes() == b"kit"
    with pytest.raises(FileExistsError):
        fsutil.create_exclusive(tmp_path / "m", b"again")
    assert (tmp_path / "m").read_bytes() == b"kit" and [p.name for p in tmp_path.iterdir()] == ["m"]
