"""Processes: checks that need no model (devices, optional packages), and the torchrun relaunch.

`lora-manip train` with `distributed.nproc_per_node * nnodes > 1`, started outside a distributed run, re-executes
itself under `torch.distributed.run` with the recipe's process and node settings. Started under torchrun or the
deepspeed launcher it just trains (they set RANK / LOCAL_RANK / WORLD_SIZE).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys

from ..errors import UserError
from ..recipe import Recipe

log = logging.getLogger(__name__)


def in_distributed_run() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def preflight(recipe: Recipe) -> None:
    """Everything that can be refused before data or model are touched."""
    import torch

    from ..model.load import resolve_attention

    resolve_attention(recipe.model.attn_implementation)
    n = recipe.distributed.nproc_per_node
    if torch.cuda.is_available() and n > torch.cuda.device_count():
        raise UserError(f"distributed.nproc_per_node: {n} processes but this machine has "
                        f"{torch.cuda.device_count()} GPU(s)")
    if not torch.cuda.is_available() and n > 1:
        log.warning("no CUDA GPU: running %d CPU processes over gloo (a correctness check, not a speed-up)", n)
    if recipe.method == "qlora" and importlib.util.find_spec("bitsandbytes") is None:
        raise UserError("method: qlora needs bitsandbytes (pip install bitsandbytes)")
    if recipe.distributed.deepspeed and importlib.util.find_spec("deepspeed") is None:
        raise UserError("distributed.deepspeed is set but deepspeed is not installed (pip install deepspeed)")
    if recipe.distributed.deepspeed and not torch.cuda.is_available():
        configure_cpu_deepspeed()


def configure_cpu_deepspeed() -> None:
    """DeepSpeed on CPU (tests, debugging): select its CPU accelerator, skip building its shared-memory all-reduce
    op (a ~45 s C++ compile on first use that only speeds up CPU collectives), initialise its comm over gloo."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    # importlib, not `import deepspeed.comm.torch`: that attribute path resolves to the torch package itself.
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    if in_distributed_run():
        # accelerate's CPU path sets up torch.distributed but not DeepSpeed's own comm layer, so ZeRO-3's
        # partitioned init would see a world of 1; initialise it here, over gloo.
        deepspeed.init_distributed(dist_backend="gloo")


def relaunch_command(recipe_path: str, argv: list[str], recipe: Recipe) -> list[str]:
    d = recipe.distributed
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={d.nproc_per_node}",
            f"--nnodes={d.nnodes}", f"--node_rank={d.node_rank}", f"--master_addr={d.master_addr}",
            f"--master_port={d.master_port}", "-m", "lora_manip.cli", "train", recipe_path, *argv]


def relaunch(recipe_path: str, argv: list[str], recipe: Recipe) -> int:
    cmd = relaunch_command(recipe_path, argv, recipe)
    log.info("launching %d process(es) per node: %s", recipe.distributed.nproc_per_node, " ".join(cmd))
    env = dict(os.environ)
    if not _cuda():
        env.setdefault("DS_ACCELERATOR", "cpu")
    return subprocess.call(cmd, env=env)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
