"""Checks before training that need no model and no data: the model source exists, devices and optional packages
are there. They run once per run: in the process the user started, and not again in the processes launch.py starts
from it, which prove who started them (run_folder.role: a token, not an environment variable that may be
inherited); those only set up what every process needs for itself, DeepSpeed on CPU.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

from ..errors import UserError
from ..recipe import Recipe

log = logging.getLogger(__name__)


# First components that name a local folder, not a hub organisation (`runs/tiny-llava-ov` on a fresh clone).
_LOCAL_ROOTS = {"runs", "run", "outputs", "output", "out", "models", "model", "checkpoints", "checkpoint", "ckpt",
                "ckpts", "data", "tmp", "exp", "experiments", "work", "results", "weights", "saves"}


def looks_local(path: str) -> bool:
    """A path no one would mean as a hub id (org/name): absolute, ./ ../ ~, more than one /, a first component
    that is a folder here or a usual local folder name (runs/, outputs/, checkpoints/...)."""
    p = path.strip()
    first = p.split("/")[0]
    return (os.path.isabs(p) or p.startswith((".", "~")) or p.count("/") != 1 or "\\" in p
            or first.lower() in _LOCAL_ROOTS or os.path.isdir(first))


def check_model_source(recipe: Recipe) -> None:
    """A model.path that is no local folder and no cached hub model is refused here, naming the folder and how to
    create the demo's, instead of after a minute of hub retries ending in a connection error."""
    from ..hub import HUB_ID, local_folder

    path, m = recipe.model.path, recipe.model
    if m.create_tiny_if_missing or local_folder(path) is not None:
        return
    create = (f"for the offline demo create it with `lora-manip tiny-model {path}` (or set "
              "model.create_tiny_if_missing: true)")
    if Path(path).expanduser().exists():
        raise UserError(f"model.path {path} is not a folder; point it at a checkpoint folder or a hub id")
    if looks_local(path) or not HUB_ID.match(path):
        raise UserError(f"model.path {path} does not exist (no such local folder); {create}, or point model.path at "
                        "a checkpoint "
                        "folder or a hub id like llava-hf/llava-onevision-qwen2-7b-ov-hf")
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise UserError(f"model.path {path} does not exist locally, and is not in the local Hugging Face cache "
                        f"(HF_HUB_OFFLINE is set, so the hub is not asked); {create}, or download it first "
                        "(huggingface-cli download)")


def preflight(recipe: Recipe) -> None:
    """Everything that can be refused before data or model are touched, then this process's DeepSpeed setup."""
    import torch

    from .run_folder import role

    if not role(recipe).launched:  # the launcher that started this process ran them
        check_run(recipe)
    if recipe.distributed.deepspeed and not torch.cuda.is_available():
        configure_cpu_deepspeed()


def check_run(recipe: Recipe) -> None:
    import torch

    from ..model.load import require_bitsandbytes, resolve_attention

    from .build import reporters

    check_model_source(recipe)
    resolve_attention(recipe.model.attn_implementation)
    reporters(recipe.train.report_to)  # a logger asked for but missing fails now, not after hours unlogged
    n = recipe.distributed.nproc_per_node
    if torch.cuda.is_available() and n > torch.cuda.device_count():
        raise UserError(f"distributed.nproc_per_node: {n} processes but this machine has "
                        f"{torch.cuda.device_count()} GPU(s)")
    if not torch.cuda.is_available() and n > 1:
        log.warning("no CUDA GPU: running %d CPU processes over gloo (a correctness check, not a speed-up)", n)
    if recipe.method == "qlora":
        require_bitsandbytes()
    if recipe.distributed.deepspeed and importlib.util.find_spec("deepspeed") is None:
        raise UserError("distributed.deepspeed is set but deepspeed is not installed (pip install deepspeed)")


def configure_cpu_deepspeed() -> None:
    """DeepSpeed on CPU (tests, debugging): select its CPU accelerator, skip building its shared-memory all-reduce
    op (a ~45 s C++ compile on first use that only speeds up CPU collectives), initialise its comm over gloo."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    # importlib, not `import deepspeed.comm.torch`: that attribute path resolves to the torch package itself.
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    from .run_folder import in_distributed_run

    if in_distributed_run():
        # accelerate's CPU path sets up torch.distributed but not DeepSpeed's own comm layer, so ZeRO-3's
        # partitioned init would see a world of 1; initialise it here, over gloo.
        deepspeed.init_distributed(dist_backend="gloo")
