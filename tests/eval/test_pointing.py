"""Point-in-mask accuracy (Where2Place / RoboPoint): strict and upstream, on mask PNGs made here."""

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from lora_manip.cli import app
from lora_manip.eval.pointing import load_mask, mask_accuracy, robopoint_accuracy
from lora_manip.eval.score import score_records

approx = pytest.approx
runner = CliRunner()
W, H = 40, 20


def _mask(path, mode="L"):
    """40x20: the left half 255, the right half 0, and pixel (30, 5) grey 128."""
    a = np.zeros((H, W), dtype=np.uint8)
    a[:, : W // 2] = 255
    a[5, 30] = 128
    img = Image.fromarray(a)
    (img.convert("1") if mode == "1" else img).save(path)
    return path


@pytest.fixture
def mask(tmp_path):
    (tmp_path / "masks").mkdir()
    return load_mask(_mask(tmp_path / "masks" / "00.png"))


def test_strict_mean_over_points(mask):
    assert mask_accuracy([(0.25, 0.5)], mask) == 1.0
    assert mask_accuracy([(0.25, 0.5), (0.75, 0.5)], mask) == 0.5  # one in, one out of the region
    assert mask_accuracy([(30.5 / W, 5.5 / H)], mask) == approx(128 / 255)  # soft mask: partial credit
    assert mask_accuracy([(1.2, 0.5), (0.25, 0.5)], mask) == 0.5  # off the image: 0
    assert mask_accuracy([(-0.01, 0.5)], mask) == 0.0  # floor(-0.4) = -1: off the image
    assert mask_accuracy([], mask) == 0.0


def test_robopoint_rules(mask):
    assert robopoint_accuracy("[(0.25, 0.5)]", mask) == 1.0  # '.' -> fraction: int(0.25 * 40) = 10
    assert robopoint_accuracy("(10, 10)", mask) == 1.0  # no '.' -> pixels
    assert robopoint_accuracy("(0.5, 10)", mask) == 0.0  # one float scales both: y = 200, off the image
    assert robopoint_accuracy("(-0.01, 0.5)", mask) == 1.0  # LEAK: int() truncates -0.4 to 0, on the image
    assert robopoint_accuracy("[0.25, 0.5]", mask) == 0.0  # square brackets are no tuple: scored 0, not skipped
    assert robopoint_accuracy("(0, 0, 2, 1)", mask) == 1.0  # a 4-tuple: every pixel of the box, here 2
    assert robopoint_accuracy("(18, 0, 22, 1)", mask) == 0.5  # 4 pixels, 2 of them in the region
    assert robopoint_accuracy("(0, 0.1, 2, 1)", mask) is None  # x0 pixel, y0 fraction: reader raises -> skipped
    assert robopoint_accuracy("(0.25, 0.5) (50, 10)", mask) == 0.5  # off-image point counts 0


def test_one_bit_masks_count_as_full(tmp_path):
    m = load_mask(_mask(tmp_path / "m.png", mode="1"))
    assert mask_accuracy([(0.25, 0.5)], m) == 1.0  # not 1/255, as numpy on a bool image would give


def _records():
    return [
        {"id": "q0", "task": "where2place", "mask": "masks/00.png", "pred": "[(0.25, 0.5), (0.75, 0.5)]"},
        {"id": "q1", "mask": "masks/00.png", "pred": "The spot is [0.25, 0.5]."},  # kind from the mask field
        {"id": "q2", "task": "where2place", "mask": "masks/00.png", "pred": "I cannot tell."},
        {"id": "q3", "task": "where2place", "mask": "masks/00.png", "pred": "(0, 0.1, 2, 1)"},
        {"id": "q4", "task": "where2place", "mask": "masks/missing.png", "pred": "(1, 1)"},
    ]


def test_score_strict_and_upstream(tmp_path):
    _mask((tmp_path / "masks").mkdir() or tmp_path / "masks" / "00.png")
    rows, s = score_records(_records(), mask_roots=[tmp_path])
    by = {r["id"]: r for r in rows}
    assert by["q0"]["accuracy"] == 0.5 and by["q1"]["accuracy"] == 1.0
    assert by["q2"]["accuracy"] == 0.0 and by["q2"]["parse_error"]  # strict: unparsable counts 0
    assert by["q3"]["accuracy"] == approx(0.5)  # strict reads the 4 numbers as two points: (0, 0.1) and (2, 1)
    p = s["all"]["pointing"]
    assert p["count"] == 4 and p["accuracy"] == approx((0.5 + 1 + 0 + 0.5) / 4) and p["parse_failures"] == 1
    assert s["data_errors"][0]["id"] == "q4" and s["data_errors"][0]["field"] == "mask"

    rows, s = score_records(_records(), upstream_compatible=True, mask_roots=[tmp_path])
    by = {r["id"]: r for r in rows}
    assert by["q0"]["accuracy"] == 0.5 and by["q1"]["accuracy"] == 0.0  # no "(x, y)" tuple: 0
    assert by["q3"]["accuracy"] is None and by["q3"]["skipped"]
    p = s["all"]["pointing"]
    assert p["accuracy"] == approx((0.5 + 0 + 0) / 3) and p["skipped"] == 1 and p["n_scored"] == 3


def test_pixel_answers_with_coords_flag(tmp_path):
    _mask((tmp_path / "masks").mkdir() or tmp_path / "masks" / "00.png")
    rec = [{"id": "px", "task": "where2place", "mask": "masks/00.png", "pred": "[(10, 10), (30, 10)]"}]
    assert score_records(rec, mask_roots=[tmp_path], coords="pixels")[1]["all"]["pointing"]["accuracy"] == 0.5
    assert score_records(rec, mask_roots=[tmp_path], coords="thousand")[1]["all"]["pointing"]["accuracy"] == 1.0


def test_score_cli_masks_relative_to_the_predictions_file_or_data_root(tmp_path):
    data = tmp_path / "where2place"
    (data / "masks").mkdir(parents=True)
    _mask(data / "masks" / "00.png")
    preds = data / "answers.jsonl"
    preds.write_text("".join(json.dumps(r) + "\n" for r in _records()[:3]))
    res = runner.invoke(app, ["score", str(preds)])
    assert res.exit_code == 0, res.output
    assert "pointing" in res.output and "accuracy=0.500" in res.output
    elsewhere = tmp_path / "answers.jsonl"
    elsewhere.write_text(preds.read_text())
    res = runner.invoke(app, ["score", str(elsewhere)])
    assert res.exit_code == 1 and "could not be scored" in res.output and "mask image masks/00.png" in res.output
    res = runner.invoke(app, ["score", str(elsewhere), "--data-root", str(data)])
    assert res.exit_code == 0, res.output
