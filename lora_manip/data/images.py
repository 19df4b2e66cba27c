"""Reading a record's images: in full for the check (a truncated or corrupt file is caught before training, not in
the middle of it), by header for encoding (the size alone sets the image token count), and the symlinks that lead
out of the data root (followed, since roots assembled from links to other disks are common, but reported)."""

from __future__ import annotations

import os
from collections import OrderedDict

from PIL import Image

from ..errors import UserError
from .records import Problem, Sample

_SIZE_CACHE: OrderedDict = OrderedDict()  # records about the same frame are usually adjacent


def read_image_size(path: str) -> tuple[int, int] | str:
    """(width, height) of an image that decodes in full, or the reason it does not. A header-only read would pass
    a truncated file that then stops training in the collator."""
    hit = _SIZE_CACHE.get(path)
    if hit is not None:
        _SIZE_CACHE.move_to_end(path)
        return hit
    try:
        with Image.open(path) as im:
            size = im.size
            im.load()
    except FileNotFoundError:
        return "missing"
    except Exception as e:  # PIL raises many kinds (UnidentifiedImageError, DecompressionBombError, OSError...)
        return f"unreadable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    if size[0] <= 0 or size[1] <= 0:
        return f"unreadable (size {size})"
    _SIZE_CACHE[path] = size
    if len(_SIZE_CACHE) > 4096:
        _SIZE_CACHE.popitem(last=False)
    return size


def image_size(path: str, sample: Sample) -> tuple[int, int]:
    """(width, height) from the header alone: the scan decoded the image in full before training started."""
    try:
        with Image.open(path) as im:
            return im.size
    except (OSError, ValueError) as e:
        raise UserError(f"{sample.source} id={sample.id!r} field `images`: cannot read image {path} ({e})") from None


def image_problems(sample: Sample, file: str, where: str) -> tuple[list[tuple[int, int]], list[Problem]]:
    sizes, problems = [], []
    for k, path in enumerate(sample.images):
        got = read_image_size(path)
        if isinstance(got, tuple):
            sizes.append(got)
            continue
        kind = "missing_image" if got == "missing" else "unreadable_image"
        reason = f"image {path} not found" if got == "missing" else f"cannot read image {path}: {got}"
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
