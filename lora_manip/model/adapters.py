"""Choose what trains: freeze parts, attach LoRA (PEFT) to the parts that ask for it, keep fully trained parts
trainable and saved with the adapter. One code path for full, LoRA and QLoRA."""

from __future__ import annotations

import logging
import os
import warnings
from collections import Counter
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from ..errors import UserError
from .layouts import (EXTRA_TRAINABLES, MODULES_TO_SAVE, PARTS, PEFT_PREFIX, lora_target_regex, part_of,
                      unwrap_peft)

log = logging.getLogger(__name__)

# PEFT (0.21) reads a model's `is_gradient_checkpointing` whenever it wraps one (get_peft_model, PeftModel.
# from_pretrained: training, merge's check, eval of an adapter), and transformers 5 deprecates that name for
# `is_activation_checkpointing`: every run would print a FutureWarning about code that is not the kit's. No PEFT
# call avoids the read, so this one message from that one module is silenced; drop it once PEFT reads the new name.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning,
                        module="transformers.modeling_utils")

# image_newline as runs before it moved into the adapter file wrote it (still read: load_extras, merge)
EXTRA_FILE = "extra_trainables.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_FILE = "adapter_model.safetensors"


def part_modes(recipe) -> dict[str, str]:
    return {name: getattr(recipe.parts, name).train for name in PARTS}


def prepare_trainable(model, recipe):
    """Return the model to train: the same model with requires_grad set (method full), or a PeftModel."""
    # No peft.prepare_model_for_kbit_training for QLoRA: it casts every non-quantised weight to fp32 (the frozen
    # vision tower, embeddings, lm_head, norms: ~3 GB more at 7B) although only trained weights need fp32 (below),
    # and its other job, input gradients for reentrant checkpointing, is moot with use_reentrant=False (the
    # Trainer enables checkpointing itself).
    modes = part_modes(recipe)
    for p in model.parameters():
        p.requires_grad_(False)
    lora_parts = [p for p, m in modes.items() if m == "lora"]
    if lora_parts:
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(
            r=recipe.lora.r, lora_alpha=recipe.lora.alpha, lora_dropout=recipe.lora.dropout,
            target_modules=lora_target_regex(lora_parts, recipe.lora.target_modules),
            use_rslora=recipe.lora.use_rslora, use_dora=recipe.lora.use_dora,
            modules_to_save=[MODULES_TO_SAVE[p] for p, m in modes.items() if m == "full"] or None,
            task_type=None)
        model = get_peft_model(model, cfg)
        adapted = Counter(part_of(n) for n, _ in model.named_parameters() if "lora_" in n)
        missing = [p for p in lora_parts if not adapted[p]]
        if missing:
            raise UserError(f"lora.target_modules {recipe.lora.target_modules} matches no layer in "
                            f"{', '.join(missing)}; Qwen2 has q/k/v/o_proj, gate/up/down_proj, SigLIP has "
                            "q/k/v/out_proj, fc1, fc2")
    for name, p in model.named_parameters():
        part = part_of(name)
        if modes[part] == "full" and "original_module" not in name:
            p.requires_grad_(True)
    if not any(p.requires_grad for p in model.parameters()):
        raise UserError("no parameter is trainable with this recipe's parts settings")
    if not recipe.distributed.deepspeed:
        fp32_master_weights(model)
    return model


def fp32_master_weights(model) -> int:
    """Keep every trained weight in fp32 while the frozen ones stay in the load dtype and compute runs in bf16/fp16
    under autocast. An AdamW update at lr 2e-5 is below bf16's resolution for most weights: trained in bf16, one
    step moved ~30% of the projector's weights (8% at the vision tower's 4e-6). PEFT already creates LoRA weights
    in fp32; this covers the parts trained in full (and makes fp16's GradScaler, which refuses fp16 gradients,
    work). DeepSpeed keeps its own fp32 master copy, so it is skipped there. Returns the number of tensors cast."""
    n = 0
    for p in model.parameters():
        if p.requires_grad and p.dtype in (torch.bfloat16, torch.float16):
            p.data = p.data.float()
            n += 1
    if n:
        log.info("fp32 master weights: %d trained tensors cast from 16-bit to float32", n)
    return n


def trainable_summary(model) -> dict[str, int]:
    """Trainable parameter count per part (LoRA weights count under the part they adapt)."""
    out: Counter = Counter()
    for name, p in model.named_parameters():
        if p.requires_grad:
            out[part_of(name)] += p.numel() if p.numel() else getattr(p, "ds_numel", 0)
    return dict(out)


def save_extras(model, out_dir: str | os.PathLike, state_dict: dict | None = None) -> None:
    """Add the trained tensors PEFT does not save itself to the adapter it just wrote. LLaVA-OneVision's
    image_newline is a bare nn.Parameter, which `modules_to_save` cannot name, so PEFT leaves it out; the kit
    trains it with the projector. It is added to adapter_model.safetensors under the key PEFT gives any model
    parameter (`base_model.model.<name>`): PEFT's loader passes keys that are no adapter weight straight to the
    model's load_state_dict, so stock `PeftModel.from_pretrained(base, adapter).merge_and_unload()` (and a
    Trainer resume) restores it, and gives the model `lora-manip merge` writes. Under ZeRO-3 the parameters are
    partitioned; the Trainer passes the gathered `state_dict` then."""
    from peft import PeftModel
    from safetensors import safe_open
    from safetensors.torch import load_file, save

    from ..fsutil import atomic_write_bytes

    if not isinstance(model, PeftModel):
        return  # a full save already holds every tensor
    want = {n for names in EXTRA_TRAINABLES.values() for n in names}
    trained = {unwrap_peft(n) for n, p in model.named_parameters() if p.requires_grad}
    source = state_dict if state_dict is not None else dict(model.named_parameters())
    tensors = {unwrap_peft(n): t.detach().to("cpu").contiguous() for n, t in source.items()
               if unwrap_peft(n) in want and unwrap_peft(n) in trained}
    if not tensors:
        return
    adapter_file = Path(out_dir) / ADAPTER_FILE
    if not adapter_file.is_file():  # PEFT wrote a pickle (safe_serialization off): keep the kit's own file
        from safetensors.torch import save_file

        save_file(tensors, str(Path(out_dir) / EXTRA_FILE))
        return
    with safe_open(str(adapter_file), "pt") as f:
        metadata = f.metadata()
    saved = load_file(str(adapter_file))
    saved.update({PEFT_PREFIX + name: t for name, t in tensors.items()})
    atomic_write_bytes(adapter_file, save(saved, metadata=metadata))


def is_adapter_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


@dataclass(frozen=True)
class AdapterConfig:
    """An adapter folder's adapter_config.json, typed: the fields the kit reads, each with PEFT's own LoraConfig
    default for a file that leaves it out (the one place the kit states them; a test holds them to PEFT's), and the
    whole file in `raw` (the merge refuses the options it cannot fold). Read without PEFT: a merge plans from
    headers and configs, and importing PEFT costs seconds."""

    path: Path  # the file, for messages
    raw: dict
    peft_type: str = "LORA"
    base_model_name_or_path: str | None = None
    r: int = 8
    lora_alpha: float = 8
    use_rslora: bool = False
    use_dora: bool = False
    lora_bias: bool = False
    modules_to_save: list[str] | None = None
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)


def read_adapter_config(path: str | os.PathLike) -> AdapterConfig:
    """adapter_config.json of an adapter folder; not JSON, or not an object, is a UserError naming the file."""
    from ..fsutil import read_json

    file = Path(path) / ADAPTER_CONFIG
    raw = read_json(file)
    read = {f.name for f in fields(AdapterConfig)} - {"path", "raw"}
    return AdapterConfig(file, raw, **{k: v for k, v in raw.items() if k in read})


def adapter_base(path: str | os.PathLike) -> str:
    cfg = read_adapter_config(path)
    base = cfg.base_model_name_or_path
    if not base or not isinstance(base, str):
        raise UserError(f"{path}/adapter_config.json names no base model; pass --base")
    return base


def load_with_adapter(adapter_dir: str | os.PathLike, base: str | None = None, dtype: str = "float32",
                      attn: str = "auto"):
    """Base model + adapter (+ extra trainables) for inference: (PeftModel, base path)."""
    from peft import PeftModel

    from .load import load_model, refuse_pickle_weights

    if not is_adapter_dir(adapter_dir):
        raise UserError(f"{adapter_dir} is not an adapter folder (no adapter_config.json); train one with "
                        "`lora-manip train` (method lora or qlora)")
    refuse_pickle_weights(adapter_dir, "adapter")
    base = base or adapter_base(adapter_dir)
    model = load_model(base, dtype=dtype, attn=attn)
    try:
        model = PeftModel.from_pretrained(model, str(adapter_dir))
    except (RuntimeError, ValueError) as e:
        raise UserError(f"adapter {adapter_dir} does not fit base {base}: {str(e).splitlines()[0]}") from None
    load_extras(model, adapter_dir)
    model.eval()
    return model, base


def load_extras(model, adapter_dir: str | os.PathLike) -> None:
    """Copy the tensors of an older run's extra_trainables.safetensors (if any) into the model. A newer adapter
    holds them in adapter_model.safetensors, which PEFT's own loading restores (save_extras)."""
    from safetensors.torch import load_file

    extra = Path(adapter_dir) / EXTRA_FILE
    if not extra.is_file():
        return
    params = {unwrap_peft(n): p for n, p in model.named_parameters()}
    with torch.no_grad():
        for name, t in load_file(str(extra)).items():
            if name not in params or params[name].shape != t.shape:
                raise UserError(f"{extra}: tensor {name} {tuple(t.shape)} does not fit the model")
            params[name].copy_(t.to(params[name].dtype))


def checkpoint_parts(model, which) -> list[str]:
    """Gradient checkpointing per tower: `which` is true (both), false, or a list of "lm" / "vision_tower". The
    Trainer's own switch covers the whole model; a trained vision tower at anyres is the costly one (every SigLIP
    layer's activations for every tile), the LM the other, so each can be chosen. Non-reentrant, so frozen
    embeddings need no input gradients."""
    from transformers import LlavaOnevisionModel

    parts = ["lm", "vision_tower"] if which is True else list(which or [])
    if not parts:
        return []
    inner = next(m for m in model.modules() if isinstance(m, LlavaOnevisionModel))
    towers = {"lm": inner.language_model, "vision_tower": inner.vision_tower}
    for part in parts:
        towers[part].activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    log.info("gradient checkpointing: %s", ", ".join(parts))
    return parts
