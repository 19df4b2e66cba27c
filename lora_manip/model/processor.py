"""Load the LLaVA-OneVision processor (tokenizer + image processor + chat template) from a checkpoint folder or hub id.

Written by hand only because of one gap: `LlavaOnevisionProcessor` insists on a video processor, which needs
torchvision, and `AutoProcessor` on a folder without one returns a bare tokenizer. This subclass leaves the video
processor out (the kit trains on images only) and otherwise is the transformers processor: same token expansion,
same anyres tiling, same chat template, same saved files.
"""

from __future__ import annotations

import os

from transformers import ProcessorMixin
from transformers.models.llava_onevision.processing_llava_onevision import LlavaOnevisionProcessor

from ..errors import UserError


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


def load_processor(path: str | os.PathLike) -> ImageOnlyOnevisionProcessor:
    from .load import check_model_path

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
