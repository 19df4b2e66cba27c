"""`lora-manip train` from the command line to the end of the run: load the recipe, then print the plan (--dry-run),
train in this process, or start the processes that train.

With `distributed.nproc_per_node * nnodes > 1`, started outside a distributed run, the command re-executes itself
under `torch.distributed.run` with the recipe's process and node settings. The launcher checks the run (preflight),
prepares the output folder and the demo inputs once, holding the folder's lock for the whole run; the processes it
starts inherit the lock and the run id through the environment and skip what it already did. Started under torchrun
or the deepspeed launcher (they set RANK / LOCAL_RANK / WORLD_SIZE) it just trains.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys

from ..recipe import Recipe, load_recipe
from .preflight import CHECKED_ENV, in_distributed_run, preflight

log = logging.getLogger(__name__)


def launch_training(recipe_path: str | os.PathLike, overrides: list[str], overwrite: bool = False,
                    resume: bool = False, dry_run: bool = False) -> tuple[int, str]:
    """(exit code, what to print) of `lora-manip train RECIPE [--set ...]`."""
    recipe = load_recipe(recipe_path, overrides)
    if dry_run:
        from .plan import describe_plan

        return 0, describe_plan(recipe)
    if recipe.distributed.nproc_per_node * recipe.distributed.nnodes > 1 and not in_distributed_run():
        return launch_processes(recipe_path, overrides, recipe, overwrite, resume), ""
    from .workflow import run_training

    return 0, f"saved to {run_training(recipe, overwrite=overwrite, resume=resume)}"


def launch_processes(recipe_path: str | os.PathLike, overrides: list[str], recipe: Recipe, overwrite: bool,
                     resume: bool) -> int:
    """Check and prepare once, here, then run the recipe's processes under torchrun; their exit code."""
    from ..fsutil import output_lock
    from .build import prepare_demo_inputs
    from .run_folder import RUN_ID_ENV, prepare_output_dir

    preflight(recipe)
    with output_lock(recipe.train.output_dir, "lora-manip train"):
        run_id = prepare_output_dir(recipe, overwrite, resume)
        prepare_demo_inputs(recipe)  # not racing in every rank
        argv = [f"--set={s}" for s in overrides] + ["--overwrite"] * overwrite + ["--resume"] * resume
        return relaunch(str(recipe_path), argv, recipe, {RUN_ID_ENV: run_id, CHECKED_ENV: "1"})


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
