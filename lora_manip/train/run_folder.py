"""The run's output folder (train.output_dir), shared by every objective: the refusals before anything loads, its
preparation (leftovers cleared, an --overwrite'd run moved aside, run.json first), the one-run-per-folder lock, and
the checkpoint completion marker a --resume looks for."""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

from ..errors import UserError
from ..fsutil import atomic_write_text, cleanup_partials, guard_output, move_aside, output_lock
from ..recipe import Recipe
from ..runinfo import read_run, start_run

log = logging.getLogger(__name__)

RUN_ID_ENV = "LORA_MANIP_RUN_ID"  # set by the launcher for the torchrun children: the folder is prepared


def _rank() -> int:
    return int(os.environ.get("RANK", 0))


def check_output_dir(recipe: Recipe, overwrite: bool, resume: bool) -> None:
    """Every refusal about train.output_dir, before anything is loaded or written."""
    from ..hub import local_folder

    out = Path(recipe.train.output_dir)
    if overwrite and resume:
        raise UserError("--overwrite and --resume contradict each other; choose one")
    if out.exists() and not out.is_dir():
        raise UserError(f"train.output_dir {out} is a file, not a folder; choose another output folder")
    inputs = {"base model folder": local_folder(recipe.model.path) or recipe.model.path}
    for split in ("train", "val"):
        for i, d in enumerate(getattr(recipe.data, split)):
            inputs[f"data.{split}.{i}.annotation_path file"] = d.annotation_path
            inputs[f"data.{split}.{i}.data_path folder"] = d.data_path
    if recipe.distributed.deepspeed:
        inputs["distributed.deepspeed file"] = recipe.distributed.deepspeed
    # A run inside its data root is odd but harmless; one that holds (and --overwrite would delete) it is not.
    guard_output(out, inputs, "train.output_dir", may_nest_in=tuple(k for k in inputs if k.startswith("data.")))
    if resume:
        latest_checkpoint(out)  # refuse now, not after minutes of loading
    elif out.exists() and any(out.iterdir()) and not overwrite:
        raise UserError(f"train.output_dir {out} already holds a run; pass --resume to continue it, --overwrite "
                        "to replace it (the old run is deleted first), or choose another folder "
                        "(--set train.output_dir=...)")


def prepare_output_dir(recipe: Recipe, overwrite: bool, resume: bool) -> str | None:
    """Checks, then (rank 0, holding the folder's lock in run_lock) clears leftovers, takes an --overwrite'd
    run out of the way in one rename before anything new is written, and writes run.json first. Returns the run
    id (None on other ranks)."""
    out = Path(recipe.train.output_dir)
    prepared = os.environ.get(RUN_ID_ENV)
    if prepared and (read_run(out) or {}).get("run_id") == prepared:
        return prepared  # the launcher did all of this before starting the processes
    if _rank() != 0:
        return None  # rank 0 checks and prepares; the others never write into the folder themselves
    check_output_dir(recipe, overwrite, resume)
    cleanup_partials(out)
    if overwrite and out.exists() and any(out.iterdir()):
        # The old run's adapter, recipe or log must never sit beside the new run's: all of it goes, in one rename.
        move_aside(out)
    out.mkdir(parents=True, exist_ok=True)
    previous = read_run(out) if resume else None
    return start_run(out, "train", previous["run_id"] if previous else None)


@contextlib.contextmanager
def run_lock(recipe: Recipe):
    """One run per output folder: rank 0 (or the launcher) owns train.output_dir while the run lasts."""
    if _rank() != 0:
        yield
        return
    with output_lock(recipe.train.output_dir, "lora-manip train"):
        yield


COMPLETE_MARKER = "checkpoint_complete"


def mark_complete(output_dir: str, step: int) -> None:
    """The Trainer writes checkpoint-N in place, so a run killed mid-save leaves a folder that looks like a
    checkpoint. The trainers call this once every file of checkpoint-N is written (and before older checkpoints
    are rotated away); --resume only considers checkpoints carrying the marker."""
    folder = Path(output_dir) / f"checkpoint-{step}"
    if folder.is_dir():
        atomic_write_text(folder / COMPLETE_MARKER, f"step {step}\n")


def latest_checkpoint(out: Path) -> str:
    """The newest checkpoint whose save completed; incomplete ones (a run killed while saving) are skipped."""
    ckpts = sorted((p for p in out.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
                   key=lambda p: int(p.name.split("-")[-1]), reverse=True)
    for p in ckpts:
        if (p / COMPLETE_MARKER).is_file():
            return str(p)
        log.warning("skipping %s: its save did not complete", p)
    raise UserError(f"--resume: {out} holds no complete checkpoint-* folder to resume from")
