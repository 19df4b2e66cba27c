"""Training logs that outlive the terminal: train_log.jsonl (one line per log event) and a loss-curve PNG; and the
stop on SIGTERM / SIGUSR1 that saves a checkpoint first (preemption, docs/training.md "Preemption")."""

from __future__ import annotations

import io
import json
import signal
from pathlib import Path

import torch
from transformers import TrainerCallback

from ..fsutil import atomic_write_bytes


class JsonlLogCallback(TrainerCallback):
    def __init__(self, path: Path):
        self.path = Path(path)

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        # The groups of the optimizer that really trains (under DeepSpeed: the one its engine wraps), so the
        # per-part learning rates can be checked after the fact.
        if state.is_world_process_zero and optimizer is not None:
            groups = [{"group_name": g.get("group_name"), "lr": g.get("initial_lr", g["lr"]),
                       "weight_decay": g["weight_decay"]}
                      for g in optimizer.param_groups]
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps({"step": state.global_step, "optimizer_groups": groups}) + "\n")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as f:  # append-only log: a crash loses at most one line
                f.write(json.dumps({"step": state.global_step, **logs}) + "\n")


class Preempted(Exception):
    """The run was asked to stop (SIGTERM / SIGUSR1) and saved a checkpoint to resume from."""


class PreemptionCallback(TrainerCallback):
    """SIGTERM or SIGUSR1 (SLURM's warning before a time limit) while training: finish the step, save a checkpoint
    there, stop (Preempted; the command exits with run_folder.PREEMPTED_EXIT). Every process stops at the same step:
    the flag is agreed over the process group at each step end (one scalar), so a signal that reaches the processes
    at different steps cannot leave one waiting in a collective for the others."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.asked = self.stopping = False
        self._previous: dict = {}

    def _ask(self, signum, frame) -> None:
        self.asked = True

    def on_train_begin(self, args, state, control, **kwargs):
        import threading

        if threading.current_thread() is threading.main_thread():  # signal handlers can only be set there
            self._previous = {s: signal.signal(s, self._ask) for s in self.SIGNALS}

    def on_train_end(self, args, state, control, **kwargs):
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous = {}

    def on_step_end(self, args, state, control, **kwargs):
        asked = self.asked
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            flag = torch.tensor([float(asked)], device=args.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            asked = bool(flag.item())
        if asked:
            self.stopping = control.should_save = control.should_training_stop = True

    def on_save(self, args, state, control, **kwargs):
        if self.stopping:  # the checkpoint is written and marked complete (trainer._save_checkpoint)
            self.on_train_end(args, state, control)
            raise Preempted(f"stopped by a signal at step {state.global_step}; the checkpoint is saved: continue "
                            "with `lora-manip train RECIPE --resume auto`")


def part_lrs_and_memory(optimizer, learning_rate: float | None = None) -> dict:
    """What both trainers add to each training log line: the learning rate of every part (`lr/<part>`) and the
    peak memory so far (`peak_mem_gb`: allocated CUDA memory on a GPU, else the process's peak resident size).

    `learning_rate` is the rate transformers logs on the same line: the first group's rate for the step just taken,
    read before the scheduler stepped (under DeepSpeed, after: its engine steps both). By the time the line is
    logged the groups already hold the next step's rates, so each part's rate is that one scaled by the part's
    initial rate over the first group's: the scheduler multiplies every group by one factor (train/optim.py), so
    this is the rate the part trained with at that step, whatever the scheduler and backend."""
    groups = optimizer.param_groups
    scale = None
    if learning_rate is not None and groups and groups[0].get("initial_lr"):
        scale = learning_rate / groups[0]["initial_lr"]
    out = {f"lr/{g['group_name']}": g["lr"] if scale is None or "initial_lr" not in g else g["initial_lr"] * scale
           for g in groups if g.get("group_name") and not g["group_name"].endswith("/no_decay")}
    if torch.cuda.is_available():
        out["peak_mem_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    else:
        import resource

        out["peak_mem_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)  # KiB on Linux
    return out


def plot_loss(log_path: Path, png_path: Path, key: str = "loss", title: str = "training loss") -> Path | None:
    """A plain PIL line plot of training loss (or another logged `key`) over steps (no matplotlib dependency)."""
    from PIL import Image, ImageDraw

    if not Path(log_path).exists():
        return None
    pts = [(r["step"], r[key]) for r in map(json.loads, Path(log_path).read_text().splitlines())
           if isinstance(r.get(key), (int, float))]
    if len(pts) < 2:
        return None
    w, h, m = 640, 360, 48
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    sx = (w - 2 * m) / max(x1 - x0, 1)
    sy = (h - 2 * m) / max(y1 - y0, 1e-9)
    line = [(m + (x - x0) * sx, h - m - (y - y0) * sy) for x, y in pts]
    d.rectangle([m, m, w - m, h - m], outline="black")
    d.line(line, fill=(31, 119, 180), width=2)
    d.text((m, 10), f"{title}: {ys[0]:.3f} -> {ys[-1]:.3f} over {x1} steps", fill="black")
    d.text((4, m - 4), f"{y1:.2f}", fill="black")
    d.text((4, h - m - 8), f"{y0:.2f}", fill="black")
    d.text((w - m - 20, h - m + 6), f"step {x1}", fill="black")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    atomic_write_bytes(png_path, buf.getvalue())
    return Path(png_path)


def plot_reward(log_path: Path, png_path: Path) -> Path | None:
    """GRPO: the mean reward of the training rollouts over steps (TRL logs it as `reward`), beside loss.png."""
    return plot_loss(log_path, png_path, key="reward", title="mean reward (GRPO rollouts)")
