"""Several nodes from the README's command: `lora-manip train RECIPE` on every node, one shared output folder. Two
"nodes" on this host (gloo, one process each): node 0 prepares and locks the run, node 1 joins it, and the run is
one run (one run.json, one final adapter), started once with node_rank 0/1 and once from SLURM's variables."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from lora_manip.errors import UserError
from lora_manip.train.launch import apply_slurm, first_host, relaunch_command

from ..conftest import ROOT, free_port, tiny_recipe_dict

CLEAN = {k: v for k, v in os.environ.items()
         if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LORA_MANIP_LAUNCH") and not k.startswith("SLURM_")}


def two_node_recipe(tmp_path, model_dir, data_dir):
    raw = tiny_recipe_dict(model_dir, data_dir, tmp_path / "run")
    raw["train"].update({"per_device_batch_size": 2, "max_steps": 2, "save_steps": 2})
    raw["distributed"] = {"nproc_per_node": 1, "master_port": free_port()}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def run_nodes(recipe, envs, args):
    """Both nodes' `lora-manip train`, started together; their (exit code, output)."""
    procs = [subprocess.Popen([sys.executable, "-m", "lora_manip.cli", "train", str(recipe), *a], cwd=ROOT,
                              env={**CLEAN, **e}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for e, a in zip(envs, args)]
    try:
        outs = [p.communicate(timeout=400)[0] for p in procs]
        return [(p.returncode, out) for p, out in zip(procs, outs)]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def assert_one_run(run, results):
    for code, out in results:
        assert code == 0, out[-4000:]
    assert len(results) == 2
    assert json.loads((run / "run.json").read_text())["command"] == "train"
    assert (run / "run_complete.json").is_file()
    assert (run / "adapter_model.safetensors").is_file()
    assert (run / "checkpoint-2" / "checkpoint_complete").is_file()
    leftovers = [p.name for p in run.parent.iterdir() if p.name.startswith(".run")]
    assert not leftovers and not (run / ".launch.json").exists()
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2]  # one run, not two runs writing one log


def test_two_nodes_from_node_rank(tiny_model_dir, synth_dir, tmp_path):
    recipe = two_node_recipe(tmp_path, tiny_model_dir, synth_dir)
    results = run_nodes(recipe, [{}, {}], [["--set", "distributed.nnodes=2"],
                                           ["--set", "distributed.nnodes=2", "--set", "distributed.node_rank=1"]])
    assert_one_run(tmp_path / "run", results)
    assert "waiting for node 0" in results[1][1]


def test_two_nodes_from_slurm(tiny_model_dir, synth_dir, tmp_path):
    recipe = two_node_recipe(tmp_path, tiny_model_dir, synth_dir)
    slurm = {"SLURM_JOB_ID": str(os.getpid()) + tmp_path.name[-4:], "SLURM_NNODES": "2",
             "SLURM_JOB_NODELIST": "localhost"}
    results = run_nodes(recipe, [{**slurm, "SLURM_NODEID": "0"}, {**slurm, "SLURM_NODEID": "1"}], [[], []])
    assert_one_run(tmp_path / "run", results)


def test_node_without_node0_times_out_with_a_clear_message(tiny_model_dir, synth_dir, tmp_path, monkeypatch):
    from lora_manip.train import run_folder

    monkeypatch.setattr(run_folder, "JOIN_WAIT_S", 0.5)
    (tmp_path / "run").mkdir()
    with pytest.raises(UserError, match="node 0 did not prepare .* file system every node shares"):
        run_folder.join_launch(tmp_path / "run", "launch-x", 1, timeout=0.5)


@pytest.mark.parametrize("nodelist, host", [("gpu[01-04,07]", "gpu01"), ("gpu07", "gpu07"), ("a-1[003-9],b2", "a-1003"),
                                             ("n[9,10]", "n9"), ("x1,x2", "x1")])
def test_first_host_of_a_slurm_node_list(nodelist, host):
    assert first_host(nodelist) == host


def test_slurm_fills_the_nodes_and_refuses_another_count(tmp_path, monkeypatch, tiny_model_dir, synth_dir):
    from lora_manip.recipe import Recipe

    raw = tiny_recipe_dict(tiny_model_dir, synth_dir, tmp_path / "run")
    for k, v in {"SLURM_JOB_ID": "7", "SLURM_NNODES": "4", "SLURM_NODEID": "2",
                 "SLURM_JOB_NODELIST": "gpu[01-04]"}.items():
        monkeypatch.setenv(k, v)
    r = Recipe.model_validate({**raw, "distributed": {"nproc_per_node": 8}})
    apply_slurm(r)
    assert (r.distributed.nnodes, r.distributed.node_rank, r.distributed.rdzv_endpoint) == (4, 2, "gpu01:29500")
    cmd = " ".join(relaunch_command("r.yaml", [], r))
    assert "--rdzv_backend=c10d" in cmd and "--rdzv_endpoint=gpu01:29500" in cmd and "--rdzv_id=slurm-7-0" in cmd
    assert "--node_rank=2" in cmd and "is_host=0" in cmd and "SIGUSR1" in cmd
    with pytest.raises(UserError, match="distributed.nnodes is 2 but this SLURM step runs on 4 nodes"):
        apply_slurm(Recipe.model_validate({**raw, "distributed": {"nnodes": 2}}))


@pytest.mark.parametrize("outcome", ["finished", "refused", "preempted"])
def test_a_process_of_a_distributed_run_closes_its_process_group(outcome, tmp_path, monkeypatch, tiny_model_dir,
                                                                  synth_dir):
    """A process torch left its gloo group to at exit could abort after the run was saved (SIGABRT: torchrun
    called the finished run failed, and CI saw it once): every ending of a process's `train` closes the group."""
    import torch.distributed as dist

    from lora_manip.train import callbacks, launch, run_folder, workflow

    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe_dict(tiny_model_dir, synth_dir, tmp_path / "run")))
    for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(run_folder, "role", lambda recipe: type("R", (), {"launched": False})())

    def run_training(recipe, overwrite, resume):
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
        if outcome == "refused":
            raise UserError("refused")
        if outcome == "preempted":
            raise callbacks.Preempted("stopped")
        return tmp_path / "run"

    monkeypatch.setattr(workflow, "run_training", run_training)
    try:
        if outcome == "refused":
            with pytest.raises(UserError):
                launch.launch_training(path, [])
        else:
            code, _ = launch.launch_training(path, [])
            assert code == (0 if outcome == "finished" else run_folder.PREEMPTED_EXIT)
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.parametrize("distributed", [True, False])
def test_a_process_of_a_distributed_run_exits_without_the_interpreters_teardown(distributed, tmp_path):
    """torch's teardown at exit aborted (SIGABRT) node 1's process of a finished two-node run in CI even with its
    process group closed: a torchrun-started `train` prints its result and leaves with its exit code at once;
    anything else exits as usual (here: an atexit handler shows which way the process left)."""
    script = ("import atexit, pathlib\n"
              f"atexit.register(lambda: pathlib.Path({str(tmp_path / 'teardown')!r}).write_text('ran'))\n"
              "from lora_manip.train.launch import finish\n"
              "raise SystemExit(finish(75, 'preempted: saved'))\n")
    env = {**CLEAN, **({"RANK": "1", "LOCAL_RANK": "0", "WORLD_SIZE": "2"} if distributed else {})}
    p = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 75 and p.stdout == "preempted: saved\n", p.stderr
    assert (tmp_path / "teardown").exists() != distributed
