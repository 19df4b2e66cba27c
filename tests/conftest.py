"""Shared fixtures: tiny LLaVA-OneVision checkpoints laid out as the llava-hf hub folders (one with the hub's
list-content template, one with lmms-lab's string ChatML) and one small synthetic data set per test session."""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# the scan cache of this test session only (a user's ~/.cache stays untouched)
os.environ.setdefault("LORA_MANIP_CACHE", tempfile.mkdtemp(prefix="lora-manip-cache-"))
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")
# Each pytest-xdist worker gets its share of the cores for torch's thread pools (and the processes it starts
# inherit it): two workers each running torch with all cores' threads oversubscribe them, and small CPU matmuls then
# spin and wait; on the 2-core CI machine the suite took 14 minutes that way and under 9 with one thread per worker.
# A value the user exported is kept. Set before torch is first imported (the pools read it once).
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    _share = str(max(1, _cores // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, _share)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from lora_manip.model.tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def chatml_model_dir(tmp_path_factory):
    """The same tiny model with lmms-lab's string-content ChatML template (the other style users bring)."""
    from lora_manip.model.tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("models") / "tiny-chatml", template="chatml")


@pytest.fixture(scope="session")
def processor(tiny_model_dir):
    from lora_manip.data.processor import load_processor

    return load_processor(tiny_model_dir)


@pytest.fixture(scope="session")
def chatml_processor(chatml_model_dir):
    from lora_manip.data.processor import load_processor

    return load_processor(chatml_model_dir)


@pytest.fixture(params=["hub", "chatml"])
def any_processor(request):
    """Both template styles: the llava-hf list-content template and lmms-lab's string ChatML."""
    return request.getfixturevalue("processor" if request.param == "hub" else "chatml_processor")


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory):
    from lora_manip.data.synth import write_synth_dataset

    out = tmp_path_factory.mktemp("data") / "synth"
    write_synth_dataset(out, n=48, seed=1)
    return out


def write_two_images(root) -> None:
    """root/img/a.png (320x180, DROID-like) and root/img/b.png (640x480, RH20T-like) for hand-written records."""
    from PIL import Image

    (root / "img").mkdir()
    Image.new("RGB", (320, 180), (255, 0, 0)).save(root / "img/a.png")
    Image.new("RGB", (640, 480), (0, 255, 0)).save(root / "img/b.png")


def assert_ids_match_processor(processor, samples, system_prompt) -> None:
    """encode() must expand images and tokenise exactly as the processor does on the rendered conversation."""
    from PIL import Image

    from lora_manip.data.encode import Chat, encode, render, with_system

    for s in samples:
        images = [Image.open(p).convert("RGB") for p in s.images]
        enc = encode(s, Chat(processor, system_prompt), [im.size for im in images])
        full = render(processor, with_system(s.messages, system_prompt))
        ref = processor(text=[full], images=[images] if images else None, return_tensors="pt")
        assert ref["input_ids"][0].tolist() == enc["input_ids"], s.id


def tiny_recipe_dict(model_dir, data_dir, out_dir, **over) -> dict:
    """The demo recipe pointed at the session's tiny model and data, shortened for tests."""
    raw = {
        "model": {"path": str(model_dir), "dtype": "float32"},
        "method": "lora",
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "parts": {"language_model": {"lr": 5e-3}, "projector": {"lr": 5e-3}},
        "data": {"train": [{"annotation_path": str(data_dir / "train.json"), "data_path": str(data_dir)}],
                 "model_max_length": 4096},
        "train": {"output_dir": str(out_dir), "per_device_batch_size": 4, "max_steps": 3, "logging_steps": 1,
                  "save_steps": 100, "seed": 0, "warmup_ratio": 0.0},
    }
    for key, value in over.items():
        node = raw
        *path, last = key.split("__")
        for k in path:
            node = node.setdefault(k, {})
        node[last] = value
    if raw["method"] == "full" and "lora" not in {k.split("__")[0] for k in over}:
        del raw["lora"]  # the schema refuses a lora block that method: full would not read
    return raw


def saved_run_recipe(**over) -> str:
    """recipe.yaml as a training run leaves it in its folder (a complete recipe: eval and merge read it back typed),
    with `over` as in tiny_recipe_dict; a key it leaves out (data.system_prompt) is not spelt out in the file."""
    import yaml

    return yaml.safe_dump(tiny_recipe_dict(Path("model"), Path("data"), Path("run"), **over), sort_keys=False)


def free_port() -> int:
    """A port free now, for a run's rendezvous: never a fixed number, which a second CI run on the host (or a
    process an earlier failure left) would hold."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_two_processes(tmp_path, data_dir, model_dir, train=None, **over):
    """`lora-manip train` with ZeRO-3 over 2 CPU processes (gloo): the 8-GPU recipe's code path. Returns the run."""
    import subprocess
    import sys

    import yaml

    recipe = tmp_path / "recipe.yaml"
    raw = tiny_recipe_dict(model_dir, data_dir, tmp_path / "run", **over)
    raw["distributed"] = {"nproc_per_node": 2, "deepspeed": str(ROOT / "recipes" / "zero3.json"),
                          "master_port": free_port()}
    raw["train"].update({"per_device_batch_size": 2, "max_steps": 2, "save_steps": 2, **(train or {})})
    recipe.write_text(yaml.safe_dump(raw))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    proc = subprocess.run([sys.executable, "-m", "lora_manip.cli", "train", str(recipe)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return tmp_path / "run"


@pytest.fixture(scope="session")
def zero3_lora_run(tiny_model_dir, synth_dir, tmp_path_factory):
    """One 2-process ZeRO-3 LoRA run that three tests read (a multi-process run costs half a minute or more):
    test_conformance the case that died with a gloo collective mismatch (half the training records text-only,
    batch 1: one process gets an image batch while the other gets a text-only one), test_train what it saves (a
    checkpoint at step 4, the final adapter), test_train_eval its evals (5 validation samples generated and scored
    at steps 2 and 4, the best kept). Made once per test session: under pytest-xdist the first worker to need it
    trains under a lock in the session's shared folder and the others wait for it and read the same run."""
    import fcntl
    import json

    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # pytest-N/: this session's workers
    with open(shared / "zero3-lora.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        made = shared / "zero3-lora.done"
        if made.is_file():
            return Path(made.read_text())
        tmp = tmp_path_factory.mktemp("zero3-lora")
        records = json.loads((synth_dir / "train.json").read_text())[:16]
        for r in records[::2]:
            r.pop("images", None)
            r.pop("image", None)
            for turn in r["conversations"]:
                turn["value"] = turn["value"].replace("<image>\n", "").replace("<image>", "")
        mixed = tmp / "mixed"
        mixed.mkdir()
        (mixed / "train.json").write_text(json.dumps(records))
        (mixed / "images").symlink_to(synth_dir / "images")
        data = {"train": [{"annotation_path": str(mixed / "train.json"), "data_path": str(mixed)}],
                "val": [{"annotation_path": str(synth_dir / "val.json"), "data_path": str(synth_dir)}],
                "model_max_length": 4096}
        run = train_two_processes(tmp, mixed, tiny_model_dir, data=data, train={
            "per_device_batch_size": 1, "max_steps": 4, "save_steps": 4, "eval_steps": 2, "eval_limit": 5,
            "eval_max_new_tokens": 8, "best_metric": "choice.accuracy", "save_total_limit": 1})
        made.write_text(str(run))
        return run


# Folders whose every test is slow (the learning proofs, the end-to-end runs through real processes): `pytest -m "not
# slow"` is the developer's fast set; CI and the README's test command run everything.
SLOW_FOLDERS = ("proofs", "e2e")


# `-n 2 --dist loadfile --no-loadscope-reorder` (pyproject's addopts; xdist would otherwise hand out the files with
# the most tests first): a file's tests stay on one worker, so a module fixture (the demo run,
# a merge) is built once. Not loadgroup: with pytest 9.2 its groups are silently ignored (xdist 3.8 renames the
# test ids through a field pytest no longer reads), so the demo could be built on both workers.
# The learning proofs (the demo run and GRPO on it: ~7 of the suite's ~18 worker-minutes, in one file) come first, so
# one worker starts them at once while the other works through the rest; collected last, they ran alone at the end.
FIRST_FOLDERS = ("proofs",)


def pytest_collection_modifyitems(config, items):
    folder = {}
    for item in items:
        rel = Path(str(item.fspath)).resolve().relative_to(ROOT / "tests")
        folder[item.nodeid] = rel.parts[0]
        if rel.parts[0] in SLOW_FOLDERS:
            item.add_marker(pytest.mark.slow)
    items.sort(key=lambda item: folder[item.nodeid] not in FIRST_FOLDERS)  # stable: the rest keep their order
