"""The configs and processor files of `lora-manip convert`: a LLaVA-NeXT `llava_qwen` config.json <-> a transformers
LLaVA-OneVision config, and the processor a converted checkpoint gets.

- Text: LLaVA-NeXT keeps the Qwen2 fields at the top level (hidden_size, num_hidden_layers, rope_theta, ...); they
  become `text_config` and back. The tensors' shapes are checked against them.
- Vision: LLaVA-NeXT's config names only the tower (`mm_vision_tower`, e.g. google/siglip-so400m-patch14-384).
  LLaVA-NeXT's SigLipVisionTower deletes SigLIP's last encoder layer and its pooling head and takes
  hidden_states[-1] of what is left, whatever `mm_vision_select_layer` says (-2 in the published configs: the
  output of so400m's 26th of 27 layers). transformers' LLaVA-OneVision expresses the same as a 26-layer tower
  without head and `vision_feature_layer=-1`, `vision_feature_select_strategy="full"` (SigLIP has no CLS token,
  so LLaVA-NeXT's "patch" keeps every token). The vision config is taken from, in order: `--vision-config` (the
  converted tower's SiglipVisionConfig JSON, or a config with a `vision_config` block, used as it is), a
  `vision_config` block in the source config.json (this kit's llava-next export writes one, as upstream has no
  place for it), the config.json of the tower `mm_vision_tower` names, when that is a local folder (as given or
  relative to the source) or a hub id in the local Hugging Face cache, where upstream loads it from (a
  SiglipVisionConfig, or a SiglipConfig's vision_config; its last layer and head dropped, as upstream does), else
  SigLIP-so400m-patch14-384 (hidden 1152, 16 heads, MLP 4304, 384 px, patch 14) with the layer count and head
  read from the tensors. The log says which. Every shape is checked against the tensors.
- Image layout: image_aspect_ratio (anyres_max_9) <-> vision_aspect_ratio, image_grid_pinpoints as they are
  (the "(1x1),...,(6x6)" string form is expanded), projector mlp2x_gelu <-> projector_hidden_act gelu.
- Processor for `--to hf`: the files of `--processor DIR`, else the source's own processor files if it has a
  processor_config.json, copied byte for byte; else built and written in the hub layout (processor_class
  LlavaOnevisionProcessor, image and video processor configs, chat_template.json): the source's tokenizer plus
  `<image>`/`<video>` special tokens (appended when missing: 151646/151647 for Qwen2, as transformers'
  conversion did), the PIL LLaVA-OneVision image processor at the tower's resolution with SigLIP normalisation
  (mean = std = 0.5, bicubic), the pinpoints, 729 image tokens per 384-px tile, and the llava-hf checkpoints'
  list-content chat template, as transformers' conversion writes it.
- `--to llava-next` writes the llava_qwen config (mm_* fields, Qwen2 fields at the top level), the tokenizer (with
  vocab.json / merges.txt for slow-tokenizer loaders) and keeps the processor files, which upstream ignores.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from ..dtypes import to_torch
from ..errors import UserError
from ..fsutil import copy_files, read_json
from ..model.layouts import next_name
from .tensors import TensorRef

log = logging.getLogger(__name__)

SIGLIP_NORM = [0.5, 0.5, 0.5]


# ---------------------------------------------------------------------------------------------------------------
# transformers -> LLaVA-NeXT


def next_config(cfg: dict, vision_tower: str, src: Path) -> dict:
    text, vision = dict(cfg.get("text_config") or {}), dict(cfg.get("vision_config") or {})
    rope = text.pop("rope_parameters", None) or {}
    for key in ("model_type", "architectures", "dtype", "torch_dtype", "transformers_version", "_name_or_path"):
        text.pop(key, None)
    out = {"architectures": ["LlavaQwenForCausalLM"], "model_type": "llava", **text}
    if "rope_theta" in rope:
        out["rope_theta"] = rope["rope_theta"]
    scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    if scaling.get("rope_type", "default") != "default":
        out["rope_scaling"] = {"type": scaling["rope_type"], **scaling}
    out["tie_word_embeddings"] = bool(cfg.get("tie_word_embeddings", text.get("tie_word_embeddings", False)))
    dtype = cfg.get("dtype") or cfg.get("torch_dtype")
    if dtype:
        out["torch_dtype"] = dtype
    tok_cfg = read_json(src / "tokenizer_config.json") if (src / "tokenizer_config.json").is_file() else {}
    out.update({
        "mm_vision_tower": vision_tower,
        "mm_hidden_size": vision.get("hidden_size"),
        "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch",
        "mm_patch_merge_type": "spatial_unpad",
        "image_aspect_ratio": cfg.get("vision_aspect_ratio", "anyres_max_9"),
        "image_grid_pinpoints": cfg.get("image_grid_pinpoints"),
        "mm_newline_position": "one_token",
        "mm_spatial_pool_mode": "bilinear",
        "mm_spatial_pool_stride": 2,
        "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False,
        "use_mm_proj": True,
        "image_token_index": cfg.get("image_token_index"),
        "video_token_index": cfg.get("video_token_index"),
        "tokenizer_model_max_length": tok_cfg.get("model_max_length", text.get("max_position_embeddings")),
        "tokenizer_padding_side": "right",
        # Not an upstream field (upstream builds SigLIP from mm_vision_tower): the tower's exact shapes, for the way
        # back to transformers.
        "vision_config": vision,
    })
    return out


def copy_processor(src: Path, dst: Path) -> None:
    """The source's processor files as they are; a source with a tokenizer but no processor keeps its tokenizer."""
    from ..data.processor import PROCESSOR_FILES, copy_processor_files

    if not copy_processor_files(src, dst):
        copy_files(src, dst, PROCESSOR_FILES)


def write_slow_tokenizer_files(folder: Path) -> None:
    """vocab.json + merges.txt from a BPE tokenizer.json, for loaders that want the slow Qwen2 tokenizer."""
    tj = folder / "tokenizer.json"
    if not tj.is_file() or (folder / "vocab.json").is_file():
        return
    model = json.loads(tj.read_text()).get("model") or {}
    if model.get("type") != "BPE":
        return
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    (folder / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------------------------
# LLaVA-NeXT -> transformers


def hf_config(src: Path, cfg: dict, tensors: dict[str, TensorRef], vision_config: str | None,
              processor_dir: str | None):
    """(LlavaOnevisionConfig, processor, folder whose processor files the output copies verbatim or None) for a
    llava_qwen config.json `cfg`, every field checked against the (canonical) `tensors`."""
    from transformers import LlavaOnevisionConfig, Qwen2Config

    vision = _vision_config(cfg, src, vision_config, tensors)
    text_fields = set(Qwen2Config().to_dict()) | {"rope_theta", "rope_scaling"}
    text_fields -= {"architectures", "model_type", "dtype", "transformers_version", "_name_or_path", "torch_dtype"}
    text = {k: v for k, v in cfg.items() if k in text_fields}
    theta, scaling = text.pop("rope_theta", None), text.pop("rope_scaling", None) or {}
    if theta is not None or scaling:  # upstream's rope_theta / rope_scaling -> transformers 5's rope_parameters
        rope = {k: v for k, v in scaling.items() if k != "type"}
        rope["rope_type"] = scaling.get("rope_type") or scaling.get("type") or "default"
        if theta is not None:
            rope["rope_theta"] = theta
        text["rope_parameters"] = rope
    _check_text(src, text, tensors, cfg.get("mm_hidden_size"), vision)

    proc, proc_source = _processor_for(src, processor_dir, cfg, vision)
    image_id = proc.tokenizer.convert_tokens_to_ids("<image>")
    video_id = proc.tokenizer.convert_tokens_to_ids("<video>")
    vocab = text.get("vocab_size")
    if vocab is not None and max(image_id, video_id) >= vocab:
        raise UserError(f"<image>/<video> token ids {image_id}/{video_id} are outside the embedding table "
                        f"({vocab} rows); this conversion does not resize embeddings")
    dtype = cfg.get("torch_dtype") or cfg.get("dtype")
    config = LlavaOnevisionConfig(
        text_config={"model_type": "qwen2", **text}, vision_config={"model_type": "siglip_vision_model", **vision},
        image_token_index=image_id, video_token_index=video_id, projector_hidden_act="gelu",
        vision_feature_select_strategy="full", vision_feature_layer=-1,
        vision_aspect_ratio=cfg.get("image_aspect_ratio") or "anyres_max_9",
        image_grid_pinpoints=_pinpoints(cfg.get("image_grid_pinpoints"), vision["image_size"]),
        multimodal_projector_bias=True, tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)))
    if dtype:
        config.dtype = to_torch(dtype) or dtype
    config.architectures = ["LlavaOnevisionForConditionalGeneration"]
    return config, proc, proc_source


_VISION_KEYS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "image_size",
                "patch_size", "num_channels", "hidden_act", "layer_norm_eps", "attention_dropout")


def _vision_config(cfg: dict, src: Path, path: str | None, tensors: dict[str, TensorRef]) -> dict:
    from transformers import LlavaOnevisionConfig

    tower = str(cfg.get("mm_vision_tower") or "")
    if path:
        given = read_json(Path(path))
        vision, origin = dict(given.get("vision_config") or given), f"--vision-config {path}"
    elif cfg.get("vision_config"):
        vision, origin = dict(cfg["vision_config"]), f"{src}/config.json vision_config"
    elif (found := _tower_config(tower, src)) is not None:
        vision, origin = found
    else:
        if "siglip" not in tower.lower():
            raise UserError(f"{src}/config.json: mm_vision_tower {tower!r} is not SigLIP, and neither a local folder "
                            "nor in the local Hugging Face cache; only SigLIP towers convert (or pass --vision-config)")
        # transformers' LLaVA-OneVision defaults are SigLIP-so400m-patch14-384 with 26 layers and no head.
        defaults = LlavaOnevisionConfig().vision_config.to_dict()
        vision = {k: defaults[k] for k in _VISION_KEYS}
        layers = {int(m.group(1)) for n in tensors
                  if (m := re.match(r"model\.vision_tower\.encoder\.layers\.(\d+)\.", n))}
        vision["num_hidden_layers"] = len(layers)
        vision["vision_use_head"] = any(n.startswith("model.vision_tower.head.") for n in tensors)
        origin = f"SigLIP-so400m defaults for {tower} (layers and head from the tensors)"
    for key in ("model_type", "transformers_version", "architectures", "_name_or_path", "dtype", "torch_dtype"):
        vision.pop(key, None)
    vision.setdefault("vision_use_head", any(n.startswith("model.vision_tower.head.") for n in tensors))
    log.info("vision config from %s", origin)
    hidden, patch, size = vision.get("hidden_size"), vision.get("patch_size"), vision.get("image_size")
    checks = [
        ("model.vision_tower.embeddings.patch_embedding.weight",
         (hidden, vision.get("num_channels", 3), patch, patch)),
        ("model.vision_tower.embeddings.position_embedding.weight",
         ((size // patch) ** 2 if size and patch else None, hidden)),
        ("model.vision_tower.encoder.layers.0.mlp.fc1.weight", (vision.get("intermediate_size"), hidden)),
    ]
    for name, want in checks:
        ref = tensors.get(name)
        if ref is None:
            raise UserError(f"{src}: no vision tower tensor {next_name(name)}; a checkpoint without its "
                            "SigLIP weights cannot be converted")
        if tuple(ref.shape) != tuple(want):
            raise UserError(f"{ref.file}: tensor {ref.name} is {list(ref.shape)}, but the vision config ({origin}) "
                            f"implies {list(want)}; pass --vision-config with the tower's SiglipVisionConfig")
    n_layers = len({n.split(".")[4] for n in tensors if n.startswith("model.vision_tower.encoder.layers.")})
    if n_layers != vision.get("num_hidden_layers"):
        raise UserError(f"{src}: the vision tower has {n_layers} encoder layers, the vision config ({origin}) says "
                        f"{vision.get('num_hidden_layers')}")
    if hidden % vision.get("num_attention_heads", 1):
        raise UserError(f"vision config ({origin}): hidden_size {hidden} is not divisible by num_attention_heads")
    return vision


def _tower_config(tower: str, src: Path) -> tuple[dict, str] | None:
    """The vision config upstream would build the tower from: `mm_vision_tower` as a local folder (as written, or
    relative to the checkpoint) or a hub id in the local Hugging Face cache (never downloads); None if neither."""
    from ..hub import HUB_ID

    if not tower:
        return None
    folders = [Path(tower).expanduser()] + ([src / tower] if not Path(tower).is_absolute() else [])
    for folder in folders:
        if folder.is_dir():
            if not (folder / "config.json").is_file():
                raise UserError(f"mm_vision_tower {tower}: the folder {folder} has no config.json; pass "
                                "--vision-config with the tower's SiglipVisionConfig")
            return _siglip_without_last_layer(folder / "config.json", f"the mm_vision_tower folder {folder}")
    if HUB_ID.match(tower):
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(tower, "config.json")
        if isinstance(hit, str):  # a path; None or a "known missing" marker otherwise
            return _siglip_without_last_layer(Path(hit), f"mm_vision_tower {tower} in the local Hugging Face cache")
    log.info("mm_vision_tower %s is neither a local folder nor in the local Hugging Face cache", tower)
    return None


def _siglip_without_last_layer(path: Path, where: str) -> tuple[dict, str]:
    """A SigLIP config.json (SiglipVisionConfig, or SiglipConfig with a vision_config block) as LLaVA-NeXT's
    SigLipVisionTower uses it: it deletes the last encoder layer and replaces the pooling head by Identity."""
    from transformers import SiglipVisionConfig

    raw = read_json(path)
    kind = raw.get("model_type")
    if kind == "siglip":
        block = raw.get("vision_config") or {}
    elif kind == "siglip_vision_model":
        block = raw
    else:
        raise UserError(f"{path}: model_type {kind!r}; the tower mm_vision_tower names must be SigLIP (siglip or "
                        "siglip_vision_model) to convert, or pass --vision-config")
    block = {k: v for k, v in block.items() if k in _VISION_KEYS}
    try:
        full = SiglipVisionConfig(**block).to_dict()
    except (TypeError, ValueError) as e:
        raise UserError(f"{path}: not a valid SigLIP vision config ({str(e).splitlines()[0]})") from None
    vision = {k: full[k] for k in _VISION_KEYS}
    vision["num_hidden_layers"] = full["num_hidden_layers"] - 1
    vision["vision_use_head"] = False
    return vision, (f"{where} ({path}: {full['num_hidden_layers']} layers; LLaVA-NeXT drops the last one and the "
                    f"head, leaving {vision['num_hidden_layers']})")


def _check_text(src: Path, text: dict, tensors: dict[str, TensorRef], mm_hidden, vision: dict) -> None:
    for key in ("hidden_size", "num_hidden_layers", "vocab_size", "intermediate_size"):
        if key not in text:
            raise UserError(f"{src}/config.json has no {key} (the Qwen2 fields sit at the top level of a llava_qwen "
                            "config)")
    checks = [("model.language_model.embed_tokens.weight", (text["vocab_size"], text["hidden_size"])),
              ("model.language_model.layers.0.mlp.gate_proj.weight", (text["intermediate_size"], text["hidden_size"])),
              ("model.multi_modal_projector.linear_1.weight", (text["hidden_size"], vision["hidden_size"]))]
    for name, want in checks:
        ref = tensors.get(name)
        if ref is not None and tuple(ref.shape) != tuple(want):
            raise UserError(f"{ref.file}: tensor {ref.name} is {list(ref.shape)}, but {src}/config.json implies "
                            f"{list(want)}")
    if mm_hidden is not None and mm_hidden != vision["hidden_size"]:
        raise UserError(f"{src}/config.json: mm_hidden_size {mm_hidden} but the vision tower is "
                        f"{vision['hidden_size']} wide")
    n_layers = len({n.split(".")[3] for n in tensors if n.startswith("model.language_model.layers.")})
    if n_layers != text["num_hidden_layers"]:
        raise UserError(f"{src}: {n_layers} language-model layers in the tensors, num_hidden_layers is "
                        f"{text['num_hidden_layers']}")


def _pinpoints(value, tile: int):
    """LLaVA-NeXT writes pinpoints as a list of [h, w] or as "(1x1),...,(6x6)" (grid range, in tiles)."""
    if value is None:
        return None
    if isinstance(value, str):
        grids = [tuple(map(int, m)) for m in re.findall(r"\((\d+)x(\d+)\)", value)]
        if not grids:
            raise UserError(f"image_grid_pinpoints {value!r}: expected a list or '(1x1),...,(6x6)'")
        (a0, b0), (a1, b1) = grids[0], grids[-1]
        return [[i * tile, j * tile] for i in range(min(a0, a1), max(a0, a1) + 1)
                for j in range(min(b0, b1), max(b0, b1) + 1)]
    return [list(p) for p in value]


def _processor_for(src: Path, processor_dir: str | None, cfg: dict, vision: dict):
    """(processor, folder whose processor files the output copies verbatim, or None: write the built one)."""
    from ..data.processor import load_processor

    if processor_dir:
        if not (Path(processor_dir) / "processor_config.json").is_file():
            raise UserError(f"--processor {processor_dir}: no processor_config.json there; pass a LLaVA-OneVision "
                            "checkpoint or processor folder")
        return load_processor(processor_dir), Path(processor_dir)
    if (src / "processor_config.json").is_file():
        log.info("processor from %s (its own processor files)", src)
        return load_processor(src), src
    return build_processor(src, cfg, vision), None


def build_processor(src: Path, cfg: dict, vision: dict):
    """A LLaVA-OneVision processor for a LLaVA-NeXT checkpoint: its tokenizer + <image>/<video>, SigLIP image
    preprocessing at the tower's resolution, the anyres pinpoints, the llava-hf checkpoints' list-content chat
    template (what transformers' conversion gives the hub folders)."""
    from transformers import AutoTokenizer
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    from ..data.processor import ImageOnlyOnevisionProcessor
    from ..model.tiny import HUB_CHAT_TEMPLATE

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(src), local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        raise UserError(f"cannot load a tokenizer from {src} ({str(e).splitlines()[0]}); pass --processor with a "
                        "LLaVA-OneVision processor folder") from None
    missing = [t for t in ("<image>", "<video>") if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_additional_special_tokens=False)
        log.info("added %s to the tokenizer (ids %s)", missing, [tokenizer.convert_tokens_to_ids(t) for t in missing])
    size, patch = vision["image_size"], vision["patch_size"]
    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": size, "width": size}, crop_size={"height": size, "width": size},
        image_grid_pinpoints=_pinpoints(cfg.get("image_grid_pinpoints"), size), do_pad=True,
        image_mean=SIGLIP_NORM, image_std=SIGLIP_NORM, resample=3)
    log.info("processor built: tokenizer from %s, SigLIP preprocessing at %d px, %d tokens per tile", src, size,
             (size // patch) ** 2)
    return ImageOnlyOnevisionProcessor(
        image_processor=image_processor, tokenizer=tokenizer, num_image_tokens=(size // patch) ** 2,
        vision_feature_select_strategy="full", chat_template=HUB_CHAT_TEMPLATE,
        vision_aspect_ratio=cfg.get("image_aspect_ratio") or "anyres_max_9")


# ------------------------------------------------------------------------------- a trained run's image cap


def carry_image_cap(folder: Path, max_tiles: int | None) -> list[str]:
    """Write a run's anyres cap (data.max_image_tiles) into an output folder's own files: the image_grid_pinpoints
    of config.json (where the model and vLLM place features) and of preprocessor_config.json (where the image
    processor cuts tiles), limited as training limited them (data/processor.capped_pinpoints). transformers and
    vLLM read the grid from these files, not from the kit's recipe.yaml, so without this a server tiles large
    images into more tiles than the model was trained on. Returns the files changed."""
    from ..data.processor import capped_pinpoints
    from ..fsutil import atomic_write_text

    if not max_tiles:
        return []
    files = {name: read_json(folder / name) for name in ("config.json", "preprocessor_config.json")
             if (folder / name).is_file()}
    pre, cfg = files.get("preprocessor_config.json", {}), files.get("config.json", {})
    size = pre.get("crop_size") or pre.get("size") or {}
    tile = size.get("height") or (cfg.get("vision_config") or {}).get("image_size")
    changed = []
    for name, node in files.items():
        pins = node.get("image_grid_pinpoints")
        if not pins or not tile:
            continue
        kept = capped_pinpoints(pins, tile, max_tiles)
        if kept != [list(p) for p in pins]:
            node["image_grid_pinpoints"] = kept
            atomic_write_text(folder / name, json.dumps(node, indent=2, sort_keys=True) + "\n")
            changed.append(name)
    if changed:
        log.info("anyres capped at %d tiles per image (data.max_image_tiles) in %s", max_tiles, ", ".join(changed))
    return changed


def run_image_cap(folder: Path) -> int | None:
    """data.max_image_tiles of the run recipe.yaml in `folder`, or None (no recipe, or no cap)."""
    from ..recipe.load import read_run_recipe

    recipe = read_run_recipe(folder)
    return recipe.data.max_image_tiles if recipe is not None else None
