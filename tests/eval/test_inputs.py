"""What `score` and `eval` refuse: wrong ground truths, ids, masks and --task-map names, each with the record's
index, id, field and reason; `eval --resume` keyed by everything the answers depend on; pickle-only weights."""

from __future__ import annotations

import json
import os
import re
import shutil

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from lora_manip.cli import app
from lora_manip.eval.score import score_records
from lora_manip.errors import UserError
from tests.conftest import saved_run_recipe

runner = CliRunner()
GOOD = {"id": "ok", "task": "current_bbox", "pred": "[0.1, 0.2, 0.5, 0.6]", "gt": '{"current_bbox": [0.1, 0.2, 0.5, 0.6]}'}


def _gt(value, key="current_bbox"):
    return {"id": "bad", "task": "current_bbox", "pred": "[0.1, 0.2, 0.5, 0.6]", "gt": json.dumps({key: value})}


# name -> (record, field, words of the reason)
REFUSED = {
    "inverted box": (_gt([0.5, 0.6, 0.1, 0.2]), "gt", "inverted box"),
    "one-point box": (_gt([[0.1, 0.2]]), "gt", "box"),
    "five-number box": (_gt([0.1, 0.2, 0.3, 0.4, 0.5]), "gt", "box"),
    "string coordinates": (_gt(["0.1", "0.2", "0.5", "0.6"]), "gt", "not numbers"),
    "duplicate key": (dict(_gt([0.1, 0.2, 0.5, 0.6]), gt='{"current_bbox": [0.1, 0.2, 0.5, 0.6], '
                                                         '"current_bbox": [0, 0, 1, 1]}'), "gt", "twice"),
    "string point": ({"id": "bad", "task": "contact_point", "pred": "[0.5, 0.5]", "gt": '{"contact_point": ["0.5", '
                      '"0.5"]}'}, "gt", "not numbers"),
    "object id": (dict(GOOD, id={"k": 1}), "id", "string or an integer"),
    "boolean width": (dict(GOOD, id="bad", w=True, h=480), "w", "positive number"),
    "duplicate id": (dict(GOOD), "id", "duplicate id: record 0"),
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_score_refuses_wrong_records_by_index_id_field_and_reason(name):
    bad, fld, words = REFUSED[name]
    rows, summary = score_records([GOOD, bad])
    (err,) = summary["data_errors"]
    assert err["index"] == 1 and err["field"] == fld and words in err["reason"], err
    assert err["id"] == bad["id"] and [r["id"] for r in rows] == ["ok"]
    assert summary["all"]["box"]["count"] == 1  # counted once, never twice


def test_valid_records_score_as_before():
    """The checks refuse only what is wrong: zero-size boxes, corner lists and lists of boxes still score."""
    recs = [dict(GOOD, id=str(i), gt=gt) for i, gt in enumerate([
        '{"current_bbox": [[0.1, 0.2], [0.5, 0.6]]}', '{"current_bbox": [0.3, 0.3, 0.3, 0.3]}',
        "[0.1, 0.2, 0.5, 0.6]", '[{"bbox_2d": [0.1, 0.2, 0.5, 0.6], "label": "cup"}]'])]
    rows, summary = score_records(recs)
    assert not summary["data_errors"] and len(rows) == 4


def test_the_same_id_in_two_files_is_two_records_and_one_file_twice_is_refused(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    for p in (a, b):
        p.write_text(json.dumps(GOOD) + "\n")
    res = runner.invoke(app, ["score", str(a), str(b)])
    assert res.exit_code == 0 and "could not be scored" not in res.output, res.output
    res = runner.invoke(app, ["score", str(a), str(tmp_path / "." / "a.jsonl")])
    assert res.exit_code == 2 and "given twice" in res.output


def test_two_evals_of_the_same_records_are_never_averaged_into_one_row(tmp_path):
    """eval's predictions name their dataset: two runs' files would otherwise share its row."""
    a, b, c = (tmp_path / n / "predictions.jsonl" for n in ("run_a", "run_b", "run_c"))
    for p, ds in ((a, "val"), (b, "val"), (c, "other_val")):
        p.parent.mkdir()
        p.write_text(json.dumps({**GOOD, "dataset": ds}) + "\n")
    res = runner.invoke(app, ["score", str(a), str(b)])
    assert res.exit_code == 2 and f"{b}: record 0 id='ok' of dataset 'val' is answered in {a} too" in res.output
    res = runner.invoke(app, ["score", str(a), str(c)])  # other records: a row each
    assert res.exit_code == 0 and re.search(r"\nval +box +1 ", res.output) and "other_val" in res.output, res.output



def test_two_models_upstream_files_of_one_task_are_not_mixed(tmp_path):
    """Upstream's eval_details_<task>.json carry no dataset: two models' files of one task would share the upstream
    line and the table's cell."""
    a, b, c = tmp_path / "mA/eval_details_traj.json", tmp_path / "mB/eval_details_traj.json", \
        tmp_path / "mA/eval_details_current_box.json"
    rec = {"id": "1", "gt": "[[0.1, 0.1], [0.2, 0.2]]", "pred": "[[10, 10], [20, 20]]", "w": 100, "h": 100}
    for p in (a, b, c):
        p.parent.mkdir(exist_ok=True)
        p.write_text(json.dumps([rec if "traj" in p.name else {**rec, "gt": "[[0.1, 0.1], [0.2, 0.2]]"}]))
    res = runner.invoke(app, ["score", str(a), str(b), "--upstream-compatible"])
    assert res.exit_code == 2 and "task 'traj' again" in res.output and str(a) in res.output, res.output
    assert runner.invoke(app, ["score", str(a), str(c), "--upstream-compatible"]).exit_code == 0

def test_a_task_map_name_no_record_has_is_an_error(tmp_path):
    preds = tmp_path / "p.jsonl"
    preds.write_text(json.dumps(dict(GOOD, task="mine")) + "\n")
    assert runner.invoke(app, ["score", str(preds), "--task-map", "mine=box"]).exit_code == 0
    res = runner.invoke(app, ["score", str(preds), "--task-map", "mien=box"])
    assert res.exit_code == 2 and "--task-map mien" in res.output and "mine" in res.output
    assert "Traceback" not in res.output
    with pytest.raises(ValueError, match="no record has that task"):
        score_records([dict(GOOD, task="mine")], task_map={"MINE": "box", "other": "point"})


@pytest.mark.parametrize("where", ["../outside.png", "ABSOLUTE", "masks/../../outside.png"])
def test_mask_paths_are_confined_to_their_roots(tmp_path, where):
    data = tmp_path / "data"
    (data / "masks").mkdir(parents=True)
    Image.fromarray(np.full((8, 8), 255, np.uint8)).save(tmp_path / "outside.png")
    Image.fromarray(np.full((8, 8), 255, np.uint8)).save(data / "masks" / "in.png")
    mask = str(tmp_path / "outside.png") if where == "ABSOLUTE" else where
    recs = [{"id": "in", "mask": "masks/in.png", "pred": "[(0.5, 0.5)]"},
            {"id": "out", "mask": mask, "pred": "[(0.5, 0.5)]"}]
    rows, summary = score_records(recs, mask_roots=[data])
    (err,) = summary["data_errors"]
    assert err["id"] == "out" and err["field"] == "mask" and "leads out of" in err["reason"]
    assert [r["accuracy"] for r in rows] == [1.0]


@pytest.mark.parametrize("content", [b"not a png", b"\x89PNG\r\n\x1a\n truncated"])
def test_an_unreadable_mask_is_a_data_error_not_a_traceback(tmp_path, content):
    (tmp_path / "m.png").write_bytes(content)
    rows, summary = score_records([{"id": "q", "mask": "m.png", "pred": "[(0.5, 0.5)]"}], mask_roots=[tmp_path])
    (err,) = summary["data_errors"]
    assert err["field"] == "mask" and "m.png" in err["reason"] and "cannot score" not in err["reason"]


def test_a_zero_one_mask_scores_a_point_inside_it_one(tmp_path):
    m = np.zeros((10, 10), np.uint8)
    m[:5, :5] = 1
    Image.fromarray(m).save(tmp_path / "m.png")
    rows, _ = score_records([{"id": "q", "mask": "m.png", "pred": "[(0.2, 0.2)]"}], mask_roots=[tmp_path])
    assert rows[0]["accuracy"] == 1.0  # not 1/255


# ------------------------------------------------------------------------------------------------------ resume
def _eval(model, data, out, *extra):
    return runner.invoke(app, ["eval", str(model), "--data", str(data), "--out", str(out), "--max-new-tokens", "2",
                               "--limit", "3", *extra])


@pytest.fixture()
def resumable(tiny_model_dir, synth_dir, tmp_path):
    """A finished eval of a copy of the tiny model (with a run recipe) on a copy of the data."""
    model, data = tmp_path / "model", tmp_path / "data"
    shutil.copytree(tiny_model_dir, model)
    (model / "recipe.yaml").write_text(saved_run_recipe(data__max_image_tiles=4))
    shutil.copytree(synth_dir, data)
    out = tmp_path / "ev"
    res = _eval(model, data / "val.json", out)
    assert res.exit_code == 0, res.output
    return model, data, out


def _edit_data(model, data):
    path = data / "val.json"
    records = json.loads(path.read_text())
    records[0]["conversations"][-1]["value"] = records[1]["conversations"][-1]["value"]  # edited in place
    path.write_text(json.dumps(records))


def _edit_image(model, data):
    first = json.loads((data / "val.json").read_text())[0]
    img = data / first["images"][0]
    Image.new("RGB", (50, 40), (1, 2, 3)).save(img)


def _edit_cap(model, data):
    (model / "recipe.yaml").write_text(saved_run_recipe(data__max_image_tiles=2))


def _edit_weights(model, data):
    shard = sorted(model.glob("*.safetensors"))[0]
    os.utime(shard, ns=(1, 1))


CHANGES = {"data content": (_edit_data, "data file's content"), "an image": (_edit_image, "image(s)"),
           "image cap": (_edit_cap, "max_image_tiles=4 (now max_image_tiles=2)"),
           "model files": (_edit_weights, "the model files")}


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_resume_refuses_when_what_the_answers_depend_on_changed(resumable, change):
    model, data, out = resumable
    assert _eval(model, data / "val.json", out, "--resume").exit_code == 0  # nothing changed: resumes
    edit, words = CHANGES[change]
    edit(model, data)
    res = _eval(model, data / "val.json", out, "--resume")
    assert res.exit_code == 2 and words in res.output and "never mixed" in res.output, res.output
    assert "Traceback" not in res.output


def test_resume_names_every_change_at_once(resumable):
    model, data, out = resumable
    _edit_data(model, data)
    _edit_cap(model, data)
    res = _eval(model, data / "val.json", out, "--resume", "--system-prompt", "Other.")
    assert res.exit_code == 2
    for words in ("data file's content", "max_image_tiles", "system_prompt"):
        assert words in res.output


def test_a_meta_file_of_an_older_kit_is_named(resumable):
    model, data, out = resumable
    meta = json.loads((out / "predictions.meta.json").read_text())
    del meta["data_digest"]
    (out / "predictions.meta.json").write_text(json.dumps(meta))
    res = _eval(model, data / "val.json", out, "--resume")
    assert res.exit_code == 2 and "data_digest (not recorded" in res.output


# ------------------------------------------------------------------------------------------------ weights
def test_pickle_only_weights_are_refused_with_the_kits_own_message(tiny_model_dir, synth_dir, tmp_path):
    model = tmp_path / "pickled"
    model.mkdir()
    for f in tiny_model_dir.iterdir():
        if f.suffix != ".safetensors" and f.is_file():
            shutil.copy(f, model / f.name)
    (model / "pytorch_model.bin").write_bytes(b"\x80\x04 a pickle that must never be opened")
    res = runner.invoke(app, ["eval", str(model), "--data", str(synth_dir / "val.json"), "--limit", "1"])
    assert res.exit_code == 2 and "pickle" in res.output and "pytorch_model.bin" in res.output, res.output
    assert "weights_only" not in res.output and "Traceback" not in res.output
    from lora_manip.model.load import refuse_pickle_weights

    with pytest.raises(UserError, match="safetensors"):
        refuse_pickle_weights(model)
    refuse_pickle_weights(tiny_model_dir)  # safetensors present: fine


def test_an_image_placeholder_in_the_system_prompt_is_one_line(tiny_model_dir, synth_dir):
    res = runner.invoke(app, ["eval", str(tiny_model_dir), "--data", str(synth_dir / "val.json"), "--limit", "1",
                              "--system-prompt", "Look at <image> first."])
    assert res.exit_code == 2 and "<image> inside a system prompt" in res.output, res.output
    assert "Traceback" not in res.output


def test_a_run_stopped_by_a_bad_image_resumes_once_the_image_is_fixed(tiny_model_dir, synth_dir, tmp_path,
                                                                      monkeypatch):
    """An image only unanswered records show may change (the broken one, fixed); an answered record's may not."""
    import lora_manip.eval.generate as gen

    data = tmp_path / "data"
    shutil.copytree(synth_dir, data)
    records = json.loads((data / "val.json").read_text())[:6]
    (data / "val.json").write_text(json.dumps(records))
    real, calls = gen.generate, []

    def stops(model, processor, prompts, images, max_new_tokens):
        if calls:  # the second batch: what a truncated image does to a run (ImageError is a UserError)
            raise UserError("cannot read image x.png (OSError: Truncated File Read)")
        calls.append(len(prompts))
        return real(model, processor, prompts, images, max_new_tokens)

    monkeypatch.setattr(gen, "generate", stops)
    args = ["eval", str(tiny_model_dir), "--data", str(data / "val.json"), "--out", str(tmp_path / "ev"),
            "--max-new-tokens", "2", "--batch-size", "2"]
    res = runner.invoke(app, args)
    assert res.exit_code == 2 and "Truncated File Read" in res.output, res.output
    monkeypatch.setattr(gen, "generate", real)
    answered = {r["id"] for r in map(json.loads, (tmp_path / "ev/predictions.jsonl").read_text().splitlines())}
    kept = re.search(r"(\d+) of (\d+) answers are kept in \S+: continue with the same command plus --resume",
                     res.output)  # the way on, in the error's line
    n = int(kept.group(2))
    assert int(kept.group(1)) == len(answered) and 0 < len(answered) < n
    shown = lambda ids: {p for r in records if r["id"] in ids for p in r["images"]}  # noqa: E731
    fixed = sorted(shown({r["id"] for r in records} - answered) - shown(answered))[0]
    Image.new("RGB", (50, 40), (9, 9, 9)).save(data / fixed)  # the broken image, replaced
    res = runner.invoke(app, args + ["--resume"])
    assert res.exit_code in (0, 1), res.output  # 1: some answers of the random model do not parse
    assert len((tmp_path / "ev/predictions.jsonl").read_text().splitlines()) == n
    assert runner.invoke(app, args + ["--resume"]).exit_code in (0, 1)  # the new stamp was kept
    Image.new("RGB", (50, 40), (1, 1, 1)).save(data / sorted(shown(answered))[0])  # an answer's image changed
    res = runner.invoke(app, args + ["--resume"])
    assert res.exit_code == 2 and "image(s)" in res.output and "never mixed" in res.output, res.output


def test_paths_with_a_tilde_the_shell_left_are_home_paths(tiny_model_dir, synth_dir, tmp_path):
    home = tmp_path / "home"
    shutil.copytree(synth_dir, home / "data")
    (home / "model").symlink_to(tiny_model_dir, target_is_directory=True)
    (home / "reg.yaml").write_text("datasets:\n  v_val:\n    annotation_path: data/val.json\n    data_path: data\n")
    env = {"HOME": str(home)}
    res = runner.invoke(app, ["eval", "~/model", "--data=~/data/val.json", "--data-root=~/data", "--limit", "1",
                              "--max-new-tokens", "2", "--out", "~/ev"], env=env)
    assert res.exit_code in (0, 1) and (home / "ev/predictions.jsonl").is_file(), res.output
    res = runner.invoke(app, ["eval", "~/model", "--registry=~/reg.yaml", "--data", "v_val", "--limit", "1",
                              "--max-new-tokens", "2"], env=env)
    assert res.exit_code in (0, 1), res.output
    res = runner.invoke(app, ["score", "~/ev/predictions.jsonl", "--data-root=~/data"], env=env)
    assert res.exit_code in (0, 1) and "dataset" in res.output, res.output


@pytest.mark.parametrize("root, words", [("nowhere", "no such folder"), ("val.json", "is a file, not a folder")])
def test_a_data_root_that_is_no_folder_is_refused_before_the_model_loads(synth_dir, tmp_path, root, words):
    res = runner.invoke(app, ["eval", str(tmp_path / "no-model-needed"), "--data", str(synth_dir / "val.json"),
                              "--data-root", str(synth_dir / root)])
    assert res.exit_code == 2 and f"--data-root {synth_dir / root}: {words}" in res.output, res.output
