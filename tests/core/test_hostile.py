"""Hostile conditions, by class (issue 22): every command that writes meets each of them, and each must keep what is
not its own, fail in one line and leave nothing behind. The rules live in one place (lora_manip/outputs/), so one
table of writers covers them all: a new command joins by adding one entry to WRITERS.

Cases: a symbolic link at the output's lock path; an output that is a link to someone's folder (or file), and one
that is a link to the kit's own output (acted on at its target); a folder (or file) lora-manip did not make, with
--force/--overwrite; a read-only folder; a full disk (an injected ENOSPC at the first and at the second fsync, the
points where every writer commits); an inherited RANK / LORA_MANIP_* environment; `~` in the output path (HOME set to
a temporary folder) under a umask the files must follow; kill -9 of a writer. The training-only cases (a refused
start, --resume with another recipe, the working folder, a stray distributed environment) follow the table.
Commands run in this process through typer's CliRunner on the tiny model fixtures.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import yaml
from typer.testing import CliRunner

from lora_manip.cli import app
from lora_manip.fsutil import lock_path
from lora_manip.outputs import MARKER, read_marker

from tests.conftest import ROOT, tiny_recipe_dict

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
BOX = "[0.5, 0.5, 0.9, 0.9]"


def cli(*args) -> tuple[int, str]:
    r = CliRunner().invoke(app, [str(a) for a in args])
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception  # a traceback is a failure of its own: show it whole
    return r.exit_code, r.output


def one_line_error(result: tuple[int, str], *needles: str) -> str:
    code, out = result
    assert code == 2, out[-3000:]
    errors = [line[line.index("error: "):] for line in out.splitlines() if "error: " in line]
    assert len(errors) == 1 and "Traceback" not in out, out[-3000:]
    for n in needles:
        assert n in errors[0], (n, errors[0])
    return errors[0]


def tree(path: Path) -> dict[str, bytes | None]:
    """Every file (bytes) and link (target) under `path`, to show nothing of it changed."""
    if path.is_symlink() or path.is_file():
        return {"": os.readlink(path).encode() if path.is_symlink() else path.read_bytes()}
    return {str(p.relative_to(path)): os.readlink(p).encode() if p.is_symlink() else p.read_bytes() if p.is_file()
            else None for p in sorted(path.rglob("*"))}


# ---------------------------------------------------------------------------------------------- the writers


@dataclass
class Inputs:
    model: Path
    data: Path
    run: Path  # a finished training run (max_steps 1, a checkpoint), also merge's adapter
    recipe: Path
    preds: Path
    pixels: Path
    image: Path


@dataclass(frozen=True)
class Writer:
    name: str
    argv: Callable[[Inputs, str], list]  # the command line writing OUT
    flag: str | None  # the flag that replaces an earlier output; None: the command never replaces one
    file: bool = False  # OUT is one file (its sidecar says the kit wrote it), not a folder
    locks: bool = False  # holds OUT's lock file while it writes
    key: str = ""  # a file the command (re)writes in OUT: replaced means a new inode


WRITERS = [
    Writer("train", lambda i, o: ["train", i.recipe, "--set", f"train.output_dir={o}"], "--overwrite", locks=True,
           key="run.json"),
    Writer("merge", lambda i, o: ["merge", i.run, "--out", o, "--no-verify"], "--force", locks=True,
           key="config.json"),
    Writer("convert", lambda i, o: ["convert", i.model, o, "--from", "hf", "--to", "llava-next"], "--force",
           locks=True, key="config.json"),
    Writer("eval", lambda i, o: ["eval", i.model, "--data", i.data / "val.json", "--out", o, "--limit", "2",
                                 "--max-new-tokens", "2"], "--force", locks=True, key="metrics.json"),
    Writer("score", lambda i, o: ["score", i.preds, "--out", o], "--force", locks=True, key="metrics.json"),
    Writer("predict --draw", lambda i, o: ["predict", i.model, i.image, "where?", "--draw", o, "--max-new-tokens",
                                           "2"], "--force", file=True),
    Writer("data synth", lambda i, o: ["data", "synth", o, "--n", "4"], None, key="train.json"),
    Writer("data normalize", lambda i, o: ["data", "normalize", i.pixels, o], "--force", file=True),
    Writer("tiny-model", lambda i, o: ["tiny-model", o], "--force", key="model.safetensors"),
]
EACH = pytest.mark.parametrize("w", WRITERS, ids=[w.name for w in WRITERS])


@pytest.fixture(scope="module")
def inputs(tiny_model_dir, synth_dir, tmp_path_factory) -> Inputs:
    from PIL import Image

    tmp = tmp_path_factory.mktemp("hostile")
    recipe = tmp / "r.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe_dict(tiny_model_dir, synth_dir, tmp / "unused", train__max_steps=1,
                                                      train__save_steps=1)))
    code, out = cli("train", recipe, "--set", f"train.output_dir={tmp / 'run'}")
    assert code == 0, out
    preds = tmp / "p.jsonl"
    preds.write_text('{"id": 1, "pred": "A", "gt": "A"}\n{"id": 2, "pred": "B", "gt": "A"}\n')
    pixels = tmp / "px.json"
    answer = '{"current_bbox": [[10, 20], [30, 40]]}'  # pixels of a 100 x 50 image
    pixels.write_text(json.dumps([{"id": "a", "width": 100, "height": 50, "conversations": [
        {"from": "human", "value": "<image>\nWhere?"}, {"from": "gpt", "value": answer}]}]))
    image = tmp / "scene.png"
    Image.new("RGB", (64, 48), (90, 60, 30)).save(image)
    return Inputs(tiny_model_dir, synth_dir, tmp / "run", recipe, preds, pixels, image)


@pytest.fixture(autouse=True)
def box_answers(monkeypatch):
    """Every answer is a box, so predict always has something to draw (and eval is quick)."""
    import lora_manip.eval.generate as gen

    monkeypatch.setattr(gen, "generate", lambda model, processor, prompts, *a, **k: [BOX] * len(prompts))


def run(w: Writer, i: Inputs, out, *extra) -> tuple[int, str]:
    return cli(*w.argv(i, str(out)), *extra)


def victim(tmp: Path, w: Writer) -> Path:
    """Someone's folder (or file, for a one-file output): what no flag may touch."""
    if w.file:
        p = tmp / "mine.png"
        p.write_bytes(b"the user's own file")
        return p
    p = tmp / "home-folder"
    (p / ".ssh").mkdir(parents=True)
    (p / ".ssh/id_rsa").write_text("PRIVATE KEY")
    (p / "projects").mkdir()
    (p / "projects/notes.txt").write_text("mine")
    (p / "images").mkdir()
    (p / "images/000000.png").write_bytes(b"a photo")
    return p


# ------------------------------------------------------------------------------------------------ the cases


@EACH
def test_a_link_at_the_lock_path_is_never_followed(w, inputs, tmp_path):
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    parent = tmp_path / "p"
    parent.mkdir()
    lock_path(parent / "out").symlink_to(precious)
    result = run(w, inputs, parent / "out")
    assert precious.read_text() == "keep me" and lock_path(parent / "out").is_symlink()
    if w.locks:
        one_line_error(result, "is a symbolic link")
        assert sorted(p.name for p in parent.iterdir()) == [lock_path(parent / "out").name]
    else:
        assert result[0] == 0, result[1]


@EACH
def test_a_link_to_someone_elses_folder_is_refused(w, inputs, tmp_path):
    target = victim(tmp_path, w)
    before = tree(target)
    link = tmp_path / "link"
    link.symlink_to(target)
    one_line_error(run(w, inputs, link, *[w.flag] * bool(w.flag)), str(target), "did not")
    assert tree(target) == before and link.is_symlink()


@EACH
def test_what_the_kit_did_not_make_is_never_replaced_whatever_the_flag(w, inputs, tmp_path):
    target = victim(tmp_path, w)
    before = tree(target)
    message = one_line_error(run(w, inputs, target, *[w.flag] * bool(w.flag)), "did not")
    if not w.file:
        assert ".ssh" in message and "projects" in message  # a few of the files found, named
    assert tree(target) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]  # no lock, no partial, no sidecar left


@contextlib.contextmanager
def read_only_folder(path: Path):
    path.mkdir()
    if os.geteuid() != 0:
        path.chmod(0o555)
        try:
            yield path
        finally:
            path.chmod(0o755)
        return
    # root writes through permission bits: a read-only mount is the only read-only folder
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(path)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"running as root without mount: no read-only folder to test ({done.stderr.strip()})")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


@EACH
def test_a_read_only_folder_is_one_line_and_nothing_is_left(w, inputs, tmp_path):
    with read_only_folder(tmp_path / "ro") as ro:
        one_line_error(run(w, inputs, ro / "out"), str(ro))
        assert list(ro.iterdir()) == []


@EACH
@pytest.mark.parametrize("at", [1, 2], ids=["first-fsync", "second-fsync"])
def test_a_full_disk_is_one_line_and_nothing_is_left(w, inputs, tmp_path, monkeypatch, at):
    real, calls = os.fsync, []

    def fsync(fd):
        calls.append(fd)
        if len(calls) >= at:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)

    parent = tmp_path / "p"
    parent.mkdir()
    monkeypatch.setattr(os, "fsync", fsync)
    one_line_error(run(w, inputs, parent / "out"), "disk is full")
    monkeypatch.undo()
    assert list(parent.iterdir()) == []  # no output, no lock, no marker, no partial, no sidecar


def _hold_lock(out: Path) -> int:
    """Another process's lock on `out`, as it looks from here: a lock file under an flock of its own."""
    fd = os.open(lock_path(out), os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(fd, json.dumps({"kit": "lora-manip", "pid": 1, "host": "elsewhere", "command": "lora-manip x",
                             "started": "earlier"}).encode())
    return fd


@EACH
def test_an_inherited_environment_changes_nothing(w, inputs, tmp_path, monkeypatch):
    out = tmp_path / "out"
    for var, value in {"RANK": "1", "LORA_MANIP_LOCKS_HELD": str(lock_path(out)), "LORA_MANIP_RUN_ID": "x",
                       "LORA_MANIP_PREFLIGHT_DONE": "1", "LORA_MANIP_LAUNCH": "stale"}.items():
        monkeypatch.setenv(var, value)
    if not w.locks:
        assert run(w, inputs, out)[0] == 0  # a stray rank is no reason to skip anything
        return
    fd = _hold_lock(out)
    try:
        one_line_error(run(w, inputs, out), "is in use by `lora-manip x`")  # the variable is no lock
    finally:
        os.close(fd)
    assert not out.exists()


@EACH
def test_the_path_is_resolved_once_files_follow_the_umask_and_a_link_is_acted_on_at_its_target(
        w, inputs, tmp_path, monkeypatch):
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    old = os.umask(0o027)
    try:
        code, out = run(w, inputs, "~/out")
    finally:
        os.umask(old)
    assert code == 0, out
    made = home / "out"
    assert made.exists() and list(work.iterdir()) == []  # not ./~/out
    written = [made, made.parent / f".{made.name}{MARKER}"] if w.file else [made, *made.rglob("*")]
    for p in written:
        assert p.stat().st_mode & 0o777 == (0o750 if p.is_dir() else 0o640), p
    if w.name == "train":
        assert (made / "checkpoint-1/adapter_model.safetensors").is_file()  # the Trainer wrote there too
    # a link to the kit's own output: the command acts on the target, and the link stays a link
    link = work / "link"
    link.symlink_to(made)
    key = made if w.file else made / w.key
    before = (key.stat().st_ino, key.stat().st_mtime_ns)
    result = run(w, inputs, link, *[w.flag] * bool(w.flag))
    assert link.is_symlink() and os.readlink(link) == str(made)
    if w.flag is None:
        one_line_error(result, str(made))  # data synth never replaces a data set
    else:
        assert result[0] == 0, result[1]
        # written anew at the target (inode and mtime: a freed inode may be handed to the new file)
        assert (key.stat().st_ino, key.stat().st_mtime_ns) != before
    assert not lock_path(made).exists() and not list(made.parent.glob(".*.partial"))


def test_a_writer_killed_mid_write_leaves_nothing_the_next_run_trips_on(tmp_path):
    out = tmp_path / "data"
    p = subprocess.Popen([sys.executable, "-m", "lora_manip.cli", "data", "synth", str(out), "--n", "3000"], env=ENV,
                         cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while not list(out.glob(".images.*.partial/*.png")) and time.time() < deadline:
            time.sleep(0.05)
        assert list(out.glob(".images.*.partial/*.png")), "the writer never started writing"
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert read_marker(out)["kind"] == "synth" and not (out / "train.json").exists()
    code, text = cli("data", "synth", out, "--n", "4")
    assert code == 0, text
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "images", "train.json", "val.json"]


def test_a_cache_is_written_only_into_a_cache_folder_of_the_kits(tmp_path):
    from lora_manip.errors import UserError
    from lora_manip.outputs import write_cache_file

    mine = victim(tmp_path, WRITERS[0])  # LORA_MANIP_CACHE pointed at someone's folder
    before = tree(mine)
    with pytest.raises(UserError, match="did not make it"):
        write_cache_file(mine / "scan" / ".." / "k.npz", b"entry")
    assert tree(mine) == before
    cache = tmp_path / "cache"  # a cache a kit version before markers wrote: nothing but entries, adopted
    cache.mkdir()
    (cache / "a.npz").write_bytes(b"old entry")
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    write_cache_file(cache / "b.npz", b"entry")
    (cache / "c.npz").symlink_to(precious)
    write_cache_file(cache / "c.npz", b"entry")  # an entry's name taken by a link: the link is replaced
    assert read_marker(cache)["kind"] == "cache" and precious.read_text() == "keep me"
    assert not (cache / "c.npz").is_symlink() and (cache / "c.npz").read_bytes() == b"entry"


# ---------------------------------------------------------------------------------------------- training only


@pytest.fixture()
def finished(inputs, tmp_path) -> Path:
    run_copy = tmp_path / "run"
    shutil.copytree(inputs.run, run_copy, symlinks=True)
    return run_copy


def test_a_refused_start_leaves_nothing_behind(inputs, synth_dir, tmp_path):
    bad = tmp_path / "bad.json"
    records = json.loads((synth_dir / "train.json").read_text())
    records[3]["images"] = ["images/no-such.png"]
    bad.write_text(json.dumps(records))
    out = tmp_path / "new" / "run"
    one_line_error(cli("train", inputs.recipe, "--set", f"train.output_dir={out}", "--set",
                       f"data.train.0.annotation_path={bad}"))
    assert not (tmp_path / "new").exists()  # not the run folder, not the folder made for it, not the lock


def test_resume_with_another_recipe_is_refused_before_anything_changes(inputs, finished):
    before = tree(finished)
    one_line_error(cli("train", inputs.recipe, "--set", f"train.output_dir={finished}", "--resume", "--set",
                       "lora.r=4", "--set", "train.max_steps=5"), "lora.r", "recipe.yaml")
    assert tree(finished) == before  # run.json, run_complete.json and recipe.yaml as they were


def test_overwrite_never_deletes_the_working_folder(inputs, finished, monkeypatch):
    monkeypatch.chdir(finished)
    before = sorted(p.name for p in finished.parent.iterdir())
    one_line_error(cli("train", inputs.recipe, "--set", "train.output_dir=.", "--overwrite"), "working folder")
    assert sorted(p.name for p in finished.parent.iterdir()) == before and (finished / "run_complete.json").is_file()
    assert not list(finished.glob(".*.partial"))


def test_overwrite_through_a_link_replaces_the_run_it_leads_to_and_says_so(inputs, finished, tmp_path, caplog):
    link = tmp_path / "link"
    link.symlink_to(finished)
    old_id = json.loads((finished / "run.json").read_text())["run_id"]
    code, out = cli("train", inputs.recipe, "--set", f"train.output_dir={link}", "--overwrite")
    assert code == 0, out
    assert link.is_symlink() and json.loads((finished / "run.json").read_text())["run_id"] != old_id
    assert f"the previous run in {finished} (train.output_dir {link}) is set aside" in caplog.text


def test_a_stray_rank_never_skips_what_rank_0_does(inputs, finished, monkeypatch):
    from lora_manip.train import run_folder

    done = (finished / "run_complete.json").read_bytes()
    monkeypatch.setenv("RANK", "1")  # no torchrun: one process, which must refuse a finished run as rank 0 would
    one_line_error(cli("train", inputs.recipe, "--set", f"train.output_dir={finished}"), "already holds a run")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LORA_MANIP_LAUNCH", "left-over-token")  # as if started by a launch that is not this one
    one_line_error(cli("train", inputs.recipe, "--set", f"train.output_dir={finished}"), "matches no launch")
    monkeypatch.delenv("LORA_MANIP_LAUNCH")  # as if started by torchrun, with no rank 0 preparing the folder
    monkeypatch.setattr(run_folder, "EXTERNAL_WAIT_S", 0.3)
    one_line_error(cli("train", inputs.recipe, "--set", f"train.output_dir={finished}"), "no rank 0")
    assert (finished / "run_complete.json").read_bytes() == done and not (finished / "checkpoint-2").exists()
