"""The kit's one image reader: every path that decodes an image (data check, normalize, training's collator and
GRPO, eval and predict, overlays, pointing masks and rewards) goes through here, so they all see the same pixels.

- EXIF orientation is applied (ImageOps.exif_transpose): coordinates are labelled on the photo as a viewer shows
  it, and the size used for encoding (read from the header, `image_size`) follows the orientation, so the token
  count always matches the decoded pixels. The orientation is read once from the header by `_orientation` for
  both, since Pillow would otherwise read a PNG's late eXIf chunk only after a full decode.
- 16-bit images (mode I;16 / I) are scaled to 8 bits, not clipped (Pillow's convert saturates them to white).
- An image over `max_image_pixels()` (Pillow's own bomb limit by default, LORA_MANIP_MAX_IMAGE_PIXELS raises it)
  is refused with one line naming the file and the limit, before it is decoded.
- Masks (`load_mask`) are grey levels in [0, 1]; a mask whose largest value is 1 is a 0/1 mask, read as binary.

Every failure is an `ImageError` (a UserError): one line naming the file. `read_image_size` (the data check's
full decode) returns the reason instead; symlinks leading out of the data root are reported, not refused.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageOps

from ..errors import UserError
from .files import file_stamp, size_fields
from .records import Problem, Sample

MAX_PIXELS_ENV = "LORA_MANIP_MAX_IMAGE_PIXELS"
# Pillow refuses outright above twice its MAX_IMAGE_PIXELS (and only warns below): the kit keeps that line, so
# every image Pillow would decode is still accepted.
DEFAULT_MAX_PIXELS = 2 * 89_478_485
_TRANSPOSED = (5, 6, 7, 8)  # EXIF orientations that swap width and height
_SIZE_CACHE: OrderedDict = OrderedDict()  # records about the same frame are usually adjacent


class ImageError(UserError):
    """One line naming the file; `reason` is the same without the path, `missing` says the file is not there."""

    def __init__(self, path: str, reason: str, missing: bool = False):
        super().__init__(f"cannot read image {path} ({reason})")
        self.reason, self.missing = reason, missing


def max_image_pixels() -> int:
    raw = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_PIXELS
    try:
        value = int(raw.replace("_", ""))
    except ValueError:
        value = 0
    if value <= 0:
        raise UserError(f"{MAX_PIXELS_ENV}={raw!r}: expected a positive number of pixels")
    return value


def _first_line(e: BaseException) -> str:
    text = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _orientation(im: Image.Image) -> int:
    """EXIF orientation (1-8) from the header alone. The base class's getexif never decodes pixels (a PNG's own
    override would); its result is cached on the image, so exif_transpose later applies this same value."""
    try:
        value = Image.Image.getexif(im).get(ExifTags.Base.Orientation, 1)
    except Exception:  # noqa: BLE001 - a damaged EXIF block: the pixels are still the picture, upright as stored
        return 1
    return value if value in range(1, 9) else 1


def _open(path: str) -> Image.Image:
    """The image opened (header read, pixels not yet), its size checked against the limit."""
    limit = max_image_pixels()
    # The kit checks the size itself, below: Pillow's own check (an error above 2x its limit, a warning above it)
    # would refuse what the kit's setting allows, and its message does not say how to allow it.
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        im = Image.open(path)
    except FileNotFoundError:
        raise ImageError(path, "not found", missing=True) from None
    except Exception as e:  # noqa: BLE001 - PIL raises many kinds (UnidentifiedImageError, OSError, ValueError...)
        raise ImageError(path, _first_line(e)) from None
    finally:
        Image.MAX_IMAGE_PIXELS = saved
    w, h = im.size
    if w <= 0 or h <= 0:
        im.close()
        raise ImageError(path, f"size {w}x{h}")
    if w * h > limit:
        im.close()
        raise ImageError(path, _too_large((w, h), limit))
    return im


def _too_large(size: tuple[int, int], limit: int) -> str:
    return (f"{size[0]}x{size[1]} = {size[0] * size[1]:,} pixels, over the limit of {limit:,} (a decompression "
            f"bomb guard); if the image is genuine, set {MAX_PIXELS_ENV} to a larger number")


def _decoded(path: str) -> Image.Image:
    """Fully decoded and upright (EXIF orientation applied), in the file's own mode."""
    im = _open(path)
    try:
        _orientation(im)  # caches the header's orientation before the decode (see _orientation)
        im.load()
        upright = ImageOps.exif_transpose(im)
    except Exception as e:  # noqa: BLE001 - truncated or corrupt data
        raise ImageError(path, _first_line(e)) from None
    finally:
        im.close()
    return upright


def _wide(im: Image.Image) -> np.ndarray | None:
    """The values of a 16-bit (or 32-bit integer) grey image, else None."""
    if im.mode.startswith("I;16") or im.mode == "I":
        return np.asarray(im).astype(np.int64)
    return None


def to_rgb(im: Image.Image) -> Image.Image:
    """8-bit RGB. A 16-bit grey image is scaled (65535 -> 255); a 32-bit one holding 16-bit values likewise."""
    wide = _wide(im)
    if wide is not None:
        if im.mode.startswith("I;16") or wide.max(initial=0) > 255:
            wide = np.rint(np.clip(wide, 0, 65535) / 257.0)
        im = Image.fromarray(np.clip(wide, 0, 255).astype(np.uint8), "L")
    return im if im.mode == "RGB" else im.convert("RGB")


def load_image(path: str | os.PathLike) -> Image.Image:
    """The image as training, eval and predict see it: upright, 8-bit RGB. ImageError naming the file otherwise."""
    return to_rgb(_decoded(str(path)))


def load_mask(path: str | os.PathLike) -> np.ndarray:
    """A mask as float grey levels in [0, 1], shape (height, width), upright like its image. 16-bit masks are
    scaled by 65535, others by 255 (a 1-bit mask's set pixels count 1), except that a mask whose largest value is
    1 is a 0/1 mask: its ones count 1, not 1/255."""
    im = _decoded(str(path))
    wide = _wide(im)
    if wide is not None:
        values = wide.astype(np.float64)
        full = 65535.0 if im.mode.startswith("I;16") or wide.max(initial=0) > 255 else 255.0
    else:
        values, full = np.asarray(im.convert("L"), dtype=np.float64), 255.0
    if values.size and values.max() == 1.0:
        full = 1.0
    return np.clip(values / full, 0.0, 1.0)


def image_size(path: str, sample: Sample | None = None) -> tuple[int, int]:
    """(width, height) upright, from the header alone: the scan decoded the image in full before training."""
    try:
        im = _open(path)
    except ImageError as e:
        if sample is None:
            raise
        raise UserError(f"{sample.source} id={sample.id!r} field `images`: {e}") from None
    with im:
        w, h = im.size
        return (h, w) if _orientation(im) in _TRANSPOSED else (w, h)


def read_image_size(path: str, stamp: tuple[int, int] | None = None) -> tuple[int, int] | str:
    """(width, height) upright of an image that decodes in full, or the reason it does not ("missing" when there
    is no file). A header-only read would pass a truncated file that then stops training in the collator."""
    stamp = file_stamp(path) if stamp is None else stamp
    key = (path, stamp)  # a file rewritten since (same path, new size or time) is read again
    hit = _SIZE_CACHE.get(key)
    if hit is not None:
        _SIZE_CACHE.move_to_end(key)
        return hit
    try:
        size = _decoded(path).size
    except ImageError as e:
        return "missing" if e.missing else str(e)
    _SIZE_CACHE[key] = size
    if len(_SIZE_CACHE) > 4096:
        _SIZE_CACHE.popitem(last=False)
    return size


def image_problems(sample: Sample, file: str, where: str, stamps: dict | None = None
                   ) -> tuple[list[tuple[int, int]], list[Problem]]:
    """The upright sizes of a sample's images and a Problem per image that does not decode. `stamps`, when
    given, receives each image's file_stamp as it was when it was read (the scan cache's validity check)."""
    sizes, problems = [], []
    for k, path in enumerate(sample.images):
        stamp = file_stamp(path)
        if stamps is not None:
            stamps[path] = stamp
        got = read_image_size(path, stamp)
        if isinstance(got, tuple):
            sizes.append(got)
            continue
        kind = "missing_image" if got == "missing" else "unreadable_image"
        reason = f"image {path} not found" if got == "missing" else got
        problems.append(Problem(file, where, sample.id, f"images[{k}]", reason, kind))
    return sizes, problems


def symlink_warnings(sample: Sample, file: str, where: str, data_root: str) -> list[Problem]:
    """Images that a symlink inside the data root leads out of it: followed, but never silently."""
    root = os.path.realpath(data_root)
    out = []
    for k, path in enumerate(sample.images):
        real = os.path.realpath(path)
        if real != path and not real.startswith(root.rstrip(os.sep) + os.sep) and os.path.exists(real):
            out.append(Problem(file, where, sample.id, f"images[{k}]", f"image {path} is a symlink (or lies under "
                               f"one) that leads out of the data root, to {real}", "symlink_outside_root"))
    return out


def record_size(rec: dict, data_root: Path) -> tuple[int, int] | str:
    """`data normalize`'s size of a record's image: (width, height) from the record's fields or its images'
    headers, or why not. Every image must exist even when the fields give the size: a record of a missing image
    would be written, then fail every later step."""
    images = rec.get("images", rec.get("image"))
    images = [] if images is None else [images] if isinstance(images, str) else images
    if not isinstance(images, list) or not all(isinstance(x, str) and x for x in images):
        return f"`images` is not a list of paths ({images!r:.60})"
    root = data_root.resolve()
    paths = []
    for rel in images:
        p = (root / rel).resolve()
        if not p.is_relative_to(root):
            return f"image path {rel!r} escapes the data root {root}"
        if not p.is_file():  # a path written on Windows names no file here
            return f"image {p} not found" + (" (write paths with /, not \\)" if "\\" in rel else "")
        paths.append(p)
    keys = size_fields(rec)
    w, h = (rec.get(keys[0]), rec.get(keys[1])) if keys else (None, None)
    if isinstance(w, int) and isinstance(h, int) and not isinstance(w, bool) and w > 0 and h > 0:
        return w, h
    if not paths:
        return "no image size: no width/height fields and no image to read it from"
    sizes = set()
    for p in paths:
        got = read_image_size(str(p))
        if isinstance(got, str):
            return f"image {p}: {got}"
        sizes.add(got)
    if len(sizes) > 1:
        return f"its images differ in size {sorted(sizes)}; which one do the coordinates refer to?"
    return sizes.pop()
