"""`data check` and the checks training runs on start: every bad-input kind, named by file, line, id and field."""

from __future__ import annotations

import json

import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from lora_manip.cli import app
from lora_manip.data.encode import Chat
from lora_manip.data.report import Entry, check_entries, format_report
from lora_manip.data.dataset import build_datasets
from lora_manip.errors import UserError
from lora_manip.recipe import recipe_from_dict

from tests.conftest import tiny_recipe_dict

runner = CliRunner()


def turn(who, text):
    return {"from": who, "value": text}


def rec(rid, answer="Yes", images=("ok.png",), question=None, **extra):
    q = question if question is not None else "<image>\n" * len(images) + "Is the cube red?"
    return {"id": rid, "images": list(images), "conversations": [turn("human", q), turn("gpt", answer)], **extra}


GOOD = rec("good", '{"current_bbox": [[0.1, 0.2], [0.5, 0.6]]}')

# kind -> (bad record, or a raw line; field named; words of the reason)
CASES = {
    "malformed_json": ('{"id": "bad", "images": ["ok.png"] "conversations": []}', "<record>", "malformed JSON"),
    "missing_image": (rec("bad", images=("nope.png",)), "images[0]", "not found"),
    "unreadable_image": (rec("bad", images=("garbage.png",)), "images[0]", "cannot read image"),
    "path_escapes_root": (rec("bad", images=("../outside.png",)), "images", "escapes the data root"),
    "placeholder_mismatch": (rec("bad", question="<image><image> Two?"), "conversations", "2 <image> placeholder"),
    "empty_conversation": ({"id": "bad", "images": [], "conversations": []}, "conversations", "missing or empty"),
    "non_alternating": ({"id": "bad", "conversations": [turn("human", "a"), turn("human", "b"), turn("gpt", "c")]},
                        "conversations[1].from", "alternate"),
    "empty_answer": (rec("bad", answer="  "), "conversations[1].value", "empty answer"),
    "coords_out_of_range": (rec("bad", '{"final_bbox": [[123, 45], [0.5, 0.6]]}'), "conversations[1].value",
                            "look like pixel coordinates"),
    "short_trajectory": (rec("bad", '{"future_traj": [[0.1, 0.2]]}'), "conversations[1].value",
                         "1 point(s); a trajectory needs at least 2"),
    "box_inverted": (rec("bad", '{"current_bbox": [[0.5, 0.6], [0.1, 0.2]]}'), "conversations[1].value",
                     "inverted box"),
    "coords_malformed": (rec("bad", '{"current_bbox": ["0.1", "0.2", "0.5", "0.6"]}'), "conversations[1].value",
                         "not numbers"),
    "duplicate_key": (rec("bad", '{"current_bbox": [0.1, 0.2, 0.5, 0.6], "current_bbox": [0, 0, 1, 1]}'),
                      "conversations[1].value", "twice"),
}


@pytest.fixture()
def root(tmp_path):
    Image.new("RGB", (64, 48), (200, 10, 10)).save(tmp_path / "ok.png")
    (tmp_path / "garbage.png").write_bytes(b"this is not an image")
    Image.new("RGB", (8, 8)).save(tmp_path.parent / "outside.png")
    return tmp_path


def write(root, name, lines):
    path = root / name
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


@pytest.mark.parametrize("kind", sorted(CASES))
def test_each_bad_input_is_named(root, kind):
    bad, fld, words = CASES[kind]
    path = write(root, "a.jsonl", [GOOD, bad, GOOD | {"id": "good2"}])
    report = check_entries([Entry("a", str(path), str(root))])
    assert not report["ok"] and report["problem_counts"] == {kind: 1}, report["problems"]
    (p,) = report["problems"]
    assert p["file"] == str(path) and p["where"] == "line 2" and p["field"] == fld and words in p["reason"]
    if kind != "malformed_json":  # a line that does not parse has no id to name
        assert p["record_id"] == "bad"
    assert report["datasets"][0]["valid"] == 2


def test_negative_coordinates_get_no_pixel_hint(root):
    path = write(root, "a.jsonl", [rec("neg", '{"contact_point": [[-0.2, 0.5]]}')])
    (p,) = check_entries([Entry("a", str(path), str(root))])["problems"]
    assert "outside [0, 1] (-0.2)" in p["reason"] and "pixel" not in p["reason"]


def test_bare_list_answers_are_checked_by_the_scorers_kind(root):
    """A bare JSON list holds coordinates when the classifier that scores the record says so: by its task name
    (traj_wo_init_pos is a trajectory though no key says traj) or, without a task, by the answer's format."""
    lines = [rec("t", "[[0.1, 0.2]]", task="traj_wo_init_pos"), rec("p", "[[120, 40], [0.5, 0.6]]"),
             rec("c", "[[0.1, 0.2]]", task="traj_choice")]  # a choice question: not coordinates
    path = write(root, "a.jsonl", lines)
    got = {p["record_id"]: p["kind"] for p in check_entries([Entry("a", str(path), str(root))])["problems"]}
    assert got == {"t": "short_trajectory", "p": "coords_out_of_range"}


def test_json_array_problems_name_the_index(root):
    path = root / "a.json"
    path.write_text(json.dumps([GOOD, rec("bad", images=("nope.png",))], indent=1))
    (p,) = check_entries([Entry("a", str(path), str(root))])["problems"]
    assert p["where"].startswith("index 1 (line ") and p["record_id"] == "bad"


def test_statistics(root, processor):
    lines = [GOOD, rec("c", "B", task="choice"), rec("t", "ok", images=()),
             rec("two", "Yes", images=("ok.png", "ok.png"))]
    path = write(root, "a.jsonl", lines)
    report = check_entries([Entry("mix", str(path), str(root))], Chat(processor, "You are a helpful assistant."),
                           max_length=10_000, batch_size=2)
    (d,) = report["datasets"]
    assert report["ok"] and d["records"] == d["valid"] == 4
    # no `task` field: the kind the scorer gives the answer (answers/kinds.py)
    assert d["tasks"] == {"box": 1, "choice": 1, "planning": 1, "yesno": 1}
    assert d["images_per_record"] == {"0": 1, "1": 2, "2": 1}
    t = d["token_lengths"]
    assert t["min"] < t["p50"] <= t["max"] and d["over_max_length"] == 0
    assert 0 < report["padding_efficiency"]["random"] <= 1 and 0 < report["padding_efficiency"]["grouped"] <= 1
    short = check_entries([Entry("mix", str(path), str(root))], Chat(processor, None), max_length=t["p50"],
                          batch_size=2)
    assert 0 < short["datasets"][0]["over_max_length_share"] < 1


def cli(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout


def test_cli_exit_codes_and_json(root):
    clean = write(root, "clean.jsonl", [GOOD])
    code, out = cli("data", "check", clean)
    assert code == 0 and "no problems found" in out and "token lengths not computed" in out
    bad = write(root, "bad.jsonl", [GOOD] + [rec(f"b{i}", images=("nope.png",)) for i in range(4)])
    code, out = cli("data", "check", bad, "--show", "2")
    assert code == 1 and "image file missing (missing_image): 4" in out
    assert out.count("id='b") == 2 and "... and 2 more (--json lists all)" in out
    code, out = cli("data", "check", bad, "--json")
    report = json.loads(out)
    assert code == 1 and [p["record_id"] for p in report["problems"]] == ["b0", "b1", "b2", "b3"]
    code, out = cli("data", "check", root / "missing.json")
    assert code == 2


def test_cli_checks_a_recipe_through_the_registry(root, tiny_model_dir, tmp_path_factory):
    write(root, "train.jsonl", [GOOD, rec("bad", answer="")])
    write(root, "val.jsonl", [GOOD])
    registry = root / "datasets.yaml"
    registry.write_text(yaml.safe_dump({"datasets": {
        "mine_train": {"annotation_path": "train.jsonl", "data_path": "."},
        "mine_val": {"annotation_path": "val.jsonl", "data_path": "."}}}))
    raw = tiny_recipe_dict(tiny_model_dir, root, tmp_path_factory.mktemp("out") / "run")
    raw["data"] = {"registry": str(registry), "train": [{"name": "mine_train"}], "val": [{"name": "mine_val%100"}]}
    recipe = root / "r.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    code, out = cli("data", "check", recipe, "--json")
    report = json.loads(out)
    assert code == 1 and [d["name"] for d in report["datasets"]] == ["mine_train", "mine_val"]
    assert [d["split"] for d in report["datasets"]] == ["train", "val"] and report["tokens_computed"]
    assert report["problem_counts"] == {"empty_answer": 1} and report["problems"][0]["record_id"] == "bad"
    assert report["padding_efficiency"]["batch_size"] == 4  # the recipe's per_device_batch_size
    assert report["padding_efficiency"]["batching"] == "length-grouped"  # the schema's default
    code, out = cli("data", "check", recipe, "--set", "data.group_by_length=false")
    (line,) = [x for x in out.splitlines() if x.startswith("padding efficiency")]
    assert code == 1 and "% in random order (data.group_by_length: false); length grouping would give " in line
    assert "length-grouped" not in line  # never trained that way: not shown as if it applied


@pytest.mark.parametrize("batching, says, not_said", [
    ("length-grouped", "% length-grouped (data.group_by_length: true); random order would give ", "random order 1"),
    ("random", "% in random order (data.group_by_length: false); length grouping would give ", "length-grouped"),
    ("token-budget", "(training batches by train.max_tokens_per_batch, not by this batch size)", None),
    (None, "random order ", "data.group_by_length"),  # one file, no recipe: both, neither claimed
])
def test_the_padding_line_says_which_order_training_uses(root, processor, batching, says, not_said):
    path = write(root, "a.jsonl", [GOOD, rec("t", "ok", images=()), rec("c", "B", task="choice")])
    report = check_entries([Entry("a", str(path), str(root))], Chat(processor, None), batch_size=2,
                           batching=batching)
    (line,) = [x for x in format_report(report).splitlines() if x.startswith("padding efficiency")]
    assert says in line and (not_said is None or not_said not in line), line


def test_missing_registry_files_name_the_registry_root_and_every_one_is_listed(root, tmp_path):
    """A wrong registry root: each missing file, train and val, is a problem saying it came from the registry and
    which root to check; a missing file the recipe names itself gets no registry hint."""
    wrong = tmp_path / "wrong-root"
    registry = tmp_path / "datasets.yaml"
    registry.write_text(yaml.safe_dump({"root": str(wrong), "datasets": {
        n: {"annotation_path": f"{n}.json", "data_path": "."} for n in ("a_train", "b_train", "c_val")}}))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"path": str(tmp_path / "no-model")}, "method": "lora", "train": {"output_dir": str(tmp_path / "o")},
        "data": {"registry": str(registry), "train": [{"name": "all"}, {"name": "mine", "data_path": str(root),
                                                                      "annotation_path": str(root / "gone.json")}],
                 "val": [{"name": "all"}]}}))
    code, out = cli("data", "check", recipe, "--json")
    problems = json.loads(out)["problems"]
    assert code == 1 and [p["kind"] for p in problems] == ["missing_file"] * 4
    hint = f"check the registry's root ({registry}: root = {wrong})"
    a, b, mine, c = problems  # train (the registry's, then the recipe's own), then val
    for p, name in ((a, "a_train"), (b, "b_train"), (c, "c_val")):
        assert p["field"] == "annotation_path" and p["reason"].endswith(
            f"not found; dataset {name!r} takes its annotation_path from the registry; {hint}"), p
    assert mine["reason"] == f"annotation file {root / 'gone.json'} not found"  # the recipe's own path
    code, out = cli("data", "check", recipe)
    assert code == 1 and all(n in out for n in ("a_train.json", "b_train.json", "c_val.json", "gone.json"))


def _recipe(root, tiny_model_dir, out, **data):
    raw = tiny_recipe_dict(tiny_model_dir, root, out)
    raw["data"] = {"train": [{"annotation_path": str(root / "a.jsonl"), "data_path": str(root)}], **data}
    return recipe_from_dict(raw)


def test_training_refuses_bad_records_and_names_them(root, processor, tiny_model_dir, tmp_path):
    write(root, "a.jsonl", [GOOD, rec("bad1", images=("nope.png",)), rec("bad2", answer=" ")])
    with pytest.raises(UserError) as e:
        build_datasets(_recipe(root, tiny_model_dir, tmp_path / "o").data, processor, seed=0)
    msg = str(e.value)
    assert "2 problem(s) in the train data" in msg and "id='bad1'" in msg and "id='bad2'" in msg
    assert "skip_bad_records" in msg and "lora-manip data check" in msg


def test_skip_bad_records_logs_counts_per_reason(root, processor, tiny_model_dir, tmp_path, caplog):
    write(root, "a.jsonl", [GOOD, rec("bad1", images=("nope.png",)), rec("bad2", images=("nope.png",)),
                            rec("bad3", answer=" "), GOOD | {"id": "good2"}])
    recipe = _recipe(root, tiny_model_dir, tmp_path / "o", skip_bad_records=True)
    with caplog.at_level("WARNING"):
        train, val = build_datasets(recipe.data, processor, seed=0)
    assert len(train) == 2 and val is None
    assert train.dropped == {"bad record: image file missing": 2, "bad record: empty answer": 1}
    assert "skipped 2 bad record: image file missing" in caplog.text
    assert "skipped 1 bad record: empty answer" in caplog.text


def test_process_pool_scan_equals_serial(synth_dir, processor, monkeypatch):
    import numpy as np

    from lora_manip.data import scan
    from lora_manip.data.records import RecordIndex

    lines = [json.dumps(r) for r in json.loads((synth_dir / "train.json").read_text())]
    lines[3] = lines[3].replace('"images": ["', '"images": ["missing/')  # one bad record among them
    path = synth_dir.parent / "pool.jsonl"
    path.write_text("\n".join(lines))
    serial = scan.scan(RecordIndex(path), str(synth_dir), None, Chat(processor, "S"), workers=1)
    monkeypatch.setattr(scan, "POOL_THRESHOLD", 0)
    monkeypatch.setattr(scan, "_CHUNK", 10)  # several tasks, merged in order
    pooled = scan.scan(RecordIndex(path), str(synth_dir), None, Chat(processor, "S"), workers=2)
    assert np.array_equal(serial.positions, pooled.positions) and np.array_equal(serial.lengths, pooled.lengths)
    assert np.array_equal(serial.tiles, pooled.tiles) and (serial.tiles >= 1).all()
    assert serial.problems == pooled.problems and len(serial.problems) == 1 and serial.tasks == pooled.tasks
    assert len(serial.positions) == len(lines) - 1 and (serial.lengths > 0).all()
