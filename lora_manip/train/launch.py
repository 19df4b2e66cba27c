"""`lora-manip train` from the command line to the end of the run: load the recipe, then print the plan (--dry-run),
train in this process, or start the processes that train.

With `distributed.nproc_per_node * nnodes > 1`, started outside a distributed run, the command re-executes itself
under `torch.distributed.run` with the recipe's process and node settings. The launcher checks the run (preflight),
prepares the output folder and the demo inputs once, holding the folder's lock for the whole run, and writes a
per-run token into the folder that it also hands to the processes it starts; a process skips what the launcher did
only when its token matches the folder's (run_folder.role). Started under torchrun or the deepspeed launcher by
hand (they set RANK / LOCAL_RANK / WORLD_SIZE) it trains, rank 0 preparing the folder for the others.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys

from ..recipe import Recipe, load_recipe
from .preflight import preflight
from .run_folder import in_distributed_run, run_dir

log = logging.getLogger(__name__)


def launch_training(recipe_path: str | os.PathLike, overrides: list[str], overwrite: bool = False,
                    resume: bool = False, dry_run: bool = False) -> tuple[int, str]:
    """(exit code, what to print) of `lora-manip train RECIPE [--set ...]`."""
    recipe = load_recipe(recipe_path, overrides)
    if dry_run:
        from .plan import describe_plan

        return 0, describe_plan(recipe)
    run_dir(recipe)  # resolved once: the kit and the Trainer write to the same folder
    if recipe.distributed.nproc_per_node * recipe.distributed.nnodes > 1 and not in_distributed_run():
        return launch_processes(recipe_path, overrides, recipe, overwrite, resume), ""
    from .workflow import run_training

    return 0, f"saved to {run_training(recipe, overwrite=overwrite, resume=resume)}"


def launch_processes(recipe_path: str | os.PathLike, overrides: list[str], recipe: Recipe, overwrite: bool,
                     resume: bool) -> int:
    """Check and prepare once, here, then run the recipe's processes under torchrun; their exit code. A launch
    whose processes fail before the first checkpoint leaves nothing behind (run_folder.undo_start)."""
    from .build import prepare_demo_inputs
    from .run_folder import LAUNCH_ENV, new_token, prepare_output_dir, run_lock, undo_start, write_launch

    preflight(recipe)
    with run_lock(recipe):
        run_id = prepare_output_dir(recipe, overwrite, resume)
        prepare_demo_inputs(recipe)  # not racing in every rank
        token = new_token()
        write_launch(run_dir(recipe), run_id, token)
        argv = [f"--set={s}" for s in overrides] + ["--overwrite"] * overwrite + ["--resume"] * resume
        code = relaunch(str(recipe_path), argv, recipe, {LAUNCH_ENV: token})
        if code != 0:
            undo_start(run_dir(recipe))
        return code


def relaunch_command(recipe_path: str, argv: list[str], recipe: Recipe) -> list[str]:
    d = recipe.distributed
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={d.nproc_per_node}",
            f"--nnodes={d.nnodes}", f"--node_rank={d.node_rank}", f"--master_addr={d.master_addr}",
            f"--master_port={d.master_port}", "-m", "lora_manip.cli", "train", recipe_path, *argv]


def relaunch(recipe_path: str, argv: list[str], recipe: Recipe, extra_env: dict[str, str]) -> int:
    from ..model.load import has_cuda

    cmd = relaunch_command(recipe_path, argv, recipe)
    log.info("launching %d process(es) per node: %s", recipe.distributed.nproc_per_node, " ".join(cmd))
    env = {**os.environ, **extra_env}
    if not has_cuda():
        env.setdefault("DS_ACCELERATOR", "cpu")
    return subprocess.call(cmd, env=env)
