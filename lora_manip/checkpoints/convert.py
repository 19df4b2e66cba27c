"""`lora-manip convert`: between the original LLaVA-NeXT `llava_qwen` layout (LlavaQwenForCausalLM: what the
RoboInter and lmms-lab LLaVA-OneVision checkpoints use) and the transformers LLaVA-OneVision layout this kit trains.

Tensors are renamed and streamed byte for byte (no dtype change, no resizing), so a round trip is bit-exact:

    LLaVA-NeXT (llava_qwen)                                transformers (as the llava-hf hub folders hold it)
    model.embed_tokens / model.layers.* / model.norm  <->  language_model.model.*
    lm_head.*                                         <->  language_model.lm_head.*
    model.vision_tower.vision_tower.vision_model.*    <->  vision_tower.vision_model.*
    model.mm_projector.0.* / model.mm_projector.2.*   <->  multi_modal_projector.linear_1.* / linear_2.*
    model.image_newline                               <->  image_newline

`--to hf` writes the names transformers' own convert_llava_onevision_weights_to_hf.py writes (the right column);
`--from hf` reads that layout and transformers 5's in-memory names (model.language_model.*, ...) alike. Any other
key is an error that lists it. Two derived buffers older checkpoints carry (`rotary_emb.inv_freq`,
`embeddings.position_ids`) are recomputed by transformers; they are dropped and the log says how many.

Tensor names come from the one table in model/layouts.py; the config and processor side is next_config.py.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from ..errors import UserError
from ..fsutil import copy_files, read_json
from ..model.layouts import from_next, hub_name, next_name
from ..outputs import atomic_dir, owned_output
from .next_config import copy_processor, hf_config, next_config, write_slow_tokenizer_files
from .shards import DEFAULT_SHARD_BYTES, OutTensor, copy_tensor, parse_size, write_checkpoint
from .tensors import Checkpoint, TensorRef, canonical_tensors, listing

log = logging.getLogger(__name__)

FORMATS = ("hf", "llava-next")
DEFAULT_VISION_TOWER = "google/siglip-so400m-patch14-384"
_DERIVED = re.compile(r"(\.rotary_emb\.inv_freq|\.embeddings\.position_ids)$")


def convert_checkpoint(src: str, out: str, src_format: str, dst_format: str, *, force: bool = False,
                       vision_config: str | None = None, processor: str | None = None,
                       vision_tower: str = DEFAULT_VISION_TOWER,
                       max_shard_size: str | int = DEFAULT_SHARD_BYTES) -> Path:
    """Convert the checkpoint folder `src` from `src_format` to `dst_format` (hf | llava-next) into `out`."""
    src, out = Path(src), Path(out)
    for name, fmt in (("--from", src_format), ("--to", dst_format)):
        if fmt not in FORMATS:
            raise UserError(f"{name} {fmt}: choose {' or '.join(FORMATS)}")
    if src_format == dst_format:
        raise UserError(f"--from and --to are both {src_format}: nothing to convert")
    if not src.is_dir():
        raise UserError(f"{src} is not a folder")
    inputs = {"source folder": src, "--processor folder": processor, "--vision-config file": vision_config}
    shard = parse_size(max_shard_size)
    with owned_output(out, "lora-manip convert", "convert", inputs, force, flag="OUT") as out:  # resolved
        if dst_format == "llava-next":
            return _hf_to_next(src, out, force, vision_tower, shard)
        return _next_to_hf(src, out, force, vision_config, processor, shard)


# ---------------------------------------------------------------------------------------------------------------
# transformers -> LLaVA-NeXT


def _hf_to_next(src: Path, out: Path, force: bool, vision_tower: str, shard: int) -> Path:
    cfg = read_json(src / "config.json")
    if cfg.get("model_type") != "llava_onevision":
        raise UserError(f"{src}/config.json: model_type {cfg.get('model_type')!r}; --from hf expects a transformers "
                        "LLaVA-OneVision checkpoint (model_type llava_onevision)")
    text, vision = cfg.get("text_config") or {}, cfg.get("vision_config") or {}
    problems = []
    if text.get("model_type", "qwen2") != "qwen2":
        problems.append(f"text model {text.get('model_type')} (llava_qwen is Qwen2)")
    if vision.get("model_type", "siglip_vision_model") != "siglip_vision_model":
        problems.append(f"vision model {vision.get('model_type')} (LLaVA-NeXT's tower here is SigLIP)")
    if cfg.get("projector_hidden_act", "gelu") != "gelu" or cfg.get("multimodal_projector_bias") is False:
        problems.append("projector is not LLaVA-NeXT's mlp2x_gelu (gelu, with biases)")
    if cfg.get("vision_feature_select_strategy", "full") != "full":
        problems.append(f"vision_feature_select_strategy {cfg.get('vision_feature_select_strategy')} (SigLIP in "
                        "LLaVA-NeXT keeps every patch token: full)")
    if cfg.get("vision_feature_layer", -1) != -1:
        problems.append(f"vision_feature_layer {cfg.get('vision_feature_layer')} (LLaVA-NeXT takes the last layer "
                        "of the tower it keeps: -1)")
    if problems:
        raise UserError(f"{src} cannot be expressed in the LLaVA-NeXT llava_qwen layout: {'; '.join(problems)}")
    tensors = canonical_tensors(Checkpoint(src))
    unmapped = [r.name for n, r in tensors.items() if next_name(n) is None]
    if unmapped:
        raise UserError(f"{src}: tensor(s) with no place in the LLaVA-NeXT layout: {listing(unmapped)}")
    plan = [OutTensor(next_name(n), r.dtype, r.shape, copy_tensor(r)) for n, r in tensors.items()]
    new_cfg = next_config(cfg, vision_tower, src)
    with atomic_dir(out, force=force, kind="convert") as tmp:
        write_checkpoint(tmp, plan, shard)
        (tmp / "config.json").write_text(json.dumps(new_cfg, indent=2) + "\n")
        copy_files(src, tmp, ["generation_config.json"])
        copy_processor(src, tmp)
        write_slow_tokenizer_files(tmp)
    log.info("wrote %d tensors in the LLaVA-NeXT layout to %s", len(plan), out)
    return out


# ---------------------------------------------------------------------------------------------------------------
# LLaVA-NeXT -> transformers


def _next_to_hf(src: Path, out: Path, force: bool, vision_config: str | None, processor_dir: str | None,
                shard: int) -> Path:
    import torch
    from transformers import LlavaOnevisionForConditionalGeneration

    from ..data.processor import copy_processor_files, write_hub_processor

    cfg = read_json(src / "config.json")
    archs = cfg.get("architectures") or []
    if cfg.get("model_type") not in ("llava", "llava_qwen") and "LlavaQwenForCausalLM" not in archs:
        raise UserError(f"{src}/config.json: model_type {cfg.get('model_type')!r}, architectures {archs}; --from "
                        "llava-next expects an original LLaVA-NeXT llava_qwen checkpoint (LlavaQwenForCausalLM)")
    if cfg.get("mm_projector_type", "mlp2x_gelu") != "mlp2x_gelu":
        raise UserError(f"{src}/config.json: mm_projector_type {cfg.get('mm_projector_type')}; only mlp2x_gelu "
                        "(LLaVA-OneVision's projector) converts")
    # Tensors: rename, drop derived buffers, list what does not map.
    tensors: dict[str, TensorRef] = {}
    unknown, dropped = [], []
    for ref in Checkpoint(src).tensors():
        if _DERIVED.search(ref.name):
            dropped.append(ref.name)
            continue
        name = from_next(ref.name)
        if name is None:
            unknown.append(ref.name)
        else:
            tensors[name] = ref
    if unknown:
        raise UserError(f"{src}: {len(unknown)} tensor(s) are not part of the LLaVA-NeXT llava_qwen layout this "
                        f"converts: {listing(unknown)}")
    if dropped:
        log.info("dropped %d derived buffer(s) transformers recomputes: %s", len(dropped), listing(dropped, 3))

    config, proc, proc_source = hf_config(src, cfg, tensors, vision_config, processor_dir)

    # Exactly the tensors the transformers model has (an empty model on the meta device lists them).
    with torch.device("meta"):
        expected = set(LlavaOnevisionForConditionalGeneration(config).state_dict())
    missing = sorted(expected - set(tensors))
    if config.tie_word_embeddings:
        missing = [m for m in missing if m != "lm_head.weight"]
    extra = sorted(set(tensors) - expected)
    if missing or extra:
        msg = []
        if missing:
            msg.append(f"missing {listing([next_name(m) or m for m in missing])}")
        if extra:
            msg.append(f"not in the transformers model {listing([tensors[e].name for e in extra])}")
        raise UserError(f"{src}: the tensors do not make a LLaVA-OneVision model with this config: {'; '.join(msg)}")

    plan = [OutTensor(hub_name(n), r.dtype, r.shape, copy_tensor(r)) for n, r in tensors.items()]
    with atomic_dir(out, force=force, kind="convert") as tmp:
        write_checkpoint(tmp, plan, shard)
        config.save_pretrained(tmp)
        copy_files(src, tmp, ["generation_config.json"])
        if proc_source is not None:
            copy_processor_files(proc_source, tmp)
        else:
            write_hub_processor(proc, tmp)
    log.info("wrote %d tensors in the transformers LLaVA-OneVision layout to %s", len(plan), out)
    return out
