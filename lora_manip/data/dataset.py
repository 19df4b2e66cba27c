"""Validated samples -> a torch Dataset of token ids + labels + images, and the collator that batches them.

The dataset keeps samples (text and image paths), not pixels: images are decoded by the collator in the
DataLoader workers. Lengths are exact (image tokens included) and computed once at start, from image headers only.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from dataclasses import dataclass

import torch
from PIL import Image

from ..errors import UserError
from .encode import IGNORE, encode
from .records import Problem, Sample, load_samples

log = logging.getLogger(__name__)


def image_size(path: str, sample: Sample) -> tuple[int, int]:
    try:
        with Image.open(path) as im:  # reads the header only
            return im.size
    except (OSError, ValueError) as e:
        raise UserError(f"{sample.source} id={sample.id!r} field `images`: cannot read image {path} ({e})") from None


def sample_subset(samples: list, sample: float | None, seed: int) -> list:
    """Upstream's `name%NN`: a seeded random fraction (<= 1) or count (> 1) of a dataset, order kept."""
    if sample is None:
        return samples
    k = round(len(samples) * sample) if sample <= 1 else min(int(sample), len(samples))
    keep = sorted(random.Random(seed).sample(range(len(samples)), k))
    return [samples[i] for i in keep]


class ManipDataset(torch.utils.data.Dataset):
    def __init__(self, samples: list[Sample], processor, system_prompt: str | None, max_length: int):
        self.processor = processor
        self.system_prompt = system_prompt
        self.samples, self.lengths, self.dropped = [], [], Counter()
        for s in samples:
            n = len(self._encode(s)["input_ids"])
            if n > max_length:
                # Never cut: a cut sample loses its answer or splits an image's tokens.
                self.dropped[f"longer than model_max_length {max_length}"] += 1
                continue
            self.samples.append(s)
            self.lengths.append(n)
        if not self.samples:
            raise UserError(f"no sample fits model_max_length {max_length}: dropped {dict(self.dropped)}")

    def _encode(self, s: Sample) -> dict:
        sizes = [image_size(p, s) for p in s.images]
        return encode(s, self.processor, self.system_prompt, sizes) | {"images": s.images, "id": s.id}

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        return self._encode(self.samples[i])


def build_dataset(datasets: list, processor, system_prompt, max_length: int, seed: int) -> ManipDataset:
    """Concatenate the recipe's datasets (each optionally sub-sampled); any bad record stops the run with all
    problems listed, never a silent skip."""
    samples: list[Sample] = []
    problems: list[Problem] = []
    for i, d in enumerate(datasets):
        s, p = load_samples(d.annotation_path, d.data_path)
        problems += p
        samples += sample_subset(s, d.sample, seed + i)
    if problems:
        shown = "\n".join(f"  - {p}" for p in problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise UserError(f"{len(problems)} bad record(s):\n{shown}{more}")
    ds = ManipDataset(samples, processor, system_prompt, max_length)
    for reason, n in ds.dropped.items():
        log.warning("dropped %d sample(s): %s", n, reason)
    return ds


@dataclass
class Collator:
    """Pads each batch to its own longest sample (not to model_max_length) and runs the image processor."""

    processor: object

    def __call__(self, batch: list[dict]) -> dict:
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
        with_images = [[_load_rgb(p) for p in b["images"]] for b in batch if b["images"]]
        if with_images:
            # Nested per sample: the image processor then reports batch_num_images, which tells the model which
            # images belong to multi-image samples (no anyres tiling for those). Text-only samples have no entry.
            pixels = self.processor.image_processor(images=with_images, return_tensors="pt")
            out.update(pixel_values=pixels["pixel_values"], image_sizes=pixels["image_sizes"],
                       batch_num_images=pixels["batch_num_images"])
        return out


def _load_rgb(path: str) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")
