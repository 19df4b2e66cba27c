"""`lora-manip train` from the command line to the end of the run: load the recipe, then print the plan (--dry-run),
train in this process, or start the processes that train.

With `distributed.nproc_per_node * nnodes > 1`, started outside a distributed run, the command re-executes itself
under `torch.distributed.run` with the recipe's process and node settings. The launcher checks the run (preflight),
prepares the output folder and the demo inputs once, holding the folder's lock for the whole run, and writes a
per-run token into the folder that it also hands to the processes it starts; a process skips what the launcher did
only when its token matches the folder's (run_folder.role). Started under torchrun or the deepspeed launcher by
hand (they set RANK / LOCAL_RANK / WORLD_SIZE) it trains, rank 0 preparing the folder for the others.

Several nodes (docs/training.md, "Several nodes"): the same command on every node. Node 0's launcher prepares and
locks the run; the others neither prepare, lock nor refuse: they wait for node 0's launch file naming this launch
(run_folder.join_launch) and start their processes with its token. The nodes meet at a c10d rendezvous. Inside an
srun step the node count, this node's rank, the rendezvous host (the job's first node) and the launch's name come
from SLURM_*, so `srun lora-manip train RECIPE` needs no flags.

Preemption: SIGTERM / SIGUSR1 to the launcher are forwarded to torchrun, which hands them to its processes
(--signals_to_handle); they save a checkpoint at the next step boundary and stop (callbacks.PreemptionCallback), and
the command exits with run_folder.PREEMPTED_EXIT.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import subprocess
import sys

from ..errors import UserError
from ..recipe import Recipe, load_recipe
from .preflight import preflight
from .run_folder import PREEMPTED_EXIT, in_distributed_run, run_dir

log = logging.getLogger(__name__)

FORWARDED = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
SHUTDOWN_TIMEOUT_S = 900  # torchrun's wait for its processes to save and stop on a signal before it kills them


def launch_training(recipe_path: str | os.PathLike, overrides: list[str], overwrite: bool = False,
                    resume: bool | str = False, dry_run: bool = False,
                    max_restarts: int | None = None) -> tuple[int, str]:
    """(exit code, what to print) of `lora-manip train RECIPE [--set ...]`. resume: False / None, True / "last"
    (the newest complete checkpoint) or "auto"."""
    if resume not in (None, False, True, "last", "auto"):
        raise UserError(f"--resume takes `auto` or no value, not {resume!r}")
    resume = "auto" if resume == "auto" else resume not in (None, False)
    recipe = load_recipe(recipe_path, overrides)
    apply_slurm(recipe)
    if max_restarts is not None:
        recipe.distributed.max_restarts = max_restarts
    if dry_run:
        from .plan import describe_plan

        return describe_plan(recipe)
    out = run_dir(recipe)  # resolved once: the kit and the Trainer write to the same folder
    d = recipe.distributed
    started = in_distributed_run()
    if started:
        from .run_folder import resumable, role

        r = role(recipe)
        if r.launched:
            resume = r.resume  # the preparing process read the folder (--resume auto) for everyone
        if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") not in ("", "0"):
            resume = resumable(out)  # torchrun restarted the processes: continue from the newest checkpoint
    if resume == "auto" and not (d.node_rank > 0 and not started):
        from .run_folder import resume_auto

        state = resume_auto(recipe)
        if state == "done":
            return 0, f"{out}: the run is already complete; nothing to do"
        overwrite, resume = state == "restart", state == "resume"
        log.info("--resume auto: %s", {"fresh": "starting a new run", "resume": "continuing the newest checkpoint",
                                        "restart": "starting again (no complete checkpoint)"}[state])
    if d.nproc_per_node * d.nnodes > 1 and not started:
        code = launch_processes(recipe_path, overrides, recipe, overwrite, resume)
        return code, (f"preempted: a checkpoint is saved in {out}; continue with --resume auto"
                      if code == PREEMPTED_EXIT else "")
    from .callbacks import Preempted
    from .workflow import run_training

    try:
        return 0, f"saved to {run_training(recipe, overwrite=overwrite, resume=bool(resume))}"
    except Preempted as e:
        return PREEMPTED_EXIT, f"preempted: {e}"
    finally:
        if started:
            close_process_group()


def finish(code: int, message: str) -> int:
    """Print what `train` says and return its exit code; a process of a distributed run (started by torchrun)
    instead exits here, at once, once its output is flushed. Its work is saved and its process group closed, but
    torch's teardown at interpreter exit can still abort it (SIGABRT, "terminate called without an active
    exception": seen in CI on the second node of a c10d rendezvous after destroy_process_group), and torchrun then
    fails a finished run. Nothing the kit needs runs after this point: the run is saved and marked, the loggers are
    closed by the Trainer (on_train_end), and logging is flushed here."""
    if message:
        print(message)
    if in_distributed_run():
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def close_process_group() -> None:
    """Tear down the process group (the Trainer's, or DeepSpeed's) while Python is fully alive, finished or failed.
    torch does not do it at exit: gloo's worker threads can then outlive the interpreter and abort a process that
    has saved everything (SIGABRT, "terminate called without an active exception"), so torchrun reports a failed
    run, and a refusal's exit 2 becomes -6. pytorch/pytorch#179291 proposed an atexit hook in torch and was closed."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------- SLURM


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list (`gpu[01-04,07],cpu3` -> gpu01), without scontrol."""
    m = re.match(r"\s*([^,\[\s]+)(?:\[([^\]]*)\])?", nodelist)
    if not m or not m.group(1):
        raise UserError(f"SLURM_JOB_NODELIST={nodelist!r} is not a node list")
    prefix, ranges = m.group(1), m.group(2)
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0].strip()
    if not first.isdigit():
        raise UserError(f"SLURM_JOB_NODELIST={nodelist!r} is not a node list")
    return prefix + first  # the digits keep their zero padding, as SLURM writes host names


def apply_slurm(recipe: Recipe) -> None:
    """Inside an srun step (one task per node): nodes, this node's rank and the rendezvous host from SLURM_*. A
    recipe that names another node count is refused rather than half-followed."""
    env, d = os.environ, recipe.distributed
    if not d.slurm or not all(env.get(k) for k in ("SLURM_JOB_ID", "SLURM_NODEID", "SLURM_JOB_NODELIST")):
        return
    nodes = env.get("SLURM_STEP_NUM_NODES") or env.get("SLURM_NNODES") or "1"
    try:
        nnodes, node_rank = int(nodes), int(env["SLURM_NODEID"])
    except ValueError:
        raise UserError(f"SLURM_NNODES={nodes!r} / SLURM_NODEID={env['SLURM_NODEID']!r} are not numbers") from None
    if nnodes == 1 and d.nnodes == 1:
        return
    if d.nnodes not in (1, nnodes):
        raise UserError(f"distributed.nnodes is {d.nnodes} but this SLURM step runs on {nnodes} nodes; set "
                        f"--set distributed.nnodes={nnodes} (or srun -N {d.nnodes}), or distributed.slurm: false")
    d.nnodes, d.node_rank = nnodes, node_rank
    if not d.rdzv_endpoint:
        d.rdzv_endpoint = f"{first_host(env['SLURM_JOB_NODELIST'])}:{d.master_port}"


def launch_name(recipe: Recipe) -> str:
    """What every node's launcher calls this launch (torchrun's --rdzv_id, the launch file's `launch`)."""
    import hashlib

    env = os.environ
    if env.get("SLURM_JOB_ID"):  # a requeued job restarts: its earlier attempt's launch file is not this one
        return f"slurm-{env['SLURM_JOB_ID']}-{env.get('SLURM_RESTART_COUNT', '0')}"
    key = f"{run_dir(recipe)}|{endpoint(recipe)}|{recipe.distributed.nnodes}"
    return "lora-manip-" + hashlib.sha256(key.encode()).hexdigest()[:16]


def endpoint(recipe: Recipe) -> str:
    d = recipe.distributed
    return d.rdzv_endpoint or f"{d.master_addr}:{d.master_port}"


# ------------------------------------------------------------------------------------------- processes


def launch_processes(recipe_path: str | os.PathLike, overrides: list[str], recipe: Recipe, overwrite: bool,
                     resume: bool | str) -> int:
    """Node 0 (or the only node): check and prepare once, here, then run the recipe's processes under torchrun;
    the other nodes join node 0's launch. Their exit code. A launch whose processes fail before the first checkpoint
    leaves nothing behind (run_folder.undo_start)."""
    from .build import prepare_demo_inputs
    from .run_folder import LAUNCH_ENV, join_launch, new_token, prepare_output_dir, resumable, run_lock, undo_start, \
        write_launch

    preflight(recipe)  # every node: its devices and packages
    out, argv, name = run_dir(recipe), [f"--set={s}" for s in overrides], launch_name(recipe)
    if recipe.distributed.node_rank > 0:
        log.info("node_rank %d: waiting for node 0 to prepare %s (launch %s)", recipe.distributed.node_rank, out, name)
        info = join_launch(out, name, recipe.distributed.node_rank)
        code, signalled = relaunch(str(recipe_path), argv, recipe, {LAUNCH_ENV: info["token"]})
        return PREEMPTED_EXIT if signalled and code != 0 and resumable(out) else code
    with run_lock(recipe):
        run_id = prepare_output_dir(recipe, overwrite, bool(resume))
        prepare_demo_inputs(recipe)  # not racing in every rank
        token = new_token()
        write_launch(out, run_id, token, bool(resume), launch=name)
        code, signalled = relaunch(str(recipe_path), argv, recipe, {LAUNCH_ENV: token})
        if code != 0:
            undo_start(out)
        return PREEMPTED_EXIT if signalled and code != 0 and resumable(out) else code


def relaunch_command(recipe_path: str, argv: list[str], recipe: Recipe) -> list[str]:
    d = recipe.distributed
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={d.nproc_per_node}",
           f"--nnodes={d.nnodes}", f"--max_restarts={d.max_restarts}",
           f"--signals_to_handle={','.join(s.name for s in (*FORWARDED, signal.SIGHUP, signal.SIGQUIT))}",
           f"--shutdown_timeout={SHUTDOWN_TIMEOUT_S}"]
    if d.nnodes > 1:  # the nodes meet at node 0's c10d store
        cmd += ["--rdzv_backend=c10d", f"--rdzv_endpoint={endpoint(recipe)}", f"--rdzv_id={launch_name(recipe)}",
                f"--node_rank={d.node_rank}"]
        if not d.rdzv_endpoint or os.environ.get("SLURM_JOB_ID"):  # the endpoint is node 0's own address
            cmd.append(f"--rdzv_conf=is_host={int(d.node_rank == 0)}")
    else:
        cmd += ["--node_rank=0", f"--master_addr={d.master_addr}", f"--master_port={d.master_port}"]
    return cmd + ["-m", "lora_manip.cli", "train", recipe_path, *argv]


def relaunch(recipe_path: str, argv: list[str], recipe: Recipe, extra_env: dict[str, str]) -> tuple[int, bool]:
    """torchrun's exit code, and whether this launcher was asked to stop (SIGTERM / SIGUSR1 / SIGINT, forwarded to
    torchrun: it runs in a session of its own, so a signal reaches it once, from here, not also from the terminal)."""
    from ..model.load import has_cuda

    cmd = relaunch_command(recipe_path, argv, recipe)
    log.info("launching %d process(es) on node %d of %d: %s", recipe.distributed.nproc_per_node,
             recipe.distributed.node_rank, recipe.distributed.nnodes, " ".join(cmd))
    env = {**os.environ, **extra_env}
    if not has_cuda():
        env.setdefault("DS_ACCELERATOR", "cpu")
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, preexec_fn=stop_with_parent())
    got: list[int] = []

    def forward(signum, frame):
        if signum != signal.SIGINT:  # an interrupt stops the run; it is not a preemption to resume from
            got.append(signum)
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in FORWARDED}
    try:
        return proc.wait(), bool(got)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        if proc.poll() is None:  # leaving on an error: torchrun's processes save and stop, not run on alone
            proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=SHUTDOWN_TIMEOUT_S)


def stop_with_parent():
    """What torchrun runs before it starts (Linux): the kernel sends it SIGTERM when this launcher dies, however it
    dies (kill -9, the OOM killer, a closed terminal): torchrun forwards it, and the processes save and stop
    instead of holding their devices with no launcher to report to. torchrun runs in a session of its own, so
    nothing else would reach it. Elsewhere: None (no such call)."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here: the child only calls it
    parent = os.getpid()
    pr_set_pdeathsig = 1

    def child() -> None:
        prctl(pr_set_pdeathsig, int(signal.SIGTERM))
        if os.getppid() != parent:  # the launcher died before the call: the kernel will not tell us
            os.kill(os.getpid(), signal.SIGTERM)

    return child
