"""Issue 13, the evaluation side: eval / score / predict never write over their inputs or earlier results, own
their output folder, refuse unfinished runs and broken adapter files with one line, and report empty inputs."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from tests.checkpoints.test_merge import make_adapter
from tests.train.test_reliability import ENV, cli


FAST = ("--max-new-tokens", "3", "--limit", "2")


def one_line_error(code: int, out: str, *needles: str) -> None:
    """As test_reliability's, but a progress bar on stderr may share the error's line (no newline after it)."""
    assert code == 2, out
    errors = [line[line.index("error: "):] for line in out.splitlines() if "error: " in line]
    assert len(errors) == 1 and "Traceback" not in out, out
    for n in needles:
        assert n in errors[0], (n, errors[0])


@pytest.fixture(scope="module")
def adapter(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("rel-eval") / "adapter"
    make_adapter(tiny_model_dir, out)
    return out


@pytest.fixture()
def val(synth_dir):
    return synth_dir / "val.json"


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _image(tmp_path: Path) -> Path:
    img = tmp_path / "scene.png"
    Image.new("RGB", (64, 48), (90, 60, 30)).save(img)
    return img


# ------------------------------------------------------------------------------ no output over an input (1, 4)


def test_eval_then_score_into_the_same_folder_keeps_the_predictions(tiny_model_dir, val, tmp_path):
    x = tmp_path / "X"
    code, out = cli("eval", tiny_model_dir, "--data", val, "--out", x, *FAST)
    assert code == 0, out
    preds = x / "predictions.jsonl"
    raw, strict = preds.read_bytes(), json.loads((x / "metrics.json").read_text())
    # the eval's metrics.json is a result: replaced only with --force, and the predictions never
    code, out = cli("score", preds, "--upstream-compatible", "--out", x)
    one_line_error(code, out, f"{x / 'metrics.json'} already exists", "--force")
    assert json.loads((x / "metrics.json").read_text()) == strict
    code, out = cli("score", preds, "--upstream-compatible", "--out", x, "--force")
    assert code in (0, 1), out
    assert preds.read_bytes() == raw
    assert json.loads((x / "metrics.json").read_text())["mode"] == "upstream_compatible"
    code, out = cli("score", preds, "--out", x, "--force")  # re-scoring gives the eval's numbers again
    assert code in (0, 1), out
    assert preds.read_bytes() == raw and json.loads((x / "metrics.json").read_text())["all"] == strict["all"]


def test_score_input_reached_through_a_symlink_is_never_replaced(tmp_path):
    x = tmp_path / "X"
    x.mkdir()
    target = x / "scores.jsonl"
    target.write_text('{"id": 1, "pred": "A", "gt": "A"}\n')
    link = tmp_path / "preds.jsonl"
    link.symlink_to(target)
    one_line_error(*cli("score", link, "--out", x, "--force"), str(target), "is an input")
    out_link = tmp_path / "Y"  # the output folder named through a link to the input's folder
    out_link.symlink_to(x)
    one_line_error(*cli("score", target, "--out", out_link, "--force"), "is an input")
    assert target.read_text() == '{"id": 1, "pred": "A", "gt": "A"}\n'


def test_existing_results_are_kept_without_force(tiny_model_dir, val, tmp_path):
    preds = tmp_path / "p.jsonl"
    preds.write_text('{"id": 1, "pred": "A", "gt": "A"}\n')
    ours = tmp_path / "ours"
    code, out = cli("score", preds, "--out", ours)
    assert code == 0, out
    one_line_error(*cli("score", preds, "--out", ours), "metrics.json already exists", "--force")
    one_line_error(*cli("eval", tiny_model_dir, "--data", val, "--out", ours, *FAST), "already holds an eval",
                   "--force")
    mine = tmp_path / "s"  # results of the user's own: never replaced, whatever the flag
    mine.mkdir()
    (mine / "metrics.json").write_text("{}\n")
    (mine / "predictions.jsonl").write_text("mine\n")
    for force in ([], ["--force"]):
        one_line_error(*cli("score", preds, "--out", mine, *force), "did not make it", "metrics.json")
        one_line_error(*cli("eval", tiny_model_dir, "--data", val, "--out", mine, *FAST, *force), "did not make it",
                       "predictions.jsonl")
    assert (mine / "predictions.jsonl").read_text() == "mine\n" and (mine / "metrics.json").read_text() == "{}\n"


def test_out_that_is_a_file_or_the_model_folder(tiny_model_dir, val, tmp_path):
    file = tmp_path / "taken"
    file.write_text("x")
    preds = tmp_path / "p.jsonl"
    preds.write_text('{"id": 1, "pred": "A", "gt": "A"}\n')
    one_line_error(*cli("score", preds, "--out", file), f"--out {file} is a file")
    one_line_error(*cli("eval", tiny_model_dir, "--data", val, "--out", file, *FAST), f"--out {file} is a file")
    assert file.read_text() == "x"
    link = tmp_path / "model-link"
    link.symlink_to(tiny_model_dir)
    one_line_error(*cli("eval", tiny_model_dir, "--data", val, "--out", link, *FAST), "is the model folder")
    assert not (tiny_model_dir / "predictions.meta.json").exists()


def test_predict_never_draws_over_its_input_image(tiny_model_dir, tmp_path):
    img = _image(tmp_path)
    before = img.read_bytes()
    one_line_error(*cli("predict", tiny_model_dir, img, "where?", "--draw", img), "is the input image")
    assert img.read_bytes() == before


# ------------------------------------------------------------------------------------------- numbers (7, 9)


@pytest.mark.parametrize("option, value", [("--limit", "-1"), ("--limit", "0"), ("--batch-size", "0")])
def test_limit_and_batch_size_must_be_positive(tiny_model_dir, val, tmp_path, option, value):
    out = tmp_path / "ev"
    code, text = cli("eval", tiny_model_dir, "--data", val, "--out", out, "--max-new-tokens", "3", option, value)
    one_line_error(code, text, f"{option} must be at least 1", value)
    assert not out.exists()


# ------------------------------------------------------------------------------------ broken adapters (9, 12)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-10])


def _garbage(path: Path) -> None:
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}" + b"\0" * 64)


@pytest.mark.parametrize("command", ["eval", "predict"])
@pytest.mark.parametrize("name", ["adapter_model.safetensors", "extra_trainables.safetensors"])
@pytest.mark.parametrize("damage", [_truncate, _garbage])
def test_corrupt_adapter_files_are_one_line_errors(adapter, val, tmp_path, command, name, damage):
    a = _copy(adapter, tmp_path / "a")
    damage(a / name)
    args = ("--data", val, *FAST) if command == "eval" else (_image(tmp_path), "where?")
    one_line_error(*cli(command, a, *args), str(a / name))


def test_truncated_full_model_shard_is_a_one_line_error(tiny_model_dir, val, tmp_path):
    m = _copy(tiny_model_dir, tmp_path / "m")
    _truncate(m / "model.safetensors")
    one_line_error(*cli("eval", m, "--data", val, *FAST), f"{m / 'model.safetensors'} is truncated")


@pytest.mark.parametrize("command", ["eval", "predict"])
def test_pickle_adapter_is_refused_by_name(adapter, val, tmp_path, command):
    a = _copy(adapter, tmp_path / "a")
    (a / "adapter_model.safetensors").unlink()
    marker = tmp_path / "unpickled"
    import pickle

    class Boom:  # would create `marker` if anything unpickled the file
        def __reduce__(self):
            return (Path.touch, (marker,))

    (a / "adapter_model.bin").write_bytes(pickle.dumps(Boom()))
    args = ("--data", val, *FAST) if command == "eval" else (_image(tmp_path), "where?")
    one_line_error(*cli(command, a, *args), str(a / "adapter_model.bin"), "pickle")
    assert not marker.exists()


def test_rank_in_config_and_weights_disagree_names_the_tensor(adapter, val, tmp_path):
    a = _copy(adapter, tmp_path / "a")
    cfg = json.loads((a / "adapter_config.json").read_text())
    cfg["r"] = 8
    (a / "adapter_config.json").write_text(json.dumps(cfg))
    code, out = cli("eval", a, "--data", val, *FAST)
    one_line_error(code, out, "adapter_model.safetensors: tensor base_model.model.", "lora_A.weight [4, ", "r=8")
    assert "Error(s) in loading state_dict" not in out


def test_adapter_of_another_base_names_the_tensor_and_shapes(adapter, val, tmp_path):
    a = _copy(adapter, tmp_path / "a")
    path = a / "adapter_model.safetensors"
    key = "base_model.model.model.language_model.layers.1.mlp.up_proj.lora_A.weight"
    state = load_file(path)
    assert tuple(state[key].shape) == (4, 64)
    state[key] = torch.zeros(4, 96)  # rank 4 still (config agrees), but the base's up_proj takes 64 inputs
    save_file(state, str(path), metadata={"format": "pt"})
    code, out = cli("eval", a, "--data", val, *FAST)
    one_line_error(code, out, f"tensor {key} is [4, 96], the base model expects [4, 64]")
    assert "Error(s) in loading state_dict" not in out


# --------------------------------------------------------------------------------------------- run ids (3)


@pytest.mark.parametrize("command", ["eval", "predict"])
def test_unfinished_or_mixed_run_folder_is_refused(adapter, val, tmp_path, command):
    from lora_manip.runinfo import DONE_FILE, finish_run, start_run

    a = _copy(adapter, tmp_path / "run")
    args = ("--data", val, *FAST) if command == "eval" else (_image(tmp_path), "where?")
    start_run(a)
    one_line_error(*cli(command, a, *args), str(a), "did not finish", DONE_FILE)
    (a / DONE_FILE).write_text(json.dumps({"run_id": "another-run", "step": 3}))
    one_line_error(*cli(command, a, *args), str(a), "belongs to run another-run")
    finish_run(a)
    code, out = cli(command, a, *args)
    assert code in (0, 1) and "error:" not in out, out


# ------------------------------------------------------------------------------------ empty inputs (12)


def test_empty_predictions_or_data_is_an_error(tiny_model_dir, tmp_path):
    for name, text in (("empty.jsonl", ""), ("blank.jsonl", "\n\n"), ("empty.json", "[]")):
        p = tmp_path / name
        p.write_text(text)
        one_line_error(*cli("score", p, "--out", tmp_path / "s"), str(p), "no records")
    assert not (tmp_path / "s" / "metrics.json").exists()
    data = tmp_path / "data.json"
    data.write_text("[]")
    one_line_error(*cli("eval", tiny_model_dir, "--data", data, "--out", tmp_path / "ev"), str(data), "no records")


# ------------------------------------------------------------------------------- modes, locks, full disk


def test_eval_and_score_outputs_get_the_umask_mode(tiny_model_dir, val, tmp_path):
    old = os.umask(0o007)  # 0o660 differs both from mkstemp's 0o600 and from the usual 0o644
    try:
        code, out = cli("eval", tiny_model_dir, "--data", val, "--out", tmp_path / "ev", *FAST)
        assert code in (0, 1), out
        code, out = cli("score", tmp_path / "ev/predictions.jsonl", "--out", tmp_path / "sc")
        assert code in (0, 1), out
    finally:
        os.umask(old)
    for f in ("ev/predictions.jsonl", "ev/predictions.meta.json", "ev/metrics.json", "ev/scores.jsonl",
              "sc/metrics.json", "sc/scores.jsonl"):
        assert (tmp_path / f).stat().st_mode & 0o777 == 0o660, f


def test_results_folder_has_one_owner_and_leftovers_are_removed(tiny_model_dir, val, tmp_path):
    out = tmp_path / "ev"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import time\nfrom lora_manip.fsutil import output_lock\n"
        f"with output_lock({str(out)!r}, 'lora-manip eval'):\n"
        "    print('locked', flush=True)\n    time.sleep(60)\n")], stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        assert holder.stdout.readline().strip() == "locked"
        preds = tmp_path / "p.jsonl"
        preds.write_text('{"id": 1, "pred": "A", "gt": "A"}\n')
        one_line_error(*cli("score", preds, "--out", out), "is in use by `lora-manip eval`", f"pid {holder.pid}")
        one_line_error(*cli("eval", tiny_model_dir, "--data", val, "--out", out, *FAST), "is in use by")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    from lora_manip.outputs import RESULTS, write_marker

    out.mkdir(exist_ok=True)
    write_marker(out, RESULTS)  # the folder of an eval that was killed: the kit's, with its leftovers
    overlays = out / ".overlays.abcd1234.partial"  # left by an eval killed while drawing
    overlays.mkdir()
    tmp = out / ".metrics.json.abcd1234.tmp"  # left by a kill between write and rename
    tmp.write_text("{")
    code, text = cli("eval", tiny_model_dir, "--data", val, "--out", out, *FAST)
    assert code in (0, 1), text
    assert not overlays.exists() and not tmp.exists() and (out / "metrics.json").is_file()


def _full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_full_disk_while_writing_predictions_is_one_line(tiny_model_dir, val, tmp_path, monkeypatch):
    from lora_manip.eval import resume

    append = resume.PredictionLog.append
    monkeypatch.setattr(resume.PredictionLog, "append", lambda self, batch: (
        append(self, batch) if not self.records else _full()))  # the first batch is written, the second is not
    one_line_error(*cli("eval", tiny_model_dir, "--data", val, "--out", tmp_path / "ev", *FAST, "--batch-size", "1"),
                   str(tmp_path / "ev"), "disk is full", "--resume")
    assert len((tmp_path / "ev/predictions.jsonl").read_text().splitlines()) == 1  # kept for --resume
    monkeypatch.setattr(resume.PredictionLog, "append", _full)  # nothing made yet: nothing is left
    one_line_error(*cli("eval", tiny_model_dir, "--data", val, "--out", tmp_path / "ev2", *FAST), "disk is full")
    assert not (tmp_path / "ev2").exists()


def test_full_disk_while_writing_scores_is_one_line(tmp_path, monkeypatch):
    preds = tmp_path / "p.jsonl"
    preds.write_text('{"id": 1, "pred": "A", "gt": "A"}\n')
    monkeypatch.setattr(os, "fsync", _full)
    one_line_error(*cli("score", preds, "--out", tmp_path / "s"), "disk is full")
    monkeypatch.undo()
    assert not (tmp_path / "s").exists()  # the folder it made for the results is taken back
