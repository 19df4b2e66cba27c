"""Resized pixels (RoboInter's smart_resize_format) are pixels of the record's own `new_w` x `new_h` when it states
them: `data normalize --from resized` divides by those and says per record when the kit's smart_resize differs, and
`data check` names that size beside the pixel hint."""

from __future__ import annotations

import json

from PIL import Image

from lora_manip.data.check import run_check
from lora_manip.data.normalize import normalize_file, smart_resize


def _rec(rid: str, box: list, **extra) -> dict:
    answer = json.dumps({"current_bbox": box})
    return {"id": rid, "task": "current_box", "images": "f.png", "gt": answer, "w": 640, "h": 480, **extra,
            "conversations": [{"from": "human", "value": "<image>\nWhere is it?"}, {"from": "gpt", "value": answer}]}


def _write(tmp_path, recs: list[dict]):
    Image.new("RGB", (640, 480)).save(tmp_path / "f.png")
    path = tmp_path / "sr.json"
    path.write_text(json.dumps(recs))
    return path


def test_resized_pixels_are_divided_by_the_records_new_w_and_new_h(tmp_path):
    assert smart_resize(480, 640) == (476, 644)  # what the kit computes for a 640 x 480 image
    src = _write(tmp_path, [_rec("own", [[154, 112], [616, 448]], new_w=616, new_h=448),
                            _rec("same", [[161, 119], [644, 476]], new_w=644, new_h=476),
                            _rec("none", [[161, 119], [644, 476]])])
    s = normalize_file(src, tmp_path / "out.json", "resized")
    assert s["converted"] == 3 and s["problems"] == []
    out = json.loads((tmp_path / "out.json").read_text())
    assert [json.loads(r["gt"])["current_bbox"] for r in out] == [[[0.25, 0.25], [1.0, 1.0]]] * 3
    detail = {r["id"]: r["detail"] for r in s["rows"]}
    assert detail["own"] == ("divided by 616 x 448, the record's new_w x new_h, not the 644 x 476 that "
                             "smart_resize gives for 640 x 480")
    assert detail["same"] == "divided by 644 x 476, the record's new_w x new_h" and detail["none"] == \
        "divided by 644 x 476"
    assert normalize_file(src, tmp_path / "px.json", "pixels")["refused"] == 2  # pixels: w x h (644 > 640)


def test_unusable_new_w_new_h_refuse_the_record_naming_the_field(tmp_path):
    src = _write(tmp_path, [_rec("half", [[10, 10], [20, 20]], new_w=616),
                            _rec("text", [[10, 10], [20, 20]], new_w="616", new_h=448)])
    s = normalize_file(src, tmp_path / "out.json", "resized")
    assert s["output"] is None and [(p["record_id"], p["field"]) for p in s["problems"]] == [
        ("half", "new_w"), ("text", "new_w")]
    assert "`new_w` / `new_h` must both be positive whole numbers of pixels, not 616 / None" in \
        s["problems"][0]["reason"]


def test_data_check_names_the_resized_size_beside_the_pixel_hint(tmp_path):
    src = _write(tmp_path, [_rec("own", [[154, 112], [616, 448]], new_w=616, new_h=448),
                            _rec("plain", [[154, 112], [616, 448]])])
    problems = run_check(str(src))["problems"]
    own = [p["reason"] for p in problems if p["record_id"] == "own"]
    plain = [p["reason"] for p in problems if p["record_id"] == "plain"]
    assert own and all("`--from resized` if they are pixels of its new_w x new_h (616 x 448)" in r for r in own)
    assert plain and not any("new_w" in r for r in plain)
