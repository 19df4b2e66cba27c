"""Preemption: SIGTERM (or SLURM's SIGUSR1) saves a checkpoint at the next step boundary and exits with
PREEMPTED_EXIT; `--resume auto` then continues to the adapter an uninterrupted run makes. Also --resume auto on an
empty and on a finished folder, and an --overwrite whose start is refused putting the old run back."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from lora_manip.train.run_folder import PREEMPTED_EXIT

from ..conftest import ROOT, free_port, tiny_recipe_dict
from .test_multinode import CLEAN

STEPS = 12


def recipe_file(tmp_path, model_dir, data_dir, name, nproc=2):
    raw = tiny_recipe_dict(model_dir, data_dir, tmp_path / name)
    raw["train"].update({"per_device_batch_size": 1, "max_steps": STEPS, "save_steps": 100})
    raw["distributed"] = {"nproc_per_node": nproc, "master_port": free_port()}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def train(recipe, *args, **kw):
    return subprocess.run([sys.executable, "-m", "lora_manip.cli", "train", str(recipe), *args], cwd=ROOT, env=CLEAN,
                          capture_output=True, text=True, timeout=600, **kw)


def tensors(run):
    from safetensors.torch import load_file

    return load_file(str(run / "adapter_model.safetensors"))


def test_sigterm_saves_and_resume_auto_ends_where_an_uninterrupted_run_ends(tiny_model_dir, synth_dir, tmp_path):
    ref = recipe_file(tmp_path, tiny_model_dir, synth_dir, "ref")
    done = train(ref, "--resume", "auto")  # an empty folder: a fresh run
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    again = train(ref, "--resume", "auto")
    assert again.returncode == 0 and "already complete" in again.stdout, again.stdout + again.stderr

    cut = recipe_file(tmp_path, tiny_model_dir, synth_dir, "cut")
    cut.write_text(cut.read_text().replace(str(tmp_path / "cut"), str(tmp_path / "ref2")))
    run = tmp_path / "ref2"
    p = subprocess.Popen([sys.executable, "-m", "lora_manip.cli", "train", str(cut)], cwd=ROOT, env=CLEAN,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = run / "train_log.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and p.poll() is None:
        if log.is_file() and any(json.loads(line).get("step", 0) >= 2 for line in log.read_text().splitlines()):
            p.send_signal(signal.SIGTERM)  # to the launcher: it forwards to torchrun, which tells both processes
            break
        time.sleep(0.05)
    out = p.communicate(timeout=300)[0]
    assert p.returncode == PREEMPTED_EXIT, out[-4000:]
    saved = [c for c in run.glob("checkpoint-*") if (c / "checkpoint_complete").is_file()]
    assert len(saved) == 1 and int(saved[0].name.split("-")[1]) < STEPS, out[-4000:]
    assert not (run / "run_complete.json").exists() and not (run / ".launch.json").exists()

    resumed = train(cut, "--resume", "auto")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    a, b = tensors(tmp_path / "ref"), tensors(run)
    assert a.keys() == b.keys()
    for k in a:  # same data order, optimizer, scheduler and RNG state: the same arithmetic, bit for bit
        assert a[k].equal(b[k]), k


def test_overwrite_refused_later_puts_the_old_run_back(tiny_model_dir, synth_dir, tmp_path):
    ok = recipe_file(tmp_path, tiny_model_dir, synth_dir, "run", nproc=1)
    ok.write_text(ok.read_text().replace(f"max_steps: {STEPS}", "max_steps: 1"))
    assert train(ok).returncode == 0
    before = sorted(p.name for p in (tmp_path / "run").iterdir())
    bad = tmp_path / "bad.json"
    bad.write_text("[{\"id\": 1, \"conversations\": 5}]")
    refused = train(ok, "--overwrite", "--set", f"data.train.0.annotation_path={bad}")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-2000:]
    assert "set aside" in refused.stderr and "put the previous run back" in refused.stderr
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == before  # the old run, whole, in its place
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".run.")]


def test_auto_without_resume_is_refused_before_anything_happens(tiny_model_dir, synth_dir, tmp_path):
    """`auto` is read only after --resume (in either order); alone after the recipe it is a one-line error, not a
    silent `--resume auto`, and the output folder is not created."""
    from typer.testing import CliRunner

    from lora_manip.cli import app

    recipe = recipe_file(tmp_path, tiny_model_dir, synth_dir, "stray", nproc=1)
    res = CliRunner().invoke(app, ["train", str(recipe), "auto"])
    assert res.exit_code == 2 and "unexpected argument 'auto'" in res.output and "--resume auto" in res.output
    assert not (tmp_path / "stray").exists()
    res = CliRunner().invoke(app, ["train", "--resume", "auto", str(recipe), "--dry-run"])
    assert res.exit_code == 0, res.output  # the other order still means --resume auto


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has stopped
    except (FileNotFoundError, ProcessLookupError):
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_a_launcher_killed_hard_stops_the_processes_it_started(tmp_path):
    """kill -9 (or the OOM killer) on `lora-manip train`'s launcher: torchrun, in a session of its own, must not
    train on without it; it gets SIGTERM (which it forwards: the processes save and stop). A stand-in torchrun
    here: a process that records its pid and sleeps."""
    pidfile = tmp_path / "child.pid"
    sleeper = f"import os, time; open({str(pidfile)!r}, 'w').write(str(os.getpid())); time.sleep(120)"
    script = tmp_path / "launcher.py"
    script.write_text(
        "import sys, types\n"
        "from lora_manip.train import launch\n"
        f"launch.relaunch_command = lambda *a: [sys.executable, '-c', {sleeper!r}]\n"
        "d = types.SimpleNamespace(nproc_per_node=2, node_rank=0, nnodes=1)\n"
        "launch.relaunch('r.yaml', [], types.SimpleNamespace(distributed=d), {})\n")
    launcher = subprocess.Popen([sys.executable, str(script)], cwd=ROOT, env=CLEAN)
    child = None
    try:
        deadline = time.monotonic() + 120
        while not (pidfile.is_file() and pidfile.read_text()) and time.monotonic() < deadline:
            time.sleep(0.05)
        child = int(pidfile.read_text())
        launcher.kill()
        launcher.wait(timeout=60)
        deadline = time.monotonic() + 20
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(child), "the launcher's torchrun runs on after the launcher was killed"
    finally:
        launcher.kill()
        if child is not None and _alive(child):
            os.kill(child, signal.SIGKILL)
