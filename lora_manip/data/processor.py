"""Load and save the LLaVA-OneVision processor (tokenizer + image processor + chat template).

Loading is written by hand only because of one gap: `LlavaOnevisionProcessor` insists on a video processor, which
needs torchvision, and `AutoProcessor` on a folder without one returns a bare tokenizer. `ImageOnlyOnevisionProcessor`
leaves the video processor out (the kit trains on images only) and otherwise is the transformers processor: same
token expansion, same anyres tiling, same chat template. It is an internal detail: what the kit WRITES is always the
hub's own layout (`processor_class: LlavaOnevisionProcessor`, a video processor config, the chat template in
chat_template.json, the Qwen2 tokenizer files), copied byte for byte from the base checkpoint when it has them,
so `AutoProcessor` and serving stacks load an output folder exactly as they load the original.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from transformers import ProcessorMixin
from transformers.models.llava_onevision.processing_llava_onevision import LlavaOnevisionProcessor

from ..errors import UserError
from ..fsutil import copy_files
from ..hub import check_model_path


class ImageOnlyOnevisionProcessor(LlavaOnevisionProcessor):
    """LlavaOnevisionProcessor without the video processor. `get_attributes` reads the sub-processors from this
    signature, so `from_pretrained`/`save_pretrained` handle exactly tokenizer + image processor."""

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        num_image_tokens=None,
        vision_feature_select_strategy=None,
        chat_template=None,
        image_token="<image>",
        video_token="<video>",
        vision_aspect_ratio="anyres_max_9",
        **kwargs,
    ):
        self.num_image_tokens = num_image_tokens
        self.vision_feature_select_strategy = vision_feature_select_strategy
        self.image_token = image_token
        self.video_token = video_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(video_token)
        self.vision_aspect_ratio = vision_aspect_ratio
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)


def cap_image_tiles(processor, max_tiles: int | None) -> int:
    """Limit anyres to grids of at most `max_tiles` tiles (the recipe's data.max_image_tiles) by dropping larger
    pinpoints; returns how many were dropped. The processor counts and makes tiles from its pinpoints and the model
    places features by its config's: `apply_image_grid` must copy them to the model, so measurement, training and
    generation agree. LLaVA-OneVision's anyres_max_9 only pools the features of large grids; the vision tower
    still runs on every tile (up to 36 + 1 at 2304 px), which is what this bounds."""
    if not max_tiles:
        return 0
    ip = processor.image_processor
    kept = capped_pinpoints(ip.image_grid_pinpoints, (ip.crop_size or ip.size)["height"], max_tiles)
    dropped = len(ip.image_grid_pinpoints) - len(kept)
    ip.image_grid_pinpoints = kept
    return dropped


def capped_pinpoints(pinpoints, tile: int, max_tiles: int) -> list[list[int]]:
    """The anyres pinpoints whose grid of `tile`-px tiles has at most `max_tiles` tiles (the one rule of the cap,
    for a processor here and for an output folder's files in checkpoints/next_config.carry_image_cap)."""
    return [list(p) for p in pinpoints if -(-p[0] // tile) * -(-p[1] // tile) <= max_tiles]


def apply_image_grid(model, processor) -> None:
    """Give the model the processor's (possibly capped) pinpoints; it reads them from its config at each forward."""
    model.config.image_grid_pinpoints = [list(p) for p in processor.image_processor.image_grid_pinpoints]


def load_processor(path: str | os.PathLike, max_image_tiles: int | None = None) -> ImageOnlyOnevisionProcessor:
    check_model_path(str(path))
    try:
        processor = ImageOnlyOnevisionProcessor.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load a processor from {path}: {str(e).splitlines()[0]}") from None
    if processor.chat_template is None:
        raise UserError(f"{path} has no chat template (chat_template.jinja / chat_template.json); the kit "
                        "formats every prompt with it")
    if processor.num_image_tokens is None:
        raise UserError(f"{path}: processor_config.json lacks num_image_tokens; is this a LLaVA-OneVision processor?")
    # Generation batches pad on the left so every prompt ends where generation starts; training pads per batch in
    # the collator and does not use this setting.
    processor.tokenizer.padding_side = "left"
    cap_image_tiles(processor, max_image_tiles)
    return processor


def image_token_counts(processor: ImageOnlyOnevisionProcessor, sizes: list[tuple[int, int]]) -> list[int]:
    """Image tokens each image of ONE sample expands to, from (width, height) alone (no decoding), exactly as the
    processor's own expansion. A sample with several images uses LLaVA-OV's multi-image mode (base tile only, plus
    one newline token), which `_get_num_multimodal_tokens` does not model, so that case is handled here."""
    if not sizes:
        return []
    if len(sizes) > 1:
        n = processor.num_image_tokens + 1
        if processor.vision_feature_select_strategy == "default":
            n -= 1
        return [n] * len(sizes)
    (w, h), = sizes
    return list(processor._get_num_multimodal_tokens(image_sizes=[(h, w)])["num_image_tokens"])


def image_tiles(processor, sizes: list[tuple[int, int]]) -> int:
    """Vision-tower tiles of ONE sample's images, from (width, height) alone: anyres gives a single image its base
    tile plus the grid of the best-fitting pinpoint; each image of a multi-image sample is one base tile. The
    vision tower's cost is per tile (the LM's per token), so batching by a token budget counts both."""
    if len(sizes) != 1:
        return len(sizes)
    from transformers.image_processing_utils import select_best_resolution

    ip = processor.image_processor
    tile = (ip.crop_size or ip.size)["height"]
    (w, h), = sizes
    best_h, best_w = select_best_resolution((h, w), ip.image_grid_pinpoints)
    return 1 + -(-best_h // tile) * -(-best_w // tile)


# What a llava-hf OneVision folder holds besides config and weights. Copied verbatim from the base into every output
# (adapter, trained run, merge, convert) so nothing about the processor differs from the original.
PROCESSOR_FILES = (
    "processor_config.json", "preprocessor_config.json", "video_preprocessor_config.json", "chat_template.json",
    "chat_template.jinja", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "tokenizer.model",
)
HUB_PROCESSOR_CLASS = "LlavaOnevisionProcessor"


def copy_processor_files(src: str | os.PathLike, dst: str | os.PathLike) -> list[str]:
    """Copy the processor files of `src` (a folder with processor_config.json) to `dst` byte for byte; [] when
    `src` has no processor."""
    src, dst = Path(src), Path(dst)
    if not (src / "processor_config.json").is_file():
        return []
    return copy_files(src, dst, PROCESSOR_FILES)


def save_processor(processor, folder: str | os.PathLike, source: str | os.PathLike | None = None) -> list[str]:
    """Write the processor into `folder` in the hub layout. With `source` (the base checkpoint, a local folder),
    its files are copied verbatim; otherwise they are written from `processor`. Returns the file names."""
    folder = Path(folder)
    if source is not None and Path(source).is_dir():
        copied = copy_processor_files(source, folder)
        if copied:
            return copied
    return write_hub_processor(processor, folder)


def write_hub_processor(processor, folder: Path) -> list[str]:
    """The files transformers' LLaVA-OneVision conversion writes, from an in-memory processor. `save_pretrained`
    of the kit's image-only class would name itself as processor_class and drop the video processor, so the
    files are written here instead."""
    tok = processor.tokenizer
    tok.save_pretrained(str(folder))
    _write_slow_tokenizer_files(folder)
    # The tokenizer saves the processor class it was loaded under; the hub names the real one.
    _update_json(folder / "tokenizer_config.json", processor_class=HUB_PROCESSOR_CLASS)
    ip = processor.image_processor.to_dict()
    ip = {k: v for k, v in ip.items() if not k.startswith("_")}
    ip.update(image_processor_type="LlavaOnevisionImageProcessor", processor_class=HUB_PROCESSOR_CLASS)
    video = {"video_processor_type": "LlavaOnevisionVideoProcessor", "processor_class": HUB_PROCESSOR_CLASS,
             "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
             "do_sample_frames": False, "image_mean": ip.get("image_mean"), "image_std": ip.get("image_std"),
             "resample": ip.get("resample", 3), "rescale_factor": ip.get("rescale_factor", 1 / 255),
             "size": ip.get("crop_size") or ip.get("size")}
    proc = {"image_token": processor.image_token, "num_image_tokens": processor.num_image_tokens,
            "processor_class": HUB_PROCESSOR_CLASS, "video_token": processor.video_token,
            "vision_aspect_ratio": processor.vision_aspect_ratio,
            "vision_feature_select_strategy": processor.vision_feature_select_strategy}
    files = {"preprocessor_config.json": ip, "video_preprocessor_config.json": video,
             "processor_config.json": proc, "chat_template.json": {"chat_template": processor.chat_template}}
    for name, obj in files.items():
        (folder / name).write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (folder / "chat_template.jinja").unlink(missing_ok=True)  # one template file, as the hub has
    return sorted(p.name for p in folder.iterdir() if p.name in PROCESSOR_FILES)


def _update_json(path: Path, **fields) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    data.update(fields)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_slow_tokenizer_files(folder: Path) -> None:
    """vocab.json, merges.txt, added_tokens.json and special_tokens_map.json beside tokenizer.json, as the hub's
    Qwen2 tokenizer folders have them (loaders of the slow tokenizer and older transformers read those)."""
    tj = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    model = tj.get("model") or {}
    if model.get("type") == "BPE" and not (folder / "vocab.json").is_file():
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
        (folder / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False), encoding="utf-8")
        (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    added = {t["content"]: t["id"] for t in tj.get("added_tokens", [])}
    if added and not (folder / "added_tokens.json").is_file():
        (folder / "added_tokens.json").write_text(json.dumps(added, indent=2, ensure_ascii=False) + "\n",
                                                  encoding="utf-8")
    cfg = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    specials = {k: cfg[k] for k in ("eos_token", "pad_token", "bos_token", "unk_token") if cfg.get(k)}
    extra = cfg.get("extra_special_tokens") or cfg.get("additional_special_tokens")
    if extra:
        specials["additional_special_tokens"] = list(extra)
    if not (folder / "special_tokens_map.json").is_file():
        (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n", encoding="utf-8")
