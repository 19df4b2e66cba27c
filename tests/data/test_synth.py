"""The synthetic VQA generator: files, format, balance, determinism, and answers that match the pixels drawn."""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lora_manip.data.records import load_samples
from lora_manip.data.synth import COLOURS, CYCLE, GRIPPER_GREY, RECEPTACLES, TASKS, write_synth_dataset
from lora_manip.errors import UserError

N = 96  # 8 cycles: 8 records of each grounding task, 40 choice (10 per letter), 8 yes/no (4 each)
PER_TASK = {t: 8 for t in TASKS} | {"choice": 40}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "ds"
    summary = write_synth_dataset(out, N, seed=3)
    records = json.loads((out / "train.json").read_text()) + json.loads((out / "val.json").read_text())
    return out, summary, records


def _question(r):
    return r["conversations"][0]["value"]


def _answer(r):
    return r["conversations"][1]["value"]


def _pixels(out: Path, r) -> np.ndarray:
    return np.asarray(Image.open(out / r["images"][0]).convert("RGB"))


def _px(img: np.ndarray, x: float, y: float) -> tuple[int, ...]:
    """Pixel at normalised (x, y), clamped into the image."""
    h, w = img.shape[:2]
    return tuple(int(v) for v in img[min(max(int(y * h), 0), h - 1), min(max(int(x * w), 0), w - 1)])


def _target_colour(r) -> tuple[int, int, int]:
    colour = re.search(r'put the (\w+) \w+ (?:on|in) the', _question(r)).group(1)
    return COLOURS[colour]


def _mask_centre(img: np.ndarray, rgb) -> tuple[float, float] | None:
    ys, xs = np.nonzero(np.all(img == np.array(rgb), axis=-1))
    return (xs.mean(), ys.mean()) if len(xs) else None


def _is_gripper(p) -> bool:
    """The gripper's fill or its darker outline: neutral grey (the walls, table and objects are all tinted)."""
    return p[0] == p[1] == p[2] and 80 <= p[0] <= GRIPPER_GREY[0]


def test_files_and_summary(dataset):
    out, summary, records = dataset
    assert (out / "train.json").is_file() and (out / "val.json").is_file()
    assert summary["train"] + summary["val"] == N == len(records)
    assert summary["out_dir"] == str(out)
    assert summary["tasks"] == PER_TASK
    assert not [p for p in (out / "images").iterdir() if p.suffix != ".png"], "temporary files left behind"


@pytest.mark.parametrize("n,frac,n_val", [(40, 0.1, 4), (5, 0.1, 1), (10, 0.0, 0), (3, 0.9, 2), (1, 0.5, 0)])
def test_val_split_size(tmp_path, n, frac, n_val):
    s = write_synth_dataset(tmp_path / "d", n, seed=0, val_fraction=frac)
    train = json.loads((tmp_path / "d" / "train.json").read_text())
    val = json.loads((tmp_path / "d" / "val.json").read_text())
    assert (s["train"], s["val"]) == (len(train), len(val)) == (n - n_val, n_val)


def test_tasks_cycle_and_balance(tmp_path, dataset):
    _, _, records = dataset
    assert Counter(r["task"] for r in records) == PER_TASK
    assert set(CYCLE) == set(TASKS)
    # two cycles and the first three records of a third (current_bbox, choice, final_bbox)
    counts = write_synth_dataset(tmp_path / "d", 2 * len(CYCLE) + 3, seed=1)["tasks"]
    assert counts == {t: 2 for t in TASKS} | {"current_bbox": 3, "final_bbox": 3, "choice": 11}


def test_task_subset(tmp_path):
    """--tasks keeps CYCLE's order and proportions among the chosen tasks (a GRPO prompt set of one task)."""
    counts = write_synth_dataset(tmp_path / "g", 10, seed=1, tasks=["gripper_bbox"])["tasks"]
    assert counts == {"gripper_bbox": 10}
    recs = json.loads((tmp_path / "g" / "train.json").read_text()) + json.loads((tmp_path / "g" / "val.json").read_text())
    assert {r["task"] for r in recs} == {"gripper_bbox"} and len(recs) == 10
    assert write_synth_dataset(tmp_path / "m", 12, seed=1, tasks=["yesno", "choice"])["tasks"] == {"choice": 10,
                                                                                                "yesno": 2}
    recs = [r for f in ("train.json", "val.json") for r in json.loads((tmp_path / "m" / f).read_text())]
    letters = Counter(r["conversations"][1]["value"] for r in recs if r["task"] == "choice")
    assert letters == {"A": 3, "B": 3, "C": 2, "D": 2}  # still balanced
    with pytest.raises(UserError, match="synthetic tasks \\['boxes'\\]"):
        write_synth_dataset(tmp_path / "x", 4, tasks=["boxes", "choice"])
    assert not (tmp_path / "x").exists()


def test_task_subset_from_the_cli(tmp_path):
    from typer.testing import CliRunner

    from lora_manip.cli import app

    r = CliRunner().invoke(app, ["data", "synth", str(tmp_path / "g"), "--n", "6", "--tasks", "gripper_bbox, yesno"])
    assert r.exit_code == 0, r.output
    recs = [x for f in ("train.json", "val.json") for x in json.loads((tmp_path / "g" / f).read_text())]
    assert Counter(x["task"] for x in recs) == {"gripper_bbox": 3, "yesno": 3}
    r = CliRunner().invoke(app, ["data", "synth", str(tmp_path / "x"), "--n", "6", "--tasks", "gripper"])
    assert r.exit_code == 2 and "synthetic tasks ['gripper']" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "x").exists()


def test_record_format(dataset):
    out, _, records = dataset
    assert len({r["id"] for r in records}) == N
    for r in records:
        assert re.fullmatch(r"synth_\d{6}", r["id"]) and r["task"] in TASKS
        assert len(r["images"]) == 1 and not Path(r["images"][0]).is_absolute()
        with Image.open(out / r["images"][0]) as im:
            assert im.size == (r["width"], r["height"])
        human, gpt = r["conversations"]
        assert (human["from"], gpt["from"]) == ("human", "gpt")
        assert human["value"].startswith("<image>\n") and human["value"].count("<image>") == 1
        assert "<image>" not in gpt["value"]
    assert {(r["width"], r["height"]) for r in records} >= {(320, 180), (640, 480)}


def test_records_pass_the_loader(dataset):
    out, _, _ = dataset
    samples, problems = load_samples(str(out / "train.json"), str(out))
    assert not problems and samples


def test_coordinate_answers(dataset):
    _, _, records = dataset
    for r in records:
        if r["task"] in ("choice", "yesno"):
            continue
        a = _answer(r)
        # fixed-width numbers, json.dumps separators, parseable JSON keyed by the task name
        assert re.fullmatch(r'\{"%s": \[\[\d\.\d{3}, \d\.\d{3}\](, \[\d\.\d{3}, \d\.\d{3}\])*\]\}' % r["task"], a), a
        pts = json.loads(a)[r["task"]]
        assert all(0.0 <= v <= 1.0 for p in pts for v in p)
        if r["task"] == "future_traj":
            assert len(pts) == 10
        else:
            (x1, y1), (x2, y2) = pts
            assert x1 < x2
            assert y1 == y2 if r["task"] == "contact_point" else y1 < y2


def test_choice_and_yesno_answers(dataset):
    _, _, records = dataset
    choice = [r for r in records if r["task"] == "choice"]
    for r in choice:
        lines = _question(r).split("\n")
        assert [ln[:3] for ln in lines[2:6]] == ["A. ", "B. ", "C. ", "D. "]
        assert len(set(lines[2:6])) == 4
        assert lines[-1] == "Answer with the option's letter from the given choices directly."
    assert Counter(_answer(r) for r in choice) == {L: 10 for L in "ABCD"}
    yesno = Counter(_answer(r) for r in records if r["task"] == "yesno")
    assert yesno == {"Yes": 4, "No": 4}


def test_boxes_and_points_are_where_drawn(dataset):
    out, _, records = dataset
    grey = GRIPPER_GREY
    for r in records:
        if r["task"] in ("choice", "yesno"):
            continue
        img, pts = _pixels(out, r), json.loads(_answer(r))[r["task"]]
        w, h = r["width"], r["height"]
        if r["task"] in ("current_bbox", "contact_bbox"):
            (x1, y1), (x2, y2) = pts
            cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
            assert _px(img, cx, cy) == _target_colour(r), r["id"]
            # tight box: just outside the left and right edges is not the object any more
            assert _px(img, x1 - 3 / w, cy) != _target_colour(r) != _px(img, x2 + 3 / w, cy), r["id"]
        elif r["task"] == "gripper_bbox":
            (x1, y1), (x2, y2) = pts
            assert y1 == 0.0 and _px(img, (x1 + x2) / 2, 0) == grey  # hangs from the top edge
            assert _px(img, (x1 + x2) / 2, (y1 + y2) / 2) == grey, r["id"]
            assert all(_is_gripper(_px(img, x, y2 - 2 / h)) for x in (x1 + 2 / w, x2 - 2 / w))  # fingertips
            assert not _is_gripper(_px(img, (x1 + x2) / 2, y2 - 2 / h))  # open: nothing between the fingers
        elif r["task"] == "contact_point":
            for (x, y), inward in zip(pts, (1, -1)):
                inside = {_px(img, x + inward * k / w, y) for k in range(1, 7)}
                assert _target_colour(r) in inside, r["id"]
                assert _px(img, x - inward * 3 / w, y) != _target_colour(r), r["id"]
        elif r["task"] == "final_bbox":
            (x1, y1), (x2, y2) = pts
            p = _px(img, (x1 + x2) / 2, y2 - 2 / h)  # the object's base rests inside the receptacle
            fills = {c for f in RECEPTACLES.values() for c in (f, tuple(int(v * 0.75) for v in f))}
            assert p in fills, (r["id"], p)
        elif r["task"] == "future_traj":
            sx, sy = pts[0]
            row = [_is_gripper(_px(img, sx + k / w, sy - 3 / h)) for k in range(-w // 5, w // 5)]
            assert any(row) and not _is_gripper(_px(img, sx, sy - 3 / h)), r["id"]  # starts between the gripper's fingertips
            assert _px(img, *pts[3]) == _target_colour(r), r["id"]  # the grasp point is on the object
            assert pts[4][0] == pts[3][0] and pts[4][1] < pts[3][1]  # then lifts straight up


def test_choice_and_yesno_match_the_image(dataset):
    out, _, records = dataset
    checked = 0
    for r in records:
        if r["task"] not in ("choice", "yesno"):
            continue
        img, q, a = _pixels(out, r), _question(r), _answer(r)
        centres = {c: _mask_centre(img, rgb) for c, rgb in COLOURS.items()}
        shown = {name for name, rgb in RECEPTACLES.items() if _mask_centre(img, rgb)}
        assert len(shown) == 1, (r["id"], shown)  # exactly one container is drawn
        m = re.search(r"Is the (\w+) \w+ to the left of the (\w+) \w+\?", q)
        if m:
            left = centres[m.group(1)][0] < centres[m.group(2)][0]
            assert a == ("Yes" if left else "No"), r["id"]
            checked += 1
        m = re.search(r"Is there a (\w+) on the table\?", q)
        if m:
            assert a == ("Yes" if m.group(1) in shown else "No"), r["id"]
            checked += 1
        if r["task"] == "choice":
            options = dict(ln.split(". ", 1) for ln in q.split("\n")[2:6])
            assert {options[a]} == shown, r["id"]
            checked += 1
    assert checked == sum(r["task"] in ("choice", "yesno") for r in records)


def test_deterministic_per_seed(tmp_path):
    random.seed(1)
    a = write_synth_dataset(tmp_path / "a", 16, seed=7)
    random.seed(2)  # the global RNG must play no part
    b = write_synth_dataset(tmp_path / "b", 16, seed=7)
    write_synth_dataset(tmp_path / "c", 16, seed=8)
    assert a["tasks"] == b["tasks"]
    for name in ("train.json", "val.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    imgs = sorted(p.name for p in (tmp_path / "a" / "images").iterdir())
    assert len(imgs) == 16
    assert all((tmp_path / "a/images" / f).read_bytes() == (tmp_path / "b/images" / f).read_bytes() for f in imgs)
    assert (tmp_path / "a/train.json").read_bytes() != (tmp_path / "c/train.json").read_bytes()
    assert any((tmp_path / "a/images" / f).read_bytes() != (tmp_path / "c/images" / f).read_bytes() for f in imgs)


def test_refuses_to_overwrite(tmp_path):
    write_synth_dataset(tmp_path, 4, seed=0)
    before = (tmp_path / "train.json").read_bytes()
    with pytest.raises(UserError, match="already holds a dataset"):
        write_synth_dataset(tmp_path, 4, seed=1)
    assert (tmp_path / "train.json").read_bytes() == before


def test_an_interrupted_run_is_repeated_whole(tmp_path):
    from lora_manip.outputs import MARKER, write_marker

    write_marker(tmp_path, "synth")  # what a run stopped before train.json leaves: its own folder, images in it
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "000000.png").write_bytes(b"half an image")
    write_synth_dataset(tmp_path, 4, seed=0)
    with Image.open(tmp_path / "images" / "000000.png") as im:
        im.load()
    assert sorted(p.name for p in tmp_path.iterdir()) == [MARKER, "images", "train.json", "val.json"]  # no .partial


@pytest.mark.parametrize("kwargs", [{"n": 0}, {"n": 4, "val_fraction": 1.0}, {"n": 4, "val_fraction": -0.1}])
def test_rejects_bad_arguments(tmp_path, kwargs):
    with pytest.raises(UserError):
        write_synth_dataset(tmp_path / "d", **kwargs)
    assert not (tmp_path / "d" / "train.json").exists()
