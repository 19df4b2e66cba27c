"""Wrong input that `data check` used to accept, each named by line, id, field and reason; the one JSON reading rule
(extension case, BOM, duplicate keys) through every reader; the scan cache's damage and staleness checks."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from lora_manip.data.report import Entry, check_entries
from lora_manip.errors import UserError


def rec(rid="bad", answer='{"current_bbox": [0.1, 0.2, 0.5, 0.6]}', **extra):
    return {"id": rid, "images": ["ok.png"], "conversations": [
        {"from": "human", "value": "<image>\nWhere is the cube?"}, {"from": "gpt", "value": answer}], **extra}


def box(value):
    return rec(answer=json.dumps({"current_bbox": value}))


# name -> (record or raw line; problem kind, field, words of the reason, record id named)
WRONG = {
    "inverted box": (box([0.5, 0.6, 0.1, 0.2]), "box_inverted", "conversations[1].value", "inverted box", "bad"),
    "one-point box": (box([[0.1, 0.2]]), "coords_malformed", "conversations[1].value", "is not a box", "bad"),
    "five-number box": (box([0.1, 0.2, 0.3, 0.4, 0.5]), "coords_malformed", "conversations[1].value",
                        "5 number(s)", "bad"),
    "string coordinates": (box(["0.1", "0.2", "0.5", "0.6"]), "coords_malformed", "conversations[1].value",
                           'holds "0.1", not numbers', "bad"),
    "odd point": (rec(answer='{"contact_point": [0.1, 0.2, 0.3]}'), "coords_malformed", "conversations[1].value",
                  "[x, y] points", "bad"),
    "object id": (rec(rid={"k": 1}), "invalid_record", "id", "string or an integer", "{'k': 1}"),
    "boolean width": (rec(width=True, height=48), "invalid_record", "width", "positive number", "bad"),
    "string height": (rec(width=64, height="48"), "invalid_record", "height", "positive number", "bad"),
    "duplicate record key": ('{"id": "bad", "images": ["ok.png"], "images": ["ok.png"], "conversations": []}',
                             "duplicate_key", "<record>", "duplicate key 'images'", "bad"),
    "<image> in a system turn": ({"id": "bad", "images": ["ok.png"], "conversations": [
        {"from": "system", "value": "Look at <image> first."}, {"from": "human", "value": "Where?"},
        {"from": "gpt", "value": "here"}]}, "placeholder_mismatch", "conversations[0].value", "system prompt", "bad"),
}


@pytest.fixture()
def root(tmp_path):
    Image.new("RGB", (64, 48), (200, 10, 10)).save(tmp_path / "ok.png")
    return tmp_path


def write(root, name, lines):
    path = root / name
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


@pytest.mark.parametrize("name", sorted(WRONG))
def test_wrong_input_is_reported_with_line_id_field_and_reason(root, name):
    bad, kind, fld, words, rid = WRONG[name]
    path = write(root, "a.jsonl", [rec("good"), bad])
    report = check_entries([Entry("a", str(path), str(root))])
    assert report["problem_counts"] == {kind: 1}, report["problems"]
    (p,) = report["problems"]
    assert (p["where"], p["field"], p["record_id"]) == ("line 2", fld, rid) and words in p["reason"], p
    assert report["datasets"][0]["valid"] == 1


def test_valid_shapes_stay_valid(root):
    """Every shape the scorer reads: flat and corner boxes, lists of boxes, points flat or paired, zero-size."""
    answers = [{"current_bbox": [0.1, 0.2, 0.5, 0.6]}, {"current_bbox": [[0.1, 0.2], [0.5, 0.6]]},
               {"boxes": [[0.1, 0.2, 0.5, 0.6], [0, 0, 1, 1]]}, {"gripper_bbox": [[[0.1, 0.2], [0.5, 0.6]]]},
               {"contact_point": [0.5, 0.5]}, {"contact_point": [[0.1, 0.2], [0.3, 0.4]]},
               {"contact_points": [0.1, 0.2, 0.3, 0.4]}, {"future_traj": [[0, 0], [1, 1]]},
               {"current_bbox": [0.3, 0.3, 0.3, 0.3]}, [{"bbox_2d": [0.1, 0.2, 0.5, 0.6]}]]
    path = write(root, "a.jsonl", [rec(f"r{i}", json.dumps(a), width=64, height=48.0)
                                   for i, a in enumerate(answers)])
    report = check_entries([Entry("a", str(path), str(root))])
    assert report["ok"], report["problems"]


def test_a_system_prompt_with_an_image_placeholder_is_one_line(root, processor):
    """Refused before a record is read (the scan: training's start and data check), and wherever a prompt is built
    (encode: training, eval, predict)."""
    from lora_manip.data.encode import Chat, with_system
    from lora_manip.data.records import RecordIndex
    from lora_manip.data.scan import scan

    path = write(root, "a.jsonl", [rec("good")])
    for chat in (Chat(None, "You see <image>."), Chat(processor, "You see <image>.")):
        with pytest.raises(UserError, match="<image> inside a system prompt"):
            scan(RecordIndex(path), str(root), None, chat, workers=1)
    with pytest.raises(UserError, match="<image> inside a system prompt"):
        with_system([{"role": "user", "content": "q"}], "You see <image>.")


# ------------------------------------------------------------------------------------------- one reading rule
def _annotations(path):
    from lora_manip.data.records import Problem, RecordIndex

    index = RecordIndex(path)
    got = [index.read(i) for i in range(len(index))]
    bad = [g for g in got + index.problems if isinstance(g, Problem)]
    if bad:
        raise UserError(str(bad[0]))
    return [g["id"] for g in got]


def _eval_data(path):
    from lora_manip.data.records import load_samples

    samples, problems = load_samples(path, path.parent)
    if problems:
        raise UserError(str(problems[0]))
    return [s.id for s in samples]


def _predictions(path):
    from lora_manip.eval.report import load_predictions

    return [str(r["id"]) for r in load_predictions(path)]


def _normalize(path):
    from lora_manip.data.normalize import normalize_file

    suffix = path.suffix if path.suffix.lower() in (".json", ".jsonl") else ".json"  # OUT must be .json / .jsonl
    out = normalize_file(path, path.parent / ("out" + suffix), "thousand")
    if out["problems"]:
        raise UserError(out["problems"][0]["reason"])
    return [str(r["id"]) for r in (json.loads(line) for line in open(out["output"], encoding="utf-8"))] \
        if path.suffix.lower() == ".jsonl" else [str(r["id"]) for r in json.load(open(out["output"]))]


READERS = {"annotations": _annotations, "eval data": _eval_data, "predictions": _predictions,
           "normalize": _normalize}
RECORDS = [rec("a", answer='{"current_bbox": [100, 200, 500, 600]}', pred="x", gt="y"),
           rec("b", answer='{"current_bbox": [100, 200, 500, 600]}', pred="x", gt="y")]


def _file(tmp_path, name, bom=False, array=None):
    array = name.lower().endswith(".json") if array is None else array
    text = json.dumps(RECORDS) if array else "".join(json.dumps(r) + "\n" for r in RECORDS)
    Image.new("RGB", (1000, 1000)).save(tmp_path / "ok.png")
    path = tmp_path / name
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode())
    return path


@pytest.mark.parametrize("reader", sorted(READERS))
@pytest.mark.parametrize("name, bom, array", [("d.jsonl", False, None), ("d.JSONL", False, None),
                                              ("d.json", True, None), ("d.Json", False, None),
                                              ("d.jsonl", True, None), ("d.txt", False, True),
                                              ("d.txt", True, False)])
def test_every_reader_takes_extension_case_and_bom_alike(tmp_path, reader, name, bom, array):
    assert READERS[reader](_file(tmp_path, name, bom, array)) == ["a", "b"]


@pytest.mark.parametrize("reader", sorted(READERS))
@pytest.mark.parametrize("name", ["d.jsonl", "d.json"])
def test_every_reader_refuses_a_key_given_twice(tmp_path, reader, name):
    path = _file(tmp_path, name)
    path.write_text(path.read_text().replace('"id": "b"', '"id": "b", "id": "c"'))
    with pytest.raises(UserError, match="duplicate key 'id'"):
        READERS[reader](path)


# ------------------------------------------------------------------------------------------------- scan cache
@pytest.fixture()
def cached(tmp_path, monkeypatch):
    """A data set, the scan cache in a folder of its own, and a counter of real scans."""
    import lora_manip.data.scan_cache as sc
    from lora_manip.data.records import RecordIndex

    monkeypatch.setenv("LORA_MANIP_CACHE", str(tmp_path / "cache"))
    for name in ("a.png", "b.png"):
        Image.new("RGB", (64, 48), (9, 9, 9)).save(tmp_path / name)
    ann = write(tmp_path, "d.jsonl", [dict(rec("r1"), images=["a.png"]), dict(rec("r2"), images=["b.png"])])
    calls = []
    real = sc.scan
    monkeypatch.setattr(sc, "scan", lambda *a, **k: calls.append(1) or real(*a, **k))

    def run():
        return sc.cached_scan(RecordIndex(ann), str(tmp_path), np.arange(2))

    return run, calls, tmp_path


@pytest.mark.parametrize("damage", ["truncated", "flipped byte", "empty", "other file"])
def test_a_damaged_cache_entry_is_rebuilt_never_fatal(cached, damage):
    run, calls, root = cached
    first = run()
    (entry,) = (root / "cache" / "scan").glob("*.npz")
    data = entry.read_bytes()
    entry.write_bytes({"truncated": data[: len(data) // 2], "flipped byte": data[:100] + bytes([data[100] ^ 1])
                       + data[101:], "empty": b"", "other file": b"PK\x03\x04 not a scan"}[damage])
    again = run()
    assert len(calls) == 2 and np.array_equal(again.positions, first.positions)
    assert np.array_equal(run().lengths, first.lengths) and len(calls) == 2  # rewritten: read from the cache


@pytest.mark.parametrize("change", ["truncated", "replaced", "removed"])
def test_an_image_changed_since_the_scan_makes_the_entry_stale(cached, change):
    run, calls, root = cached
    assert run().bad_records == 0 and len(calls) == 1
    img = root / "b.png"
    if change == "truncated":
        img.write_bytes(img.read_bytes()[:60])
    elif change == "replaced":
        Image.new("RGB", (640, 480)).save(img)
        os.utime(img, ns=(1, 1))
    else:
        img.unlink()
    got = run()
    assert len(calls) == 2
    if change == "replaced":
        assert got.bad_records == 0
    else:
        assert got.bad_records == 1 and got.problems[0].record_id == "r2"
    run()
    assert len(calls) == 2  # the rebuilt entry is used


def test_an_image_added_where_it_was_missing_makes_the_entry_stale(cached):
    run, calls, root = cached
    (root / "b.png").unlink()
    assert run().bad_records == 1
    Image.new("RGB", (64, 48)).save(root / "b.png")
    assert run().bad_records == 0 and len(calls) == 2
