"""The one table of LLaVA-OneVision tensor names: every layout a checkpoint, an adapter or a model in memory uses,
row by row, and the functions that translate between them. Every reader and writer of names (tiny-model writer,
part table, merge, convert, eval's adapter check) goes through here.

Layouts:
- canonical: transformers' in-memory names (>= 4.52): model.language_model.*, lm_head.*, model.vision_tower.*,
  model.multi_modal_projector.*, model.image_newline. Everything inside the kit compares these.
- hub: what the llava-hf hub checkpoints hold (transformers' conversion script writes them; transformers 5.x loads
  them and re-saves a model loaded from them under the same names). Older transformers (< 4.52) use them in memory.
- also: other transformers spellings read as the same tensor. SigLIP's `vision_model.` level is gone in
  transformers 5 (it loads older checkpoints by dropping it), so both spellings of the tower occur.
- LLaVA-NeXT: the original `llava_qwen` checkpoints (LlavaQwenForCausalLM; RoboInter and lmms-lab), where the
  Qwen2 LM sits at the top level (model.layers.*) and the projector is a Sequential (mm_projector.0 / .2).
- PEFT: an adapter or a PeftModel wraps every name in `base_model.model.` and a module trained in full in
  `.modules_to_save.<adapter>.` (its frozen copy in `.original_module.<adapter>.`).

A spelling that ends in "." is a prefix; one that does not is a whole tensor name.

Each row also says which part of the model (language_model, projector, vision_tower) it belongs to: `PARTS`, the
lookup table that freezing, LoRA targeting, optimizer groups and merging read instead of each branching on module
names of its own, is derived from these rows, so a new row (or a new model family) is written once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Place:
    part: str  # the part of the model it belongs to (a key of PARTS)
    canonical: str
    hub: str
    next: str | None  # None: no place of its own in LLaVA-NeXT (the finer rows above it have one)
    also: tuple[str, ...] = ()
    next_rest: re.Pattern | None = None  # what must follow `next` for a key to be this part (LLaVA-NeXT's LM)


_LM, _PROJ, _TOWER = "language_model", "projector", "vision_tower"

PLACES = (
    Place(_LM, "model.language_model.", "language_model.model.", "model.",
          # LLaVA-NeXT's `model.` also holds the tower, projector and resampler: only these are the LM
          next_rest=re.compile(r"(embed_tokens|layers\.\d+|norm)\.")),
    Place(_LM, "lm_head.", "language_model.lm_head.", "lm_head."),
    Place(_TOWER, "model.vision_tower.", "vision_tower.vision_model.", "model.vision_tower.vision_tower.vision_model.",
          also=("model.vision_tower.vision_model.", "vision_tower.")),
    Place(_PROJ, "model.multi_modal_projector.linear_1.", "multi_modal_projector.linear_1.", "model.mm_projector.0."),
    Place(_PROJ, "model.multi_modal_projector.linear_2.", "multi_modal_projector.linear_2.", "model.mm_projector.2."),
    Place(_PROJ, "model.multi_modal_projector.", "multi_modal_projector.", None),
    # image_newline is a bare nn.Parameter (the separator after each row of anyres features): it trains with the
    # projector, as in LLaVA-NeXT.
    Place(_PROJ, "model.image_newline", "image_newline", "model.image_newline"),
)


def _lookup(spellings: list[tuple[str, Place]], key: str) -> tuple[Place, str] | None:
    """(row, rest of the key) for the longest spelling that `key` starts with (or is, for a whole name)."""
    for spelling, place in spellings:
        if key == spelling or (spelling.endswith(".") and key.startswith(spelling)):
            return place, key[len(spelling):]
    return None


def _longest_first(pairs) -> list[tuple[str, Place]]:
    return sorted(pairs, key=lambda sp: -len(sp[0]))


_TRANSFORMERS = _longest_first((s, p) for p in PLACES for s in (p.canonical, p.hub, *p.also))
_CANONICAL = _longest_first((p.canonical, p) for p in PLACES)
_NEXT = _longest_first((p.next, p) for p in PLACES if p.next is not None)


def canonical(key: str) -> str | None:
    """Canonical name of a LLaVA-OneVision key in any transformers layout; None if it is not one."""
    hit = _lookup(_TRANSFORMERS, key)
    return None if hit is None else hit[0].canonical + hit[1]


def hub_name(name: str) -> str:
    """The key the hub checkpoints hold for a canonical name (the layout `from_pretrained` loads as is)."""
    hit = _lookup(_CANONICAL, name)
    if hit is None:
        raise KeyError(name)
    return hit[0].hub + hit[1]


def next_name(name: str) -> str | None:
    """The LLaVA-NeXT llava_qwen key of a canonical name; None if that layout has no place for it."""
    hit = _lookup(_CANONICAL, name)
    if hit is None or hit[0].next is None:
        return None
    return hit[0].next + hit[1]


def from_next(key: str) -> str | None:
    """The canonical name of a LLaVA-NeXT llava_qwen key; None if it is not part of that layout."""
    hit = _lookup(_NEXT, key)
    if hit is None or (hit[0].next_rest is not None and not hit[0].next_rest.match(hit[1])):
        return None
    return hit[0].canonical + hit[1]


# --------------------------------------------------------------------------------------------------------- parts


def _part_prefixes(part: str) -> tuple[str, ...]:
    """The part's canonical spellings, less the finer rows a coarser one of the same part already covers."""
    mine = [p.canonical for p in PLACES if p.part == part]
    return tuple(c for c in mine if not any(o != c and o.endswith(".") and c.startswith(o) for o in mine))


# In this order: optimizer groups and the trainable-parameter report list the parts so.
PARTS: dict[str, tuple[str, ...]] = {part: _part_prefixes(part) for part in (_LM, _PROJ, _TOWER)}

# The module each part's LoRA may target, and the module PEFT's modules_to_save copies when a part trains in full
# under an adapter method. The LM's lm_head is never a LoRA target (PEFT excludes output layers too).
LORA_SCOPE = {_LM: r"model\.language_model", _TOWER: r"model\.vision_tower"}
MODULES_TO_SAVE = {_PROJ: "multi_modal_projector", _TOWER: "vision_tower"}
# Tensors PEFT cannot save (modules_to_save needs a module; image_newline is a parameter).
EXTRA_TRAINABLES = {_PROJ: ("model.image_newline",)}


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


# ---------------------------------------------------------------------------------------------------------- PEFT

PEFT_PREFIX = "base_model.model."
_PEFT_WRAPPER = re.compile(r"\.(?:modules_to_save|original_module)\.[^.]+\.")
# Adapter keys after PEFT_PREFIX. The adapter name level (".default") is in memory only: saved files drop it.
LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B)(?:\.[\w-]+)?\.(?P<param>weight|bias)$")
DORA_KEY = re.compile(r"^(?P<module>.+)\.lora_magnitude_vector(?:\.[\w-]+)?(?:\.weight)?$")


def peft_inner(key: str) -> str | None:
    """The model's own name inside a PEFT key (wrappers other than the prefix kept); None without the prefix."""
    return key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else None


def unwrap_peft(name: str) -> str:
    """Strip PEFT's wrappers from a parameter name: base_model.model.X.modules_to_save.default.Y -> X.Y."""
    return _PEFT_WRAPPER.sub(".", name.removeprefix(PEFT_PREFIX))
