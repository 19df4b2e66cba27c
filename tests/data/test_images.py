"""The one image reader (data/images.py), through every path that decodes an image: data check, normalize,
encoding sizes, training's collator, GRPO, eval's generation and overlays, pointing masks and rewards. A new decode
path joins by one entry in PIXEL_PATHS / SIZE_PATHS / MASK_PATHS (and the grep test finds any that does not)."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from lora_manip.data import images as I
from lora_manip.data.records import Sample
from lora_manip.errors import UserError

PACKAGE = Path(__file__).resolve().parents[2] / "lora_manip"
W, H = 64, 32  # stored size; orientation 6 (rotate 90 degrees clockwise to view) shows it 32 x 64


def _sample(path) -> Sample:
    return Sample("r1", [{"role": "user", "content": "<image>\nq"}, {"role": "assistant", "content": "a"}],
                  [str(path)], "f.jsonl line 1")


def _collate(path):
    from lora_manip.data.collate import _load_rgb

    return _load_rgb(str(path), "r1")


def _generate(path):
    from lora_manip.eval.generate import load_images

    (img,) = load_images(_sample(path))
    return img


def _grpo(path):
    from lora_manip.train.grpo import _decode

    (img,) = _decode({"prompt": ["[]"], "image_paths": [[str(path)]], "gt": ["x"], "kind": ["box"],
                      "mask": [None], "id": ["r1"]})["images"][0]
    return img


def _overlay(path):
    from lora_manip.eval.run import write_overlays

    out = Path(path).parent / f"ov-{Path(path).stem}"
    rec = {"id": "r1", "kind": "point", "gt": [(0.5, 0.5)], "pred": None}
    write_overlays(str(out), [(rec, _sample(path))])
    with Image.open(out / "overlays" / "r1.png") as im:
        return im.convert("RGB")


# decode paths that hand the model (or a picture) pixels: each must give the same upright 8-bit RGB image
PIXEL_PATHS = {"load_image (predict)": I.load_image, "collate (training)": _collate, "eval generate": _generate,
               "grpo": _grpo, "overlays": _overlay}


def _normalize_size(path):
    from lora_manip.data.images import record_size

    return record_size({"images": [Path(path).name]}, Path(path).parent)


# paths that read the size coordinates and token counts are computed from
SIZE_PATHS = {"data check": I.read_image_size, "encode (header)": I.image_size, "normalize": _normalize_size}


def _reward_mask(path):
    from lora_manip.train import rewards

    rewards._mask.cache_clear()
    return rewards._mask(str(path))


def _score_mask(path):
    from lora_manip.eval.pointing import load_mask

    return load_mask(path)


MASK_PATHS = {"score (pointing)": _score_mask, "reward (in_mask)": _reward_mask, "load_mask": I.load_mask}


def _oriented(tmp_path, orientation=6, name="o.png"):
    """A picture with a red block in its stored top-left corner, stored with an EXIF orientation."""
    im = Image.new("RGB", (W, H), (0, 0, 200))
    im.paste((255, 0, 0), (0, 0, 8, 8))
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / name
    im.save(path, exif=exif)
    return path


@pytest.mark.parametrize("name", sorted(PIXEL_PATHS))
def test_exif_orientation_is_applied_on_every_pixel_path(tmp_path, name):
    path = _oriented(tmp_path)
    with Image.open(path) as im:
        want = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    got = PIXEL_PATHS[name](path)
    assert got.size == (H, W)  # upright: 32 wide, 64 high
    if name != "overlays":  # an overlay draws over the picture; its size is the check there
        assert np.array_equal(np.asarray(got), want)


@pytest.mark.parametrize("name", sorted(SIZE_PATHS))
@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_size_path_reports_the_upright_size(tmp_path, name, orientation):
    """The size coordinates are normalised by and token counts come from must be the decoded picture's."""
    path = _oriented(tmp_path, orientation)
    got = SIZE_PATHS[name](str(path))
    assert got == I.load_image(path).size == ((H, W) if orientation >= 5 else (W, H))


def test_a_late_exif_chunk_gives_one_answer_to_header_and_decode(tmp_path):
    """A PNG may carry its eXIf chunk after the pixels, where a header read cannot see it: both reads must agree
    (else the token count would not match the pixels)."""
    data = _oriented(tmp_path).read_bytes()
    chunks, pos = [], 8
    while pos < len(data):
        n = int.from_bytes(data[pos:pos + 4], "big")
        chunks.append((data[pos + 4:pos + 8], data[pos:pos + 12 + n]))
        pos += 12 + n
    exif = [c for t, c in chunks if t == b"eXIf"]
    rest = [c for t, c in chunks if t != b"eXIf"]
    late = tmp_path / "late.png"
    late.write_bytes(data[:8] + b"".join(rest[:-1]) + b"".join(exif) + rest[-1])
    assert I.image_size(str(late)) == I.read_image_size(str(late)) == I.load_image(late).size


def _gray16(tmp_path, name="g16.png"):
    values = np.linspace(0, 65535, W * H).reshape(H, W).astype(np.uint16)
    Image.fromarray(values).save(tmp_path / name)
    return tmp_path / name, values


@pytest.mark.parametrize("name", sorted(PIXEL_PATHS))
def test_16_bit_images_are_scaled_not_saturated(tmp_path, name):
    path, values = _gray16(tmp_path)
    got = np.asarray(PIXEL_PATHS[name](path))
    if name == "overlays":
        got, values = got[26:, 40:], values[26:, 40:]  # clear of the legend and the drawn point
    assert (got == 255).mean() < 0.05  # Pillow's own convert makes 99.6% of them white
    assert np.abs(got[..., 0].astype(int) - np.rint(values / 257)).max() <= 1


@pytest.mark.parametrize("name", sorted(MASK_PATHS))
def test_masks_binary_16_bit_and_soft(tmp_path, name):
    binary = np.zeros((H, W), np.uint8)
    binary[:8, :8] = 1
    Image.fromarray(binary).save(tmp_path / "m01.png")
    got = MASK_PATHS[name](tmp_path / "m01.png")
    assert got.shape == (H, W) and got[0, 0] == 1.0 and got[-1, -1] == 0.0  # a 0/1 mask: 1 means inside
    path, values = _gray16(tmp_path, "m16.png")
    assert np.allclose(MASK_PATHS[name](path), values / 65535.0)
    soft = np.full((H, W), 128, np.uint8)
    Image.fromarray(soft).save(tmp_path / "soft.png")
    assert np.allclose(MASK_PATHS[name](tmp_path / "soft.png"), 128 / 255)  # partial credit, as before
    oriented = _oriented(tmp_path, 6, "om.png")
    assert MASK_PATHS[name](oriented).shape == (W, H)  # upright like its image


def _decode_errors(path):
    """What each decode path makes of a bad file: a one-line message naming it."""
    out = {}
    for name, fn in {**PIXEL_PATHS, **SIZE_PATHS, **MASK_PATHS}.items():
        try:
            got = fn(path) if name not in SIZE_PATHS else fn(str(path))
        except UserError as e:
            got = str(e)
        out[name] = got
    return out


def test_a_decompression_bomb_is_one_line_on_every_path(tmp_path, monkeypatch):
    path = _oriented(tmp_path)
    monkeypatch.setenv(I.MAX_PIXELS_ENV, "1000")  # a 64 x 32 picture stands in for a 20000 x 20000 one
    for name, msg in _decode_errors(path).items():
        assert isinstance(msg, str) and str(path.name) in msg and "1,000" in msg, name
        assert I.MAX_PIXELS_ENV in msg and "\n" not in msg, name
    monkeypatch.setenv(I.MAX_PIXELS_ENV, str(W * H))  # the setting raises the limit
    assert I.load_image(path).size == (H, W)
    monkeypatch.setenv(I.MAX_PIXELS_ENV, "lots")
    with pytest.raises(UserError, match=I.MAX_PIXELS_ENV):
        I.load_image(path)


@pytest.mark.parametrize("content", [b"not an image", "truncated"])
def test_an_unreadable_file_is_one_line_on_every_path(tmp_path, content):
    path = tmp_path / "bad.png"
    if content == "truncated":
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (H, W, 3), np.uint8)).save(path)
        path.write_bytes(path.read_bytes()[:200])
    else:
        path.write_bytes(content)
    for name, msg in _decode_errors(path).items():
        if content == "truncated" and name == "encode (header)":
            assert msg == (W, H)  # by design a header read: the scan decoded every image in full before
            continue
        assert isinstance(msg, str) and "bad.png" in msg and "\n" not in msg, (name, msg)


def test_no_image_is_opened_outside_the_one_reader():
    """Every decode goes through data/images.py: a new Image.open elsewhere would bypass orientation, 16-bit
    scaling and the size guard."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "images.py" and path.parent.name == "data":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr == "open" and \
                    isinstance(node.value, ast.Name) and node.value.id == "Image":
                offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert not offenders, "Image.open outside data/images.py: " + ", ".join(offenders)


def test_data_check_and_training_agree_on_an_oriented_image(tmp_path, processor):
    """The scan's token length (from the decoded size) equals the encoded sample's (from the header; the dataset
    refuses a mismatch), and the collator's pixels are the upright picture: a rotated photo trains with the tokens
    its pixels make."""
    from lora_manip.data.collate import Collator
    from lora_manip.data.dataset import build_datasets
    from lora_manip.recipe import DataCfg, DatasetCfg

    _oriented(tmp_path, 6, "photo.png")
    ann = tmp_path / "a.jsonl"
    ann.write_text(json.dumps({"id": "r", "images": ["photo.png"], "conversations": [
        {"from": "human", "value": "<image>\nWhere?"}, {"from": "gpt", "value": "here"}]}) + "\n")
    cfg = DataCfg(train=[DatasetCfg(annotation_path=str(ann), data_path=str(tmp_path))], model_max_length=4096)
    train, _ = build_datasets(cfg, processor, seed=0)
    item = train[0]
    assert len(item["input_ids"]) == int(train.lengths[0])
    batch = Collator(processor)([item])
    assert batch["image_sizes"][0].tolist() == [W, H]  # (height, width) of the upright picture: 64 x 32
