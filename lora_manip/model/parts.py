"""Where each part of LLaVA-OneVision lives, as a lookup table that freezing, LoRA targeting, optimizer groups and
merging all read, instead of each branching on module names of its own.

Names are the canonical ones of model/layouts.py (transformers' in-memory names, >= 4.52); older checkpoints
(`language_model.model.*`) are renamed to these at load time, and PEFT's wrappers are stripped before a lookup.
"""

from __future__ import annotations

import re

from .layouts import unwrap_peft

PARTS: dict[str, tuple[str, ...]] = {
    "language_model": ("model.language_model.", "lm_head."),
    # image_newline is a bare nn.Parameter (the separator after each row of anyres features): it trains with the
    # projector, as in LLaVA-NeXT.
    "projector": ("model.multi_modal_projector.", "model.image_newline"),
    "vision_tower": ("model.vision_tower.",),
}

# The module each part's LoRA may target, and the module PEFT's modules_to_save copies when a part trains in full
# under an adapter method. The LM's lm_head is never a LoRA target (PEFT excludes output layers too).
LORA_SCOPE = {"language_model": r"model\.language_model", "vision_tower": r"model\.vision_tower"}
MODULES_TO_SAVE = {"projector": "multi_modal_projector", "vision_tower": "vision_tower"}
# Tensors PEFT cannot save (modules_to_save needs a module; image_newline is a parameter).
EXTRA_TRAINABLES = {"projector": ("model.image_newline",)}


def part_of(name: str) -> str:
    n = unwrap_peft(name)
    for part, prefixes in PARTS.items():
        if n.startswith(prefixes):
            return part
    raise KeyError(f"parameter {name} belongs to no known LLaVA-OneVision part")


def lora_target_regex(parts: list[str], names: list[str]) -> str:
    """A PEFT target_modules regex (full match on the module path) that puts LoRA only under `parts`: SigLIP has
    q/k/v projections too, so bare names would also adapt the vision tower."""
    scopes = "|".join(LORA_SCOPE[p] for p in parts)
    leaves = "|".join(re.escape(n) for n in names)
    return rf"^({scopes})\..*\.({leaves})$"
