"""The run's output folder (train.output_dir), shared by every objective: the refusals before anything loads, its
preparation (leftovers cleared, an --overwrite'd run moved aside, the marker and run.json first), the one-run-per-
folder lock, which process does the preparing, and the checkpoint completion marker a --resume looks for.

The folder is resolved once (`run_dir`: `~` expanded, links followed) and the recipe carries that path, so the kit
and the Trainer write to the same place. It is the kit's (outputs/: its marker says "train") or it is refused,
whatever the flag. A start that fails before anything worth resuming exists (no complete checkpoint) removes what
it made, so the corrected command needs no --overwrite.

Who prepares. In one process: that process. Under the launcher (launch.py), the launcher prepares and holds the
lock, then writes a per-run token into the folder (`.launch.json`) and hands it to the processes it starts
(LORA_MANIP_LAUNCH); a process skips the preparation and the lock only when its token matches the folder's. Under
torchrun or the deepspeed launcher started by hand, rank 0 prepares and writes the file with a token derived from
the launch's rendezvous (TORCHELASTIC_RUN_ID, MASTER_ADDR/PORT, WORLD_SIZE), and the other ranks wait for it. A
stray RANK (or LORA_MANIP_*) in the environment therefore never makes a process skip what rank 0 must do: without
LOCAL_RANK and WORLD_SIZE it is a single process, and with them it finds no matching launch and stops. Several
nodes: the launcher of node_rank 0 prepares; the others join (`join_launch`: they wait for node 0's `.launch.json`
naming this launch, then hand its token to their processes). The file also says whether the run resumes, so every
process follows node 0's reading of `--resume auto`.

--overwrite moves the old run aside (one rename) and deletes it only once the new run has its first complete
checkpoint or ends; a start refused before that puts it back.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import secrets
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..errors import STOPPED_EXIT, UserError
from ..fsutil import KIT, atomic_write_text, create_exclusive, disk_errors, finish_tree, output_lock
from ..outputs import Claim, check_folder, claim_folder, cleanup_partials, contents, holds_cwd, partial_dir, resolve
from ..recipe import Recipe, dump_recipe
from ..runinfo import DONE_FILE, read_run, start_run

log = logging.getLogger(__name__)

KIND = "train"
LAUNCH_ENV = "LORA_MANIP_LAUNCH"  # the launcher's token, in the environment of the processes it starts
LAUNCH_FILE = ".launch.json"  # the same token in the run folder, while the launch lasts
EXTERNAL_WAIT_S = 300.0  # how long ranks > 0 of a hand-started torchrun wait for rank 0 to prepare the folder
JOIN_WAIT_S = 900.0  # how long another node's launcher waits for node 0's launch file
COMPLETE_MARKER = "checkpoint_complete"
PREEMPTED_EXIT = STOPPED_EXIT  # stopped by SIGTERM / SIGUSR1 after saving a checkpoint; run again with --resume auto
# Settings a --resume may change: how long to train, how often to save, log and evaluate, where to listen. Anything
# else (model, method, LoRA shape, data, batch, optimizer, precision, seeds) would not continue the same run.
RESUME_MAY_CHANGE = ("train.output_dir", "train.max_steps", "train.epochs", "train.save_steps",
                     "train.save_total_limit", "train.logging_steps", "train.report_to", "train.eval_steps",
                     "train.eval_limit", "train.eval_max_new_tokens", "train.best_metric", "data.num_workers",
                     "model.create_tiny_if_missing", "data.create_synthetic_if_missing", "distributed.master_addr",
                     "distributed.master_port", "distributed.node_rank")

_given: dict[str, str] = {}  # resolved run folder -> train.output_dir as the recipe wrote it (for messages)
_claims: dict[str, Claim] = {}  # run folders this process created or adopted in this start
_roles: dict[tuple, "Role"] = {}
_asides: dict[str, Path] = {}  # run folder -> the --overwrite'd run, moved aside until the new one is safe


def in_distributed_run() -> bool:
    """Started by torchrun or the deepspeed launcher (or looks so: role() asks for proof before trusting it)."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def run_dir(recipe: Recipe) -> Path:
    """train.output_dir resolved once; the recipe (and so the Trainer's output_dir) carries the resolved path."""
    out = resolve(recipe.train.output_dir)
    if recipe.train.output_dir != str(out):
        _given[str(out)] = recipe.train.output_dir
        recipe.train.output_dir = str(out)
    return out


def _shown(out: Path) -> str:
    given = _given.get(str(out))
    return f"{out} (train.output_dir {given})" if given else str(out)


# ------------------------------------------------------------------------------------------ who prepares


@dataclass(frozen=True)
class Role:
    rank: int
    launched: bool  # a launcher prepared the folder, holds its lock, and proved it to this process
    run_id: str | None = None
    resume: bool = False  # the preparing process continues a checkpoint (its reading of --resume / --resume auto)


def _external_token() -> str:
    """A hand-started torchrun's identity, the same in all its ranks: the rendezvous they share."""
    keys = ("TORCHELASTIC_RUN_ID", "MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE")
    return hashlib.sha256("|".join(os.environ.get(k, "") for k in keys).encode()).hexdigest()[:32]


def read_launch(out: Path) -> dict | None:
    try:
        fd = os.open(out / LAUNCH_FILE, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        info = json.loads(os.read(fd, 1 << 16))
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)
    return info if isinstance(info, dict) and info.get("kit") == KIT and info.get("token") else None


def write_launch(out: Path, run_id: str, token: str, resume: bool = False, launch: str | None = None) -> None:
    """The proof the started processes check, beside the run it prepared (removed by `end_launch`); `launch` names
    the launch for the launchers of the other nodes (join_launch)."""
    (out / LAUNCH_FILE).unlink(missing_ok=True)  # a killed launch's: this process holds the folder's lock now
    create_exclusive(out / LAUNCH_FILE, json.dumps({"kit": KIT, "token": token, "run_id": run_id, "resume": resume,
                                                    "launch": launch, "pid": os.getpid(),
                                                    "host": socket.gethostname()}).encode())


def join_launch(out: Path, launch: str, node_rank: int, timeout: float = JOIN_WAIT_S) -> dict:
    """Node `node_rank` > 0: node 0's launch file for this launch, once node 0 has prepared the run."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = read_launch(out)
        if info is not None and info.get("launch") == launch:
            return info
        time.sleep(1.0)
    raise UserError(f"node_rank {node_rank}: node 0 did not prepare {_shown(out)} for this launch ({launch}) within "
                    f"{timeout:.0f} s; start `lora-manip train` on node 0 too, with the same recipe, and put "
                    "train.output_dir on a file system every node shares")


def end_launch(out: Path) -> None:
    info = read_launch(out)
    if info is not None and info.get("pid") == os.getpid():
        (out / LAUNCH_FILE).unlink(missing_ok=True)


def new_token() -> str:
    return secrets.token_hex(16)


def _alive(info: dict) -> bool:
    """The launch that wrote `info` still runs (checked on its own host; another node's cannot be asked)."""
    if info.get("host") != socket.gethostname():
        return True
    pid = info.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        pass
    return True


def role(recipe: Recipe) -> Role:
    """This process's part in the run, from proof, never from the environment alone (module docstring)."""
    if not in_distributed_run():
        return Role(0, False)
    out, token = run_dir(recipe), os.environ.get(LAUNCH_ENV)
    key = (str(out), token, os.environ.get("RANK"))
    if key in _roles:
        return _roles[key]
    try:
        rank = int(os.environ.get("RANK", "0") or 0)
    except ValueError:
        raise UserError(f"RANK={os.environ['RANK']!r} is not a process rank; unset it") from None
    if token:
        info = read_launch(out)
        if info is None or not secrets.compare_digest(str(info["token"]), token) or not _alive(info):
            raise UserError(f"{LAUNCH_ENV} is set but matches no launch of {_shown(out)} (inherited from another "
                            f"run?); unset it, or start the run with `lora-manip train`")
        _roles[key] = Role(rank, True, info.get("run_id"), info.get("resume") is True)
    elif rank == 0:
        return Role(0, False)
    else:
        info = _wait_for_rank0(out)
        _roles[key] = Role(rank, True, info.get("run_id"), info.get("resume") is True)
    return _roles[key]


def _wait_for_rank0(out: Path) -> dict:
    want, deadline = _external_token(), time.monotonic() + EXTERNAL_WAIT_S
    while time.monotonic() < deadline:
        info = read_launch(out)
        if info is not None and secrets.compare_digest(str(info["token"]), want) and _alive(info):
            return info
        time.sleep(0.5)
    raise UserError(f"RANK={os.environ.get('RANK')} is set, but no rank 0 of this launch prepared {_shown(out)} "
                    f"within {EXTERNAL_WAIT_S:.0f} s (RANK/LOCAL_RANK/WORLD_SIZE inherited from elsewhere?); unset "
                    "them, or start the run with `lora-manip train` or torchrun")


# ------------------------------------------------------------------------------------------ checks, start


def check_output_dir(recipe: Recipe, overwrite: bool, resume: bool) -> None:
    """Every refusal about train.output_dir, before anything is loaded or written."""
    from ..hub import local_folder

    out = run_dir(recipe)
    if overwrite and resume:
        raise UserError("--overwrite and --resume contradict each other; choose one")
    inputs = {"base model folder": local_folder(recipe.model.path) or recipe.model.path}
    for split in ("train", "val"):
        for i, d in enumerate(getattr(recipe.data, split)):
            inputs[f"data.{split}.{i}.annotation_path file"] = d.annotation_path
            inputs[f"data.{split}.{i}.data_path folder"] = d.data_path
    if recipe.distributed.deepspeed:
        inputs["distributed.deepspeed file"] = recipe.distributed.deepspeed
    # A run inside its data root is odd but harmless; one that holds (and --overwrite would delete) it is not.
    # A folder lora-manip did not make, or that holds another kind of output, is refused here whatever the flag.
    check_folder(out, KIND, flag="train.output_dir", inputs=inputs,
                 may_nest_in=tuple(k for k in inputs if k.startswith("data.")), name=_shown(out))
    held = contents(out)
    if resume:
        latest_checkpoint(out)  # refuse now, not after minutes of loading
        check_resume_recipe(out, recipe)
    elif held and not overwrite:
        raise UserError(f"train.output_dir {_shown(out)} already holds a run; pass --resume to continue it, "
                        "--overwrite to replace it (the old run is deleted first), or choose another folder "
                        "(--set train.output_dir=...)")
    elif held and holds_cwd(out):
        raise UserError(f"train.output_dir {_shown(out)} is (or holds) the working folder: --overwrite would delete "
                        "the folder you are in; cd elsewhere, or choose another folder")


def _changed(old, new, path: str, out: list[str]) -> None:
    if isinstance(old, dict) and isinstance(new, dict):
        for k in old.keys() & new.keys():  # keys only one side knows: another kit version's defaults
            _changed(old[k], new[k], f"{path}.{k}" if path else k, out)
    elif isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        for i, (a, b) in enumerate(zip(old, new)):
            _changed(a, b, f"{path}.{i}", out)
    elif old != new and not any(path == k or path.startswith(k + ".") for k in RESUME_MAY_CHANGE):
        out.append(path)


def check_resume_recipe(out: Path, recipe: Recipe) -> None:
    """--resume continues the run in `out` only with its own recipe (what may change: RESUME_MAY_CHANGE); refused
    before anything in the folder is touched, naming the keys that differ."""
    saved = out / "recipe.yaml"
    try:
        old = yaml.safe_load(saved.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"--resume: {saved} is missing, so this recipe cannot be checked against the run's; restore "
                        "it, or start a new run (--overwrite or another train.output_dir)") from None
    except (OSError, ValueError) as e:
        raise UserError(f"--resume: cannot read {saved} ({e})") from None
    changed: list[str] = []
    _changed(old, yaml.safe_load(dump_recipe(recipe)), "", changed)
    if changed:
        shown = ", ".join(changed[:6]) + (f" and {len(changed) - 6} more" if len(changed) > 6 else "")
        raise UserError(f"--resume: the recipe differs from the run's ({saved}) in {shown}; a resumed run continues "
                        "with the settings it started with: use that recipe, or start a new run (--overwrite or "
                        "another train.output_dir)")


def prepare_output_dir(recipe: Recipe, overwrite: bool, resume: bool) -> str | None:
    """Checks, then (the preparing process, holding the folder's lock in run_lock) clears leftovers, takes an
    --overwrite'd run out of the way in one rename before anything new is written, and writes the marker and
    run.json first. Returns the run id."""
    r = role(recipe)
    if r.launched:
        return r.run_id  # the launcher did all of this before starting the processes
    out = run_dir(recipe)
    check_output_dir(recipe, overwrite, resume)
    cleanup_partials(out)
    (out / LAUNCH_FILE).unlink(missing_ok=True)  # a killed launch's proof is no proof for anyone now
    if overwrite and contents(out):
        # The old run's adapter, recipe or log must never sit beside the new run's: all of it goes, in one rename,
        # and comes back if this start is refused (undo_start).
        with disk_errors(out):
            aside = partial_dir(out, "aside-", KIND)
            os.replace(out, aside / out.name)
        _asides[str(out)] = aside
        log.warning("--overwrite: the previous run in %s is set aside, deleted once the new run is under way",
                    _shown(out))
    claim = claim_folder(out, KIND)
    if claim.new:
        _claims[str(out)] = claim
    previous = read_run(out) if resume else None
    run_id = start_run(out, "train", previous["run_id"] if previous else None)
    if in_distributed_run():  # rank 0 of a hand-started torchrun: the other ranks wait for this
        write_launch(out, run_id, _external_token(), resume)
    return run_id


def resumable(out: Path) -> bool:
    return (out / DONE_FILE).is_file() or any((p / COMPLETE_MARKER).is_file() for p in out.glob("checkpoint-*"))


def resume_auto(recipe: Recipe) -> str:
    """--resume auto: "fresh" (nothing to continue), "resume" (a complete checkpoint), "done" (the run finished) or
    "restart" (a run of this recipe killed before its first checkpoint: started again, as --overwrite would)."""
    out = run_dir(recipe)
    if not out.is_dir() or not contents(out):
        return "fresh"
    check_folder(out, KIND, flag="train.output_dir", name=_shown(out))
    if (out / DONE_FILE).is_file():
        return "done"
    if (out / "recipe.yaml").is_file():
        check_resume_recipe(out, recipe)  # another recipe's run is neither continued nor replaced
    return "resume" if resumable(out) else "restart"


def drop_aside(out: Path) -> None:
    """The new run is under way (a complete checkpoint, or its end): the --overwrite'd run goes for good."""
    aside = _asides.pop(str(out), None)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def undo_start(out: Path) -> None:
    """A run that this process started in a new folder and that stopped before anything worth resuming: remove
    what it made and put an --overwrite'd run back, so the corrected command starts cleanly."""
    claim = _claims.pop(str(out), None)
    if not resumable(out):
        if claim is not None:
            log.warning("removing %s: the run stopped before its first checkpoint", out)
            claim.undo()
        aside = _asides.pop(str(out), None)
        if aside is not None and not os.path.lexists(out):
            os.replace(aside / out.name, out)
            shutil.rmtree(aside, ignore_errors=True)
            log.warning("put the previous run back in %s", _shown(out))
    drop_aside(out)


@contextlib.contextmanager
def run_lock(recipe: Recipe):
    """One run per output folder: the preparing process owns train.output_dir while the run lasts; a start that
    fails is taken back (undo_start)."""
    if role(recipe).launched:
        yield  # the launcher holds the lock for the whole launch
        return
    out = run_dir(recipe)
    with output_lock(out, "lora-manip train"):
        _claims.pop(str(out), None)  # only what this start makes is taken back
        try:
            yield
        except BaseException:
            undo_start(out)
            raise
        finally:
            end_launch(out)
            drop_aside(out)
            _claims.pop(str(out), None)


# ------------------------------------------------------------------------------------------- checkpoints


def mark_complete(output_dir: str, step: int) -> None:
    """The Trainer writes checkpoint-N in place, so a run killed mid-save leaves a folder that looks like a
    checkpoint. The trainers call this once every file of checkpoint-N is written (and before older checkpoints
    are rotated away); --resume only considers checkpoints carrying the marker. Its files get the umask's mode
    (safetensors writes 0600) and are on disk first."""
    folder = Path(output_dir) / f"checkpoint-{step}"
    if folder.is_dir():
        finish_tree(folder)
        atomic_write_text(folder / COMPLETE_MARKER, f"step {step}\n")
        drop_aside(Path(output_dir))  # something to resume from: the --overwrite'd run is not coming back


def latest_checkpoint(out: Path) -> str:
    """The newest checkpoint whose save completed; incomplete ones (a run killed while saving) are skipped."""
    ckpts = sorted((p for p in out.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
                   key=lambda p: int(p.name.split("-")[-1]), reverse=True)
    for p in ckpts:
        if (p / COMPLETE_MARKER).is_file():
            return str(p)
        log.warning("skipping %s: its save did not complete", p)
    raise UserError(f"--resume: {out} holds no complete checkpoint-* folder to resume from")


