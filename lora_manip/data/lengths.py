"""Exact token lengths, image tokens included, without encoding: what the scan measures for every record so that
batching and the `model_max_length` filter know each sample's length before training reads it.

The chat template is rendered and tokenised in the same segments as `encode` (one batched tokenizer call for many
records), and each `<image>` counts the tokens the processor expands it to for that image size. ManipDataset
checks every encoded sample against this measure, so the two can never drift apart silently.
"""

from __future__ import annotations

import weakref

from .encode import supervised_spans, with_system
from .processor import image_token_counts
from .records import Sample

_COUNTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _image_tokens(processor, sizes: list[tuple[int, int]]) -> int:
    """Total image tokens of one sample's images; memoised per processor (a data set has few distinct sizes)."""
    cache = _COUNTS.setdefault(processor, {})
    # the grid is part of the key: data.max_image_tiles changes a processor's pinpoints after loading
    key = (tuple(tuple(z) for z in sizes), tuple(map(tuple, processor.image_processor.image_grid_pinpoints)))
    if key not in cache:
        if len(cache) > 100_000:
            cache.clear()
        cache[key] = sum(image_token_counts(processor, list(key[0])))
    return cache[key]


def token_lengths(processor, system_prompt: str | None, items: list[tuple[Sample, list[tuple[int, int]]]]
                  ) -> list[int]:
    """Exact `len(encode(sample)["input_ids"])` for many (sample, image sizes) at once: the same template render
    and segmentation as encode, one batched tokenizer call, and each `<image>` token counted as the image tokens
    the processor expands it to."""
    tok = processor.tokenizer
    segments, owner, out = [], [], []
    for k, (s, sizes) in enumerate(items):
        full, spans = supervised_spans(processor, with_system(s.messages, system_prompt))
        cuts = [0] + [c for span in spans for c in span] + [len(full)]
        for a, b in zip(cuts, cuts[1:]):
            if b > a:
                segments.append(full[a:b])
                owner.append(k)
        out.append(_image_tokens(processor, sizes))
    if segments:
        image_id = processor.image_token_id
        for k, ids in zip(owner, tok(segments, add_special_tokens=False)["input_ids"]):
            out[k] += len(ids) - ids.count(image_id)  # each placeholder token is replaced by the image's tokens
    return out
