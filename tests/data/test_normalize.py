"""`data normalize`: pixel coordinates -> [0, 1], into a new file; the input is never touched."""

from __future__ import annotations

import json

import pytest
from PIL import Image
from typer.testing import CliRunner

from lora_manip.cli import app
from lora_manip.data.report import Entry, check_entries
from lora_manip.data.normalize import normalize_file, smart_resize
from lora_manip.errors import UserError

runner = CliRunner()


def rec(rid, answer, **extra):
    return {"id": rid, "images": ["f.png"], "conversations": [
        {"from": "human", "value": "<image>\nWhere?"}, {"from": "gpt", "value": answer}], **extra}


@pytest.fixture()
def src(tmp_path):
    Image.new("RGB", (640, 480)).save(tmp_path / "f.png")
    recs = [
        rec("fields", '{"current_bbox": [[320, 240], [640, 480]]}', width=640, height=480),
        rec("header", '{"future_traj": [[64, 48], [128, 96], [192, 144]]}'),
        rec("flat", '{"gripper_box": [160, 120, 480, 360]}'),
        rec("choice", "B"),
        rec("done", '{"contact_point": [[0.25, 0.5]]}'),
    ]
    path = tmp_path / "pixels.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    return path


def answers(path):
    return [json.loads(line)["conversations"][1]["value"] for line in path.read_text().splitlines()]


def test_pixels_to_unit_coordinates(src, tmp_path):
    before = src.read_bytes()
    out = tmp_path / "unit.jsonl"
    s = normalize_file(src, out, "pixels")
    assert src.read_bytes() == before  # the input is never modified
    assert (s["converted"], s["already_normalised"], s["no_coordinates"], s["problems"]) == (3, 1, 1, [])
    assert answers(out) == ['{"current_bbox": [[0.5, 0.5], [1.0, 1.0]]}',
                            '{"future_traj": [[0.1, 0.1], [0.2, 0.2], [0.3, 0.3]]}',
                            '{"gripper_box": [0.25, 0.25, 0.75, 0.75]}', "B", '{"contact_point": [[0.25, 0.5]]}']
    report = check_entries([Entry("u", str(out), str(tmp_path))])
    assert report["ok"], report["problems"]
    as_array = tmp_path / "unit.json"  # the output format follows its suffix
    normalize_file(src, as_array, "pixels")
    assert [r["conversations"][1]["value"] for r in json.loads(as_array.read_text())] == answers(out)


def test_resized_and_thousand_units(src, tmp_path):
    assert smart_resize(480, 640) == (476, 644)
    assert smart_resize(180, 320) == (168, 308)
    h, w = smart_resize(4000, 6000)
    assert h % 28 == w % 28 == 0 and h * w <= 28 * 28 * 16384
    resized = tmp_path / "resized.jsonl"
    resized.write_text(json.dumps(rec("q", '{"current_bbox": [[322, 238], [644, 476]]}', width=640, height=480)))
    normalize_file(resized, tmp_path / "o1.jsonl", "resized")
    assert answers(tmp_path / "o1.jsonl") == ['{"current_bbox": [[0.5, 0.5], [1.0, 1.0]]}']
    k = tmp_path / "k.jsonl"
    k.write_text(json.dumps(rec("k", '{"current_bbox": [[100, 250], [1000, 500]]}')))
    normalize_file(k, tmp_path / "o2.jsonl", "thousand")
    assert answers(tmp_path / "o2.jsonl") == ['{"current_bbox": [[0.1, 0.25], [1.0, 0.5]]}']


def test_problems_write_nothing(src, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(src.read_text() + json.dumps(rec("big", '{"current_bbox": [[900, 10], [950, 20]]}')) + "\n"
                   + json.dumps({"id": "noimg", "conversations": [
                       {"from": "human", "value": "Where?"}, {"from": "gpt", "value": '{"point": [[5, 5]]}'}]}))
    s = normalize_file(bad, tmp_path / "out.jsonl", "pixels")
    assert s["output"] is None and not (tmp_path / "out.jsonl").exists()
    assert [(p["record_id"], p["where"]) for p in s["problems"]] == [("big", "line 6"), ("noimg", "line 7")]
    assert "outside the image" in s["problems"][0]["reason"] and "no image size" in s["problems"][1]["reason"]
    assert list(tmp_path.glob(".out.jsonl*")) == []  # no temporary left behind


def test_refuses_to_overwrite(src, tmp_path):
    with pytest.raises(UserError, match="never modified"):
        normalize_file(src, src, "pixels")
    (tmp_path / "exists.jsonl").write_text("keep")
    with pytest.raises(UserError, match="already exists"):
        normalize_file(src, tmp_path / "exists.jsonl", "pixels")
    assert (tmp_path / "exists.jsonl").read_text() == "keep"


def test_cli(src, tmp_path):
    result = runner.invoke(app, ["data", "normalize", str(src), str(tmp_path / "n.jsonl"), "--from", "pixels"])
    assert result.exit_code == 0 and "3 converted, 1 already in [0, 1]" in result.stdout
    result = runner.invoke(app, ["data", "normalize", str(src), str(tmp_path / "m.jsonl"), "--from", "inches"])
    assert result.exit_code == 2 and "--from 'inches'" in result.output
