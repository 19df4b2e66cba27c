"""Batches: the collator pads each batch to its own longest sample (not to model_max_length), or packs it into one
row, and runs the image processor on the batch's images (decoded here, in the DataLoader workers)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image

from ..errors import UserError
from .encode import IGNORE
from .images import ImageError, load_image


DUMMY_IMAGE = "dummy_image"  # batch key: the pixels are a blank stand-in (train/trainer.image_features_unused)


@dataclass
class Collator:
    """Pads each batch to its own longest sample (not to model_max_length) and runs the image processor.

    `dummy_image` (set when several processes train): a text-only batch gets one blank image (the processor's own
    pixels for it, no tokens in the text) so the vision tower runs on every process every step; the trainer keeps
    none of its features."""

    processor: object
    dummy_image: bool = False
    packing: bool = False  # one row per batch: samples concatenated, positions restarting at each

    def __call__(self, batch: list[dict]) -> dict:
        if self.packing:
            return self._packed(batch)
        pad_id = self.processor.tokenizer.pad_token_id
        width = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, b in enumerate(batch):
            n = len(b["input_ids"])
            ids[i, :n] = torch.tensor(b["input_ids"])
            labels[i, :n] = torch.tensor(b["labels"])
            mask[i, :n] = 1
        out = {"input_ids": ids, "labels": labels, "attention_mask": mask}
        return self._add_images(out, batch)

    def _packed(self, batch: list[dict]) -> dict:
        """Samples back to back in one row. No attention mask: transformers reads the restarting position_ids as
        packed sequences (a block-diagonal causal mask for sdpa/eager, varlen for flash-attention), so attention
        never crosses samples. A sample's last token predicts the next sample's first, a prompt token, whose label
        is IGNORE. Images stay nested per sample (not per row), so each keeps its own anyres tiling; their features
        fill the row's image tokens in order, i.e. each lands on its own sample."""
        ids = [t for b in batch for t in b["input_ids"]]
        labels = [t for b in batch for t in b["labels"]]
        positions = [i for b in batch for i in range(len(b["input_ids"]))]
        # use_cache: with a KV cache transformers skips packed-sequence detection and attends across samples.
        out = {"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels]),
               "position_ids": torch.tensor([positions]), "use_cache": False}
        return self._add_images(out, batch)

    def _add_images(self, out: dict, batch: list[dict]) -> dict:
        with_images = [[_load_rgb(p, b.get("id")) for p in b["images"]] for b in batch if b["images"]]
        if with_images:
            # Nested per sample: the image processor then reports batch_num_images, which tells the model which
            # images belong to multi-image samples (no anyres tiling for those). Text-only samples have no entry.
            pixels = self.processor.image_processor(images=with_images, return_tensors="pt")
            out.update(pixel_values=pixels["pixel_values"], image_sizes=pixels["image_sizes"],
                       batch_num_images=pixels["batch_num_images"])
        elif self.dummy_image:
            crop = self.processor.image_processor.crop_size or self.processor.image_processor.size
            blank = Image.new("RGB", (crop["width"], crop["height"]))
            pixels = self.processor.image_processor(images=[[blank]], return_tensors="pt")
            out.update(pixel_values=pixels["pixel_values"], image_sizes=pixels["image_sizes"],
                       batch_num_images=pixels["batch_num_images"], **{DUMMY_IMAGE: True})
        return out


def _load_rgb(path: str, record_id: str | None = None) -> Image.Image:
    # The scan decoded every image fully before training; one failing now changed on disk since.
    try:
        return load_image(path)
    except ImageError as e:
        raise UserError(f"record id={record_id!r}: cannot decode image {path} ({e.reason}); it changed since the data "
                        "check at the start of training") from None
