"""Regression corpus of issue 13 ("nothing lost, nothing mixed"): every case is a one-line error with exit code 2
through the CLI (or the guarantee it names), checked one by one. Concurrency and kill -9 use real processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from lora_manip.cli import app

from tests.conftest import tiny_recipe_dict

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def cli(*args) -> tuple[int, str]:
    r = CliRunner().invoke(app, [str(a) for a in args])
    return r.exit_code, r.output


def one_line_error(code: int, out: str, *needles: str) -> None:
    assert code == 2, out
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in out, out
    for n in needles:
        assert n in errors[0], (n, errors[0])


def write_recipe(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture()
def recipe(tiny_model_dir, synth_dir, tmp_path):
    return write_recipe(tmp_path / "r.yaml", tiny_recipe_dict(tiny_model_dir, synth_dir, tmp_path / "run"))


# ------------------------------------------------------------------------------------------ recipes (5, 9, 12)


@pytest.mark.parametrize("key", ["parts.language_model.lr", "lora.alpha", "train.epochs", "lora.dropout"])
@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan"])
def test_infinite_and_nan_numbers_are_refused(recipe, key, value):
    code, out = cli("train", recipe, "--set", f"{key}={value}", "--dry-run")
    assert code == 2 and key in out and "finite" in out and "Traceback" not in out, out


@pytest.mark.parametrize("setting, needle", [
    ("parts.projector.lr=5", "parts.projector.lr"), ("train.seed=-1", "train.seed"),
    ("train.max_steps=0", "train.max_steps: 0"), ("distributed.master_port=70000", "distributed.master_port"),
    ("distributed.node_rank=1", "distributed.node_rank: 1 but nnodes is 1")])
def test_out_of_range_numbers_are_refused(recipe, setting, needle):
    code, out = cli("train", recipe, "--set", setting, "--dry-run")
    assert code == 2 and needle in out and "Traceback" not in out, out


def test_duplicate_yaml_key_names_its_line(recipe, tmp_path):
    bad = tmp_path / "dup.yaml"
    bad.write_text(recipe.read_text() + "method: full\n")
    code, out = cli("train", bad, "--dry-run")
    one_line_error(code, out, str(bad), "duplicate key 'method'", "line")


def test_non_utf8_recipe(tmp_path):
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("model: {path: caf\xe9}\n".encode("latin-1"))
    one_line_error(*cli("train", bad), str(bad), "not UTF-8")


def test_folder_as_recipe(tmp_path):
    one_line_error(*cli("train", tmp_path), str(tmp_path), "is a folder, not a recipe file")


def test_set_index_out_of_range(recipe):
    one_line_error(*cli("train", recipe, "--set", "data.train.3.sample=0.5", "--dry-run"),
                   "data.train has 1 entry", "index 3 is out of range")


def test_deepspeed_config_not_an_object(recipe, tmp_path):
    (tmp_path / "ds.json").write_text("[1, 2]")
    code, out = cli("train", recipe, "--set", f"distributed.deepspeed={tmp_path / 'ds.json'}", "--dry-run")
    assert code == 2 and "must hold a JSON object" in out and "Traceback" not in out, out


def test_registry_root_not_a_string(recipe, tmp_path, synth_dir):
    reg = tmp_path / "reg.yaml"
    reg.write_text(yaml.safe_dump({"root": [1], "datasets": {"s": {"annotation_path": "t.json", "data_path": "."}}}))
    raw = yaml.safe_load(recipe.read_text())
    raw["data"] = {"registry": str(reg), "train": [{"name": "s"}]}
    code, out = cli("train", write_recipe(tmp_path / "reg_recipe.yaml", raw), "--dry-run")
    assert code == 2 and "root must be a folder path (a string)" in out and "Traceback" not in out, out


# ------------------------------------------------------------------------------------------- outputs (6, 9)


def test_output_dir_never_the_base_model_folder(recipe, tiny_model_dir, tmp_path):
    for bad in (tiny_model_dir, tiny_model_dir / "sub", tiny_model_dir.parent):
        code, out = cli("train", recipe, "--set", f"train.output_dir={bad}", "--overwrite")
        one_line_error(code, out, "train.output_dir", "base model folder")
    assert not (tiny_model_dir / "adapter_config.json").exists()


def test_output_dir_that_is_a_file(recipe, tmp_path):
    (tmp_path / "f").write_text("x")
    one_line_error(*cli("train", recipe, "--set", f"train.output_dir={tmp_path / 'f'}"), "is a file")


def test_output_dir_never_holds_the_data(recipe, synth_dir):
    one_line_error(*cli("train", recipe, "--set", f"train.output_dir={synth_dir.parent}", "--overwrite"),
                   "would write into (or replace) the data.train.0")
    assert (synth_dir / "train.json").is_file()


def test_convert_config_that_is_a_list(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text("[]")
    one_line_error(*cli("convert", src, tmp_path / "o", "--from", "hf", "--to", "llava-next"),
                   f"{src / 'config.json'}: expected a JSON object")


def test_adapter_config_not_an_object(tmp_path):
    a = tmp_path / "adapter"
    a.mkdir()
    (a / "adapter_config.json").write_text('"lora"')
    one_line_error(*cli("merge", a, "--no-verify"), "adapter_config.json: expected a JSON object")


def test_symlinked_output_is_compared_resolved(tiny_model_dir, tmp_path):
    link = tmp_path / "link"
    link.symlink_to(tiny_model_dir)
    one_line_error(*cli("convert", tiny_model_dir, link / "x", "--from", "hf", "--to", "llava-next"),
                   "source folder")


# -------------------------------------------------------------------------------------- model path (14)


def test_missing_local_model_path_says_how_to_create_it(recipe, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out = cli("train", recipe, "--set", "model.path=runs/no-such-model", "--dry-run")
    one_line_error(code, out, "runs/no-such-model does not exist (no such local folder)",
                   "lora-manip tiny-model runs/no-such-model")
    assert "huggingface.co" not in out


def test_dry_run_plans_the_demo_on_a_fresh_clone_without_writing(tmp_path, monkeypatch):
    recipes = Path(__file__).resolve().parents[2] / "recipes"
    monkeypatch.chdir(tmp_path)  # the recipe's relative paths (runs/...) name folders of a fresh clone
    code, out = cli("train", recipes / "tiny_cpu.yaml", "--dry-run")
    assert code == 0, out[-2000:]
    assert "created on first train" in out and "optimizer parameter groups" in out
    assert list(tmp_path.iterdir()) == []  # nothing written: no model, no data, no run folder


# ------------------------------------------------------------------------------------------------ data (8, 11, 12)


def _one_record_file(root: Path, record: dict, image: Path | None = None) -> Path:
    f = root / "d.json"
    f.write_text(json.dumps([record]))
    return f


def _rec(rid="r1", answer='{"current_bbox": [[0.1, 0.2], [0.3, 0.4]]}', image="img/a.png"):
    return {"id": rid, "images": [image], "conversations": [
        {"from": "human", "value": "<image>\nWhere?"}, {"from": "gpt", "value": answer}]}


@pytest.fixture()
def data_root(tmp_path):
    from tests.conftest import write_two_images

    root = tmp_path / "data"
    root.mkdir()
    write_two_images(root)
    return root


def test_truncated_image_is_caught_by_data_check(data_root):
    png = (data_root / "img/b.png").read_bytes()
    (data_root / "img/b.png").write_bytes(png[: len(png) // 2])
    f = data_root / "d.json"
    f.write_text(json.dumps([_rec("ok"), _rec("cut", image="img/b.png")]))
    code, out = cli("data", "check", f, "--json")
    report = json.loads(out)
    assert code == 1 and report["problem_counts"] == {"unreadable_image": 1}
    assert report["problems"][0]["record_id"] == "cut" and "truncated" in report["problems"][0]["reason"]


def test_skip_bad_records_skips_an_undecodable_image_naming_it(data_root, tiny_model_dir, caplog):
    import logging

    from lora_manip.data.dataset import build_datasets
    from lora_manip.data.processor import load_processor
    from lora_manip.recipe import DataCfg, DatasetCfg

    png = (data_root / "img/b.png").read_bytes()
    (data_root / "img/b.png").write_bytes(png[: len(png) // 2])
    f = data_root / "d.json"
    f.write_text(json.dumps([_rec("ok"), _rec("cut", image="img/b.png")]))
    processor = load_processor(tiny_model_dir)
    with caplog.at_level(logging.WARNING):
        ds, _ = build_datasets(DataCfg(train=[DatasetCfg(annotation_path=str(f), data_path=str(data_root))],
                                       system_prompt=None, model_max_length=4096, skip_bad_records=True), processor, 0)
    assert len(ds) == 1 and ds.dropped["bad record: image file unreadable"] == 1
    assert "id='cut'" in caplog.text
    from lora_manip.data.collate import Collator

    Collator(processor)([ds[0]])  # what the check passed decodes in the collator


def test_image_broken_after_the_check_is_a_one_line_error_naming_the_record(data_root, tiny_model_dir):
    from lora_manip.data.collate import Collator
    from lora_manip.errors import UserError
    from lora_manip.data.processor import load_processor

    (data_root / "img/a.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(UserError, match=r"record id='x1': cannot decode image .*a.png"):
        Collator(load_processor(tiny_model_dir))([{"input_ids": [1], "labels": [1], "images":
                                                   [str(data_root / "img/a.png")], "id": "x1"}])


def test_duplicate_ids_are_reported(data_root):
    f = data_root / "d.json"
    f.write_text(json.dumps([_rec("same"), _rec("other"), _rec("same")]))
    code, out = cli("data", "check", f, "--json")
    report = json.loads(out)
    assert code == 1 and report["problem_counts"] == {"duplicate_id": 1}
    assert "index 0" in report["problems"][0]["reason"] and report["problems"][0]["where"].startswith("index 2")


def test_symlink_leading_out_of_the_data_root_is_reported(data_root, tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (data_root / "img/a.png").rename(outside / "a.png")
    (data_root / "img/a.png").symlink_to(outside / "a.png")
    code, out = cli("data", "check", _one_record_file(data_root, _rec()), "--json")
    report = json.loads(out)
    assert code == 0 and len(report["warnings"]) == 1  # followed (roots built from links work), never silently
    assert report["warnings"][0]["kind"] == "symlink_outside_root" and str(outside) in report["warnings"][0]["reason"]


@pytest.mark.parametrize("value", ["NaN", "Infinity"])
def test_nan_and_inf_coordinates_get_their_own_message(data_root, value):
    f = _one_record_file(data_root, _rec(answer=f'{{"current_bbox": [[0.1, {value}], [0.3, 0.4]]}}'))
    code, out = cli("data", "check", f, "--json")
    (p,) = json.loads(out)["problems"]
    assert code == 1 and p["kind"] == "coords_not_finite" and "pixel" not in p["reason"]


# -------------------------------------------------------------------------------------------- file modes (12)


def test_files_get_the_umask_mode(tmp_path):
    from lora_manip.fsutil import atomic_write_text
    from lora_manip.outputs import atomic_dir

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        with atomic_dir(tmp_path / "d", kind="convert") as tmp:
            (tmp / "f").write_text("y")
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o755


# ------------------------------------------------------------------------------------------- locks (2)


def test_lock_refuses_a_second_owner_naming_the_holder(tmp_path):
    """Two processes on one folder: the second is refused with the first one's pid and host."""
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\nfrom lora_manip.fsutil import output_lock\n"
        f"with output_lock({str(tmp_path / 'out')!r}, 'lora-manip merge'):\n"
        "    print('locked', flush=True)\n    time.sleep(60)\n")], stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        assert holder.stdout.readline().strip() == "locked"
        src = tmp_path / "src"
        src.mkdir()
        code, out = cli("convert", src, tmp_path / "out", "--from", "hf", "--to", "llava-next")
        one_line_error(code, out, "is in use by `lora-manip merge`", f"pid {holder.pid} on host")
        holder.send_signal(signal.SIGKILL)  # kill -9: the lock is stale now
        holder.wait()
        from lora_manip.fsutil import lock_path, output_lock

        assert lock_path(tmp_path / "out").exists()
        with output_lock(tmp_path / "out", "test"):
            pass  # taken over (with a warning)
        assert not lock_path(tmp_path / "out").exists()
    finally:
        holder.kill()


def test_two_trainings_into_one_folder_the_second_is_refused(tiny_model_dir, synth_dir, tmp_path):
    out = tmp_path / "run"
    recipes = []
    for seed in (0, 1):
        # the first run must outlive the second's start-up (imports take seconds): it is stopped by the test
        raw = tiny_recipe_dict(tiny_model_dir, synth_dir, out, train__seed=seed, train__max_steps=100_000)
        recipes.append(write_recipe(tmp_path / f"r{seed}.yaml", raw))
    cmd = [sys.executable, "-m", "lora_manip.cli", "train"]
    first = subprocess.Popen(cmd + [str(recipes[0])], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
    try:
        deadline = time.time() + 300
        while not (out / "recipe.yaml").exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert (out / "recipe.yaml").exists() and first.poll() is None, "the first run never held the folder"
        # recipe.yaml is written holding the folder's lock, once the model is built. Paused, the first run keeps the
        # lock (the kernel holds the flock for the living process) and leaves the cores to the second's start-up.
        first.send_signal(signal.SIGSTOP)
        second = subprocess.run(cmd + [str(recipes[1]), "--overwrite"], env=ENV, capture_output=True, text=True,
                                timeout=300)
        assert first.poll() is None, "the first run ended before the second started; the test proves nothing"
        assert second.returncode == 2, second.stderr[-2000:]
        assert f"is in use by `lora-manip train` (pid {first.pid}" in second.stderr
    finally:
        first.kill()
        first.wait(timeout=60)
    # the second run wrote nothing: the folder is the first run's
    assert yaml.safe_load((out / "recipe.yaml").read_text())["train"]["seed"] == 0
    assert json.loads((out / "run.json").read_text())["run_id"]


# -------------------------------------------------------------------------- --overwrite, run ids, partials (3, 10, 13)


def test_killed_overwrite_leaves_no_mix_and_merge_refuses_it(tiny_model_dir, synth_dir, tmp_path):
    out = tmp_path / "run"
    r4 = write_recipe(tmp_path / "r4.yaml", tiny_recipe_dict(tiny_model_dir, synth_dir, out, lora__r=4))
    code, text = cli("train", r4)
    assert code == 0, text
    assert (out / "run_complete.json").is_file()
    # --overwrite with r=8, killed after its first checkpoint: nothing of the r=4 run may remain
    r8 = write_recipe(tmp_path / "r8.yaml", tiny_recipe_dict(tiny_model_dir, synth_dir, out, lora__r=8,
                                                             train__max_steps=200, train__save_steps=1,
                                                             train__save_total_limit=None))
    p = subprocess.Popen([sys.executable, "-m", "lora_manip.cli", "train", str(r8), "--overwrite"], env=ENV,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while not (out / "checkpoint-1/checkpoint_complete").exists() and time.time() < deadline:
            time.sleep(0.02)  # the r=4 run has checkpoint-3 only; checkpoint-1 is the new run's first
        assert (out / "checkpoint-1/checkpoint_complete").exists(), "no checkpoint within 4 minutes"
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert not (out / "adapter_config.json").exists()  # the r=4 adapter went before anything new was written
    assert not (out / "run_complete.json").exists()
    # the r=4 run's checkpoint-3 went too: a checkpoint there now (this run may have got further) is the new run's
    assert all(json.loads((c.parent / "adapter_config.json").read_text())["r"] == 8
               for c in out.glob("checkpoint-*/checkpoint_complete"))
    assert yaml.safe_load((out / "recipe.yaml").read_text())["lora"]["r"] == 8
    one_line_error(*cli("merge", out, "--no-verify"), "did not finish", "run_complete.json")
    # the killed run's lock is stale: --resume takes it over and finishes the r=8 run
    code, text = cli("train", r8, "--resume", "--set", "train.max_steps=3")
    assert code == 0, text
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 8
    code, text = cli("merge", out, "--no-verify")
    assert code == 0, text
    merged = json.loads((tmp_path / "run-merged" / "run.json").read_text())
    assert merged["run_id"] == json.loads((out / "run.json").read_text())["run_id"]


def test_leftover_partial_folders_are_removed_on_the_next_run(tiny_model_dir, tmp_path):
    from lora_manip.outputs import partial_dir

    out = tmp_path / "conv"
    leftover = partial_dir(out, kind="convert")  # what a convert killed mid-write leaves: marked as the kit's
    (leftover / "model.safetensors").write_bytes(b"x" * 100)
    other = tmp_path / ".conv.x.abcd1234.partial"  # another output's (conv.x): not ours to remove
    other.mkdir()
    lookalike = tmp_path / ".conv.abcd1234.partial"  # named like one, but not made by the kit: kept
    lookalike.mkdir()
    (lookalike / "mine.txt").write_text("mine")
    code, text = cli("convert", tiny_model_dir, out, "--from", "hf", "--to", "llava-next")
    assert code == 0, text
    assert not leftover.exists() and other.exists() and (lookalike / "mine.txt").is_file()


def test_full_disk_is_a_one_line_error_and_leaves_nothing(tiny_model_dir, tmp_path, monkeypatch):
    import errno

    import lora_manip.checkpoints.shards as shards

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shards, "_write_shard", full)
    code, out = cli("convert", tiny_model_dir, tmp_path / "o", "--from", "hf", "--to", "llava-next")
    one_line_error(code, out, "disk is full")
    assert [p.name for p in tmp_path.iterdir()] == []


def test_full_disk_in_train_is_a_one_line_error(recipe, monkeypatch):
    import errno

    from lora_manip.train import trainer

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(trainer.ManipTrainer, "save_final", full)
    code, out = cli("train", recipe)
    one_line_error(code, out, "disk is full")
