"""Which run a folder belongs to (whose folder it is, and so what may be deleted in it, is outputs/'s marker).

A training run writes `run.json` (a fresh run id, pid, host, start time) into its output folder before anything
else, and `run_complete.json` (the same run id) only after the final model or adapter is saved. A folder whose
marker is missing or names another run holds an unfinished run: its adapter files may be half-written or an
earlier run's, so `merge` refuses it. `merge` copies the run id into the merged checkpoint's run.json, so later
commands (eval) can tell which run a checkpoint came from.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import uuid
from pathlib import Path

from .errors import UserError
from .fsutil import KIT, atomic_write_json

RUN_FILE = "run.json"
DONE_FILE = "run_complete.json"


def _now() -> str:
    return datetime.datetime.now().isoformat(timespec="seconds")


def read_run(folder: str | os.PathLike, name: str = RUN_FILE) -> dict | None:
    """The folder's run.json (or `name`), None when absent; a broken one is a UserError naming it."""
    path = Path(folder) / name
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(info, dict) or not isinstance(info.get("run_id"), str):
        raise UserError(f"{path}: expected an object with a `run_id` string")
    return info


def start_run(folder: str | os.PathLike, command: str = "train", run_id: str | None = None) -> str:
    """Write run.json (a new run id, or `run_id` when continuing a run) and drop any completion marker."""
    folder = Path(folder)
    run_id = run_id or uuid.uuid4().hex
    (folder / DONE_FILE).unlink(missing_ok=True)  # until the new final save completes, the folder is unfinished
    atomic_write_json(folder / RUN_FILE, {"kit": KIT, "run_id": run_id, "command": command, "pid": os.getpid(),
                                          "host": socket.gethostname(), "started": _now()})
    return run_id


def finish_run(folder: str | os.PathLike, step: int | None = None) -> None:
    info = read_run(folder) or {}
    atomic_write_json(Path(folder) / DONE_FILE, {"run_id": info.get("run_id"), "step": step, "finished": _now()})


def check_complete(folder: str | os.PathLike, what: str = "adapter") -> str | None:
    """The run id of a finished run in `folder`; None for a folder that no run of this kit wrote (an adapter
    from elsewhere); UserError for an unfinished or mixed one."""
    info = read_run(folder)
    if info is None:
        return None
    done = read_run(folder, DONE_FILE)
    if done is None:
        raise UserError(f"{folder}: run {info['run_id']} did not finish (no {DONE_FILE}: killed, or still "
                        f"running); its {what} files may be incomplete or an earlier run's. Continue it with "
                        "`lora-manip train RECIPE --resume`, or train again")
    if done["run_id"] != info["run_id"]:
        raise UserError(f"{folder}: {DONE_FILE} belongs to run {done['run_id']}, {RUN_FILE} to run {info['run_id']}"
                        f"; the folder mixes two runs, so its {what} cannot be trusted. Train again")
    return info["run_id"]


def record_source(out: str | os.PathLike, run_id: str | None, source: str, command: str) -> None:
    """Write run.json and its marker into a derived folder (a merged checkpoint, written atomically as a whole):
    the run it came from. Nothing is written for a source no run of this kit produced."""
    if run_id is None:
        return
    atomic_write_json(Path(out) / RUN_FILE, {"run_id": run_id, "command": command, "source": str(source),
                                             "started": _now()})
    atomic_write_json(Path(out) / DONE_FILE, {"run_id": run_id, "step": None, "finished": _now()})
