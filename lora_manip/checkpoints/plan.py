"""Planning a merge: read the adapter's and the base's safetensors headers and configs, check every shape, and decide
what each output tensor is made of, before a byte is written.

Adapter keys are matched to base tensors through the canonical (transformers in-memory) names, so a base in any
transformers layout works; each output tensor keeps the key the base itself uses, so the merged folder has exactly
the base's tensor names (hub 4.x layout in, hub layout out; transformers-5 names in, the same names out).
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..dtypes import FLOAT_CODES, TORCH_DTYPES, WEIGHT_CODES, code_of, short_name
from ..errors import UserError
from ..fsutil import read_json
from ..model.adapters import ADAPTER_FILE, EXTRA_FILE, AdapterConfig, read_adapter_config
from ..model.layouts import DORA_KEY, EXTRA_TRAINABLES, LORA_KEY, canonical, peft_inner, unwrap_peft
from .fold import merged_producer
from .quant import QuantSpec, quantised_in_training
from .shards import OutTensor, cast_tensor
from .tensors import Checkpoint, TensorRef, canonical_tensors, listing, read_header

log = logging.getLogger(__name__)

# Trained bare parameters (image_newline) that model/adapters.save_extras adds to the adapter file.
_EXTRAS = {canonical(n) for names in EXTRA_TRAINABLES.values() for n in names}


@dataclass
class _Lora:
    module: str
    A: TensorRef | None = None
    B: TensorRef | None = None
    bias: TensorRef | None = None
    magnitude: TensorRef | None = None


@dataclass
class MergePlan:
    base_dir: Path
    base_config: dict
    out_dtype: str  # bf16 | fp16 | fp32
    tensors: list[OutTensor] = field(default_factory=list)
    n_lora: int = 0
    n_replaced: int = 0
    n_requantised: int = 0
    fp32_bytes: int = 0
    quant: QuantSpec | None = None  # set: the LM's Linear weights are folded as the 4-bit training saw them
    extras: list[str] = field(default_factory=list)  # trained bare parameters replaced (image_newline)


def plan_merge(adapter_dir: Path, base_dir: Path, dtype: str | None = None,
               quant: QuantSpec | None = None) -> MergePlan:
    cfg = read_adapter_config(adapter_dir)
    _check_adapter_config(adapter_dir, cfg)
    base_config = read_base_config(base_dir)
    base = canonical_tensors(Checkpoint(base_dir), "base checkpoint")
    _check_not_quantised(base_dir, base_config, base)

    out_code = code_of(dtype) if dtype else base_dtype(base_config, base)
    plan = MergePlan(base_dir, base_config, short_name(out_code), quant=quant)

    adapter_file = adapter_dir / ADAPTER_FILE
    if not adapter_file.is_file():
        other = " (only the pickle adapter_model.bin is there: re-save it as safetensors)" \
            if (adapter_dir / "adapter_model.bin").is_file() else ""
        raise UserError(f"{adapter_dir}: no {ADAPTER_FILE}{other}")
    _, adapter_refs = read_header(adapter_file)
    loras: dict[str, _Lora] = {}
    replace: dict[str, TensorRef] = {}
    leftovers: list[str] = []
    save_modules = cfg.modules_to_save or []
    for ref in adapter_refs:
        key = peft_inner(ref.name)
        if key is None:
            leftovers.append(ref.name)
            continue
        m = LORA_KEY.match(key) or DORA_KEY.match(key)
        if m:
            module = canonical(m.group("module"))
            if module is None:
                leftovers.append(ref.name)
                continue
            entry = loras.setdefault(module, _Lora(module))
            slot = "magnitude" if m.re is DORA_KEY else (
                "bias" if m.group("param") == "bias" else m.group("kind")[-1])
            if slot == "bias" and m.group("kind") == "lora_A":
                leftovers.append(ref.name)
                continue
            if getattr(entry, slot) is not None:
                raise UserError(f"{adapter_file}: two tensors for {module} {slot}: {getattr(entry, slot).name}, "
                                f"{ref.name}")
            setattr(entry, slot, ref)
            continue
        name = canonical(unwrap_peft(key))
        # a full tensor of a module the adapter trains in full, or a bare parameter the kit adds (image_newline)
        if name is None or not (name in _EXTRAS or any(re.search(rf"(^|\.){re.escape(s)}\.", name)
                                                      for s in save_modules)):
            leftovers.append(ref.name)
            continue
        if name in replace:
            raise UserError(f"{adapter_file}: two tensors replace {name}: {replace[name].name}, {ref.name}")
        replace[name] = ref

    extra_file = adapter_dir / EXTRA_FILE
    if extra_file.is_file():
        for ref in read_header(extra_file)[1]:
            name = canonical(ref.name)
            if name is None or name in replace:
                leftovers.append(f"{EXTRA_FILE}:{ref.name}")
                continue
            replace[name] = ref

    # Match everything to base tensors; anything that matches nothing is a leftover.
    per_tensor: dict[str, list] = {}
    for module, lora in loras.items():
        weight = f"{module}.weight"
        if weight not in base:
            leftovers += [r.name for r in (lora.A, lora.B, lora.bias, lora.magnitude) if r is not None]
            continue
        _check_lora(adapter_file, cfg, lora, base[weight], base.get(f"{module}.bias"))
        per_tensor.setdefault(weight, []).append(("lora", lora))
        if lora.bias is not None:
            per_tensor.setdefault(f"{module}.bias", []).append(("lora_bias", lora))
    for name, ref in replace.items():
        if name not in base:
            leftovers.append(ref.name if ref.file == adapter_file else f"{EXTRA_FILE}:{ref.name}")
            continue
        if tuple(ref.shape) != tuple(base[name].shape):
            raise UserError(f"{ref.file}: tensor {ref.name} has shape {list(ref.shape)}, but the base's {name} "
                            f"({base[name].file.name}: {base[name].name}) is {list(base[name].shape)}: the adapter "
                            "does not belong to this base")
        if ref.dtype not in FLOAT_CODES:
            raise UserError(f"{ref.file}: tensor {ref.name} is {ref.dtype}, expected a float tensor")
        per_tensor.setdefault(name, []).append(("replace", ref))
        if name in _EXTRAS:
            plan.extras.append(name.rsplit(".", 1)[-1])
    if leftovers:
        raise UserError(f"{adapter_dir}: {len(leftovers)} adapter tensor(s) match no tensor of base {base_dir}: "
                        f"{listing(leftovers)}. Is --base the model this adapter was trained on?")
    conflicts = [n for n, ops in per_tensor.items() if len(ops) > 1 and any(k == "replace" for k, _ in ops)]
    if conflicts:
        raise UserError(f"{adapter_dir}: tensors both replaced in full and LoRA-adapted: {listing(conflicts)}")

    alpha, r_default = float(cfg.lora_alpha), cfg.r
    for name, ref in base.items():
        ops = per_tensor.get(name, [])
        code = out_code if ref.dtype in FLOAT_CODES else ref.dtype
        plan.fp32_bytes += ref.numel * 4
        requant = quant if quant is not None and quantised_in_training(name, ref.shape) else None
        if ops and ops[0][0] == "replace":
            produce = cast_tensor(ops[0][1], code)
            plan.n_replaced += 1
        elif not ops and requant is None:
            produce = cast_tensor(ref, code)
        else:
            loras_here = [l for _, l in ops]
            scales = [_scaling(cfg, l, alpha, r_default) for l in loras_here]
            kinds = [k for k, _ in ops]
            produce = merged_producer(name, ref, code, kinds, loras_here, scales, requant)
            plan.n_lora += bool(ops)
            plan.n_requantised += requant is not None
        # the base's own key: the output has exactly the base's tensor names, whatever layout it uses
        plan.tensors.append(OutTensor(ref.name, code, ref.shape, produce))
    return plan


def _check_adapter_config(adapter_dir: Path, cfg: AdapterConfig) -> None:
    where = f"{adapter_dir}/adapter_config.json"
    if cfg.peft_type != "LORA":
        raise UserError(f"{where}: peft_type {cfg.peft_type} is not supported (LoRA, rsLoRA, DoRA only)")
    unsupported = {k: cfg.raw.get(k) for k in ("fan_in_fan_out", "target_parameters", "trainable_token_indices",
                                               "layer_replication", "use_qalora", "alora_invocation_tokens")
                   if cfg.raw.get(k)}
    if unsupported:
        raise UserError(f"{where}: unsupported LoRA options for a merge: {unsupported}")
    if cfg.use_dora and cfg.lora_bias:
        raise UserError(f"{where}: DoRA with lora_bias is not a valid PEFT adapter")


def _check_lora(adapter_file: Path, cfg: AdapterConfig, lora: _Lora, w: TensorRef, bias: TensorRef | None) -> None:
    names = f"{lora.module} (base tensor {w.name} in {w.file.name}, {list(w.shape)})"
    if lora.A is None or lora.B is None:
        have = lora.A or lora.B or lora.magnitude or lora.bias
        raise UserError(f"{adapter_file}: {names} has no lora_{'A' if lora.A is None else 'B'} tensor "
                        f"(found {have.name})")
    for ref in (lora.A, lora.B, lora.magnitude, lora.bias):
        if ref is not None and ref.dtype not in FLOAT_CODES:
            raise UserError(f"{adapter_file}: tensor {ref.name} is {ref.dtype}, expected a float tensor")
    if len(w.shape) != 2 or len(lora.A.shape) != 2 or len(lora.B.shape) != 2:
        raise UserError(f"{adapter_file}: {lora.A.name}: only LoRA on Linear layers (2-D weights) can be merged; "
                        f"{names}")
    out_f, in_f = w.shape
    r = lora.A.shape[0]
    if lora.A.shape[1] != in_f or lora.B.shape != (out_f, r):
        raise UserError(f"{adapter_file}: shapes do not fit the base: {lora.A.name} {list(lora.A.shape)} and "
                        f"{lora.B.name} {list(lora.B.shape)} vs {names}; expected lora_A [r, {in_f}] and lora_B "
                        f"[{out_f}, r]. Is --base the model this adapter was trained on?")
    if bool(cfg.use_dora) != (lora.magnitude is not None):
        raise UserError(f"{adapter_file}: {lora.module}: use_dora is {bool(cfg.use_dora)} in "
                        f"adapter_config.json but the lora_magnitude_vector is "
                        f"{'present' if lora.magnitude is not None else 'missing'}")
    if lora.magnitude is not None and math.prod(lora.magnitude.shape) != out_f:
        raise UserError(f"{adapter_file}: {lora.magnitude.name} {list(lora.magnitude.shape)} does not fit {names}")
    if lora.bias is not None:
        if bias is None:
            raise UserError(f"{adapter_file}: {lora.bias.name}: lora_bias needs a bias in the base, and {lora.module}"
                            " has none")
        if lora.bias.shape != bias.shape:
            raise UserError(f"{adapter_file}: {lora.bias.name} {list(lora.bias.shape)} does not fit base "
                            f"{bias.name} {list(bias.shape)}")


def peft_pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: the first pattern that matches the end of the module path."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _scaling(cfg: AdapterConfig, lora: _Lora, alpha: float, r_default: int) -> float:
    r = lora.A.shape[0]
    a = float(peft_pattern_value(cfg.alpha_pattern or {}, lora.module, alpha))
    if cfg.rank_pattern:
        expect = peft_pattern_value(cfg.rank_pattern, lora.module, r_default)
        if expect != r:
            raise UserError(f"{lora.A.name}: rank {r} but adapter_config.json gives {lora.module} rank {expect}")
    return a / math.sqrt(r) if cfg.use_rslora else a / r


def read_base_config(base_dir: Path) -> dict:
    cfg = read_json(base_dir / "config.json")
    if cfg.get("model_type") != "llava_onevision":
        hint = (" (an original LLaVA-NeXT checkpoint: convert it with `lora-manip convert SRC OUT --from llava-next "
                "--to hf`)") if "mm_vision_tower" in cfg or "LlavaQwenForCausalLM" in (cfg.get("architectures") or []) \
            else ""
        raise UserError(f"{base_dir}/config.json: model_type {cfg.get('model_type')!r}, expected 'llava_onevision'"
                        f"{hint}")
    return cfg


def _check_not_quantised(base_dir: Path, cfg: dict, base: dict[str, TensorRef]) -> None:
    packed = [n for n, r in base.items() if r.dtype in ("U8", "I8") or
              re.search(r"\.(absmax|quant_map|quant_state|SCB|weight_format)\b", n)]
    if packed:
        raise UserError(f"base {base_dir} is a quantised checkpoint ({listing(packed, 5)}); a merge folds the adapter "
                        "into the unquantised weights: pass --base with the full-precision model the adapter was "
                        "trained from")
    if "quantization_config" in cfg:
        log.info("base config.json has a quantization_config but unquantised weights: merging into the "
                 "full-precision weights; the output has no quantization_config")


def base_dtype(cfg: dict, base: dict[str, TensorRef]) -> str:
    for node in (cfg, cfg.get("text_config") or {}):
        for key in ("dtype", "torch_dtype"):
            value = node.get(key)
            if isinstance(value, str) and value in TORCH_DTYPES:
                return code_of(value)
    sizes: dict[str, int] = {}
    for r in base.values():
        if r.dtype in WEIGHT_CODES:
            sizes[r.dtype] = sizes.get(r.dtype, 0) + r.nbytes
    return max(sizes, key=sizes.get) if sizes else "F32"
