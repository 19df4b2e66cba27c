"""`lora-manip merge`: fold a LoRA/QLoRA adapter and the fully trained parts back into a full LLaVA-OneVision
checkpoint that transformers and vLLM load like the original.

Streaming: the base checkpoint is read shard by shard and tensor by tensor (in row chunks) from its safetensors
files, the adapter's deltas for each tensor are applied in fp32 and the result is cast and written straight into
bounded-size output shards, so peak memory stays near one row chunk plus the current LoRA pair, not the model. The
merge never loads a model and never touches 4-bit weights: a QLoRA adapter is folded into the unquantised base
checkpoint it was trained from (the adapter names it; `--base` overrides it).

What is folded in, for each base tensor W (names normalised to transformers' in-memory layout):
- LoRA: W + s * B @ A with s = alpha / r (alpha / sqrt(r) with rsLoRA; per-module r/alpha from rank_pattern /
  alpha_pattern as PEFT matches them); `lora_bias`: bias + s * lora_B.bias.
- DoRA: m / ||W + s B A|| * (W + s B A), the norm taken over each output row (dim 1 of the [out, in] weight),
  exactly as PEFT's DoraLinearLayer.get_weight_norm and merge.
- modules_to_save (projector, vision tower trained in full): the adapter's tensors replace the base's.
- `extra_trainables.safetensors` (image_newline): replaces the base tensor.
Every adapter tensor must be used exactly once; leftovers and shape mismatches are errors naming file and tensor,
raised before anything is written. The output goes to a temporary folder that is renamed only after the merged
model has been reloaded and checked against base + adapter on a probe input (skipped, with a message, for models
too large to load twice here).
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpoint_io import (read_json, CODE_TO_CONFIG_DTYPE, DEFAULT_SHARD_BYTES, FLOAT_CODES, PROCESSOR_FILES,
                            Checkpoint, OutTensor, TensorRef, cast_tensor, canonical_tensors, copy_files, dtype_code,
                            hf_canonical, hf_saved_name, listing, parse_size, read_header, read_tensor, row_producer,
                            write_checkpoint)
from .errors import UserError
from .fsutil import atomic_dir
from .model.adapters import EXTRA_FILE, load_extras

log = logging.getLogger(__name__)

_OUT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_CODE_TO_NAME = {"BF16": "bf16", "F16": "fp16", "F32": "fp32"}
# Relative tolerance (max |diff| / max |logit|) of the self-check, per output dtype: fp32 is exact up to rounding,
# 16-bit outputs round every weight once.
_TOLERANCE = {"fp32": 1e-4, "bf16": 3e-2, "fp16": 5e-3}
# The self-check loads the merged model and base + adapter one after the other in fp32: skip it above this size.
VERIFY_MAX_BYTES = 8 * 2**30
ADAPTER_FILE = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B)(?:\.[\w-]+)?\.(?P<param>weight|bias)$")
_DORA_KEY = re.compile(r"^(?P<module>.+)\.lora_magnitude_vector(?:\.[\w-]+)?(?:\.weight)?$")
_WRAPPER_INFIX = re.compile(r"\.(?:modules_to_save|original_module)\.[^.]+\.")


def probe_inputs(processor):
    """A fixed image + question through the real processor, so the check exercises vision tower, projector,
    image_newline (anyres) and LM."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (320, 180), (120, 90, 60))
    ImageDraw.Draw(img).rectangle([100, 60, 180, 130], fill=(220, 30, 30))
    text = processor.tokenizer.apply_chat_template(
        [{"role": "user", "content": "<image>\nWhere is the red cube?"}], chat_template=processor.chat_template,
        tokenize=False, add_generation_prompt=True)
    return processor(images=[img], text=[text], return_tensors="pt")


@torch.no_grad()
def logits_of(model, inputs) -> torch.Tensor:
    return model(**inputs).logits.float()


class MergeCheckFailed(UserError):
    exit_code = 1  # the inputs were fine; the result failed its check


# ---------------------------------------------------------------------------------------------------------------
# Public entry point


def merge_adapter(adapter_dir: str, base: str | None = None, out: str | None = None, dtype: str | None = None,
                  force: bool = False, verify: bool = True, *, max_shard_size: str | int = DEFAULT_SHARD_BYTES,
                  verify_max_bytes: int | None = None) -> tuple[Path, float | None]:
    """Merge `adapter_dir` into its base; returns (output folder, max |logit diff| of the check or None when the
    check did not run). `dtype`: bf16 | fp16 | fp32 (default: the base's). `max_shard_size`: bytes or '5GB'."""
    from .model.adapters import adapter_base, is_adapter_dir

    adapter_dir = Path(adapter_dir)
    if not is_adapter_dir(adapter_dir):
        hint = " (it holds a full model: nothing to merge)" if (adapter_dir / "config.json").is_file() else ""
        raise UserError(f"{adapter_dir} is not an adapter folder: no adapter_config.json{hint}")
    if dtype is not None and dtype not in _OUT_DTYPES:
        raise UserError(f"--dtype {dtype}: choose bf16, fp16 or fp32")
    base_name = base or adapter_base(adapter_dir)
    base_dir = resolve_base(base_name, from_adapter=base is None, adapter_dir=adapter_dir)
    out = Path(out) if out else adapter_dir.with_name(adapter_dir.name + "-merged")
    _check_out(out, {"adapter": adapter_dir, "base": base_dir})
    if out.exists() and not force:
        raise UserError(f"{out} already exists; pass --force to replace it or --out to choose another folder")

    plan = plan_merge(adapter_dir, base_dir, dtype)  # every check that can fail on the inputs happens here
    log.info("merging %s into %s: %d LoRA-adapted tensors, %d replaced, %d copied; output %s (%s)", adapter_dir,
             base_name, plan.n_lora, plan.n_replaced, len(plan.tensors) - plan.n_lora - plan.n_replaced, out,
             plan.out_dtype)
    _readahead(adapter_dir / ADAPTER_FILE)  # A/B are read tensor by tensor later: let the kernel fetch them now
    with atomic_dir(out, force=force) as tmp:
        write_checkpoint(tmp, plan.tensors, parse_size(max_shard_size))
        _write_config(tmp, plan)
        copy_files(base_dir, tmp, ["generation_config.json"])
        source = adapter_dir if (adapter_dir / "processor_config.json").is_file() else base_dir
        copied = copy_files(source, tmp, PROCESSOR_FILES)
        log.info("processor/tokenizer files from %s: %s", source, ", ".join(copied) or "none")
        _write_card(tmp, base_name, adapter_dir, plan.out_dtype)
        diff = None
        if verify:
            diff = _verify(tmp, adapter_dir, base_dir, plan, verify_max_bytes)
        else:
            log.info("merge check skipped (--no-verify)")
    return out, diff


def _readahead(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        finally:
            os.close(fd)
    except (OSError, AttributeError):
        pass


def resolve_base(base: str, from_adapter: bool = False, adapter_dir: Path | None = None) -> Path:
    """A local folder, or a hub id already in the local Hugging Face cache (never downloads)."""
    from .model.load import _HUB_ID

    where = f" (named by {adapter_dir}/adapter_config.json; pass --base to override)" if from_adapter else ""
    path = Path(base).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise UserError(f"base model {base}{where} is not a folder")
    if _HUB_ID.match(base):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(base, local_files_only=True))
        except Exception:  # noqa: BLE001 - any failure means: not in the cache
            raise UserError(f"base model {base}{where} is neither a local folder nor in the local Hugging Face "
                            "cache; download it first (huggingface-cli download) or pass --base PATH") from None
    raise UserError(f"base model {base}{where} does not exist")


def _check_out(out: Path, protected: dict[str, Path]) -> None:
    o = out.resolve()
    for what, p in protected.items():
        p = p.resolve()
        if o == p or p in o.parents or o in p.parents:
            raise UserError(f"--out {out} would write into (or replace) the {what} folder {p}; choose another folder")


# ---------------------------------------------------------------------------------------------------------------
# Planning: read headers and configs, check every shape, decide what each output tensor is made of


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
    fp32_bytes: int = 0


def plan_merge(adapter_dir: Path, base_dir: Path, dtype: str | None = None) -> MergePlan:
    cfg = read_json(adapter_dir / "adapter_config.json")
    _check_adapter_config(adapter_dir, cfg)
    base_config = _read_base_config(base_dir)
    base = canonical_tensors(Checkpoint(base_dir), "base checkpoint")
    _check_not_quantised(base_dir, base_config, base)

    out_code = dtype_code(dtype) if dtype else _base_dtype(base_config, base)
    plan = MergePlan(base_dir, base_config, _CODE_TO_NAME[out_code])

    adapter_file = adapter_dir / ADAPTER_FILE
    if not adapter_file.is_file():
        other = " (only the pickle adapter_model.bin is there: re-save it as safetensors)" \
            if (adapter_dir / "adapter_model.bin").is_file() else ""
        raise UserError(f"{adapter_dir}: no {ADAPTER_FILE}{other}")
    _, adapter_refs = read_header(adapter_file)
    loras: dict[str, _Lora] = {}
    replace: dict[str, TensorRef] = {}
    leftovers: list[str] = []
    save_modules = cfg.get("modules_to_save") or []
    for ref in adapter_refs:
        if not ref.name.startswith(_PEFT_PREFIX):
            leftovers.append(ref.name)
            continue
        key = ref.name[len(_PEFT_PREFIX):]
        m = _LORA_KEY.match(key) or _DORA_KEY.match(key)
        if m:
            module = hf_canonical(m.group("module"))
            if module is None:
                leftovers.append(ref.name)
                continue
            entry = loras.setdefault(module, _Lora(module))
            slot = "magnitude" if m.re is _DORA_KEY else (
                "bias" if m.group("param") == "bias" else m.group("kind")[-1])
            if slot == "bias" and m.group("kind") == "lora_A":
                leftovers.append(ref.name)
                continue
            if getattr(entry, slot) is not None:
                raise UserError(f"{adapter_file}: two tensors for {module} {slot}: {getattr(entry, slot).name}, "
                                f"{ref.name}")
            setattr(entry, slot, ref)
            continue
        name = hf_canonical(_WRAPPER_INFIX.sub(".", key))
        if name is None or not any(re.search(rf"(^|\.){re.escape(s)}\.", name) for s in save_modules):
            leftovers.append(ref.name)  # a full tensor of no module the adapter trains in full
            continue
        if name in replace:
            raise UserError(f"{adapter_file}: two tensors replace {name}: {replace[name].name}, {ref.name}")
        replace[name] = ref

    extra_file = adapter_dir / EXTRA_FILE
    if extra_file.is_file():
        for ref in read_header(extra_file)[1]:
            name = hf_canonical(ref.name)
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
    if leftovers:
        raise UserError(f"{adapter_dir}: {len(leftovers)} adapter tensor(s) match no tensor of base {base_dir}: "
                        f"{listing(leftovers)}. Is --base the model this adapter was trained on?")
    conflicts = [n for n, ops in per_tensor.items() if len(ops) > 1 and any(k == "replace" for k, _ in ops)]
    if conflicts:
        raise UserError(f"{adapter_dir}: tensors both replaced in full and LoRA-adapted: {listing(conflicts)}")

    alpha, r_default = float(cfg.get("lora_alpha", 8)), cfg.get("r", 8)
    for name, ref in base.items():
        ops = per_tensor.get(name, [])
        code = out_code if ref.dtype in FLOAT_CODES else ref.dtype
        plan.fp32_bytes += ref.numel * 4
        if not ops:
            produce = cast_tensor(ref, code)
        elif ops[0][0] == "replace":
            produce = cast_tensor(ops[0][1], code)
            plan.n_replaced += 1
        else:
            loras_here = [l for _, l in ops]
            scales = [_scaling(cfg, l, alpha, r_default) for l in loras_here]
            kinds = [k for k, _ in ops]
            produce = _merged_producer(name, ref, code, kinds, loras_here, scales)
            plan.n_lora += 1
        plan.tensors.append(OutTensor(hf_saved_name(name), code, ref.shape, produce))
    return plan


def _check_adapter_config(adapter_dir: Path, cfg: dict) -> None:
    where = f"{adapter_dir}/adapter_config.json"
    if cfg.get("peft_type", "LORA") != "LORA":
        raise UserError(f"{where}: peft_type {cfg.get('peft_type')} is not supported (LoRA, rsLoRA, DoRA only)")
    unsupported = {k: cfg.get(k) for k in ("fan_in_fan_out", "target_parameters", "trainable_token_indices",
                                           "layer_replication", "use_qalora", "alora_invocation_tokens")
                   if cfg.get(k)}
    if unsupported:
        raise UserError(f"{where}: unsupported LoRA options for a merge: {unsupported}")
    if cfg.get("use_dora") and cfg.get("lora_bias"):
        raise UserError(f"{where}: DoRA with lora_bias is not a valid PEFT adapter")


def _check_lora(adapter_file: Path, cfg: dict, lora: _Lora, w: TensorRef, bias: TensorRef | None) -> None:
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
    if bool(cfg.get("use_dora")) != (lora.magnitude is not None):
        raise UserError(f"{adapter_file}: {lora.module}: use_dora is {bool(cfg.get('use_dora'))} in "
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


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: the first pattern that matches the end of the module path."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _scaling(cfg: dict, lora: _Lora, alpha: float, r_default: int) -> float:
    r = lora.A.shape[0]
    a = float(_pattern_value(cfg.get("alpha_pattern") or {}, lora.module, alpha))
    if cfg.get("rank_pattern"):
        expect = _pattern_value(cfg["rank_pattern"], lora.module, r_default)
        if expect != r:
            raise UserError(f"{lora.A.name}: rank {r} but adapter_config.json gives {lora.module} rank {expect}")
    return a / math.sqrt(r) if cfg.get("use_rslora") else a / r


def _merged_producer(name: str, ref: TensorRef, code: str, kinds: list[str], loras: list[_Lora],
                     scales: list[float]):
    """Bytes of W with its LoRA deltas folded in, computed in fp32 one row chunk at a time (the adapter's A and B
    for this tensor are read when its turn comes, not before)."""
    ops: list = []

    def broken(what: str) -> UserError:
        return UserError(f"{what} has NaN/inf values: merging it into {name} (base {ref.file.name}: {ref.name}) "
                         "would break the model; nothing written")

    def load(r: TensorRef) -> torch.Tensor:
        t = read_tensor(r).float()
        # A sum is ~20x cheaper than isfinite() and non-finite whenever an element is (or, in theory, on overflow,
        # which the exact check then rules out). PEFT's safe_merge checks the merged weights instead; checking the
        # adapter's tensors covers the same failure (a diverged adapter) without a pass over every base weight.
        if not torch.isfinite(t.sum()) and not torch.isfinite(t).all():
            raise broken(f"{r.file}: tensor {r.name}")
        return t

    def fold(w: torch.Tensor, r0: int, r1: int) -> None:
        if not ops:
            for kind, lora, s in zip(kinds, loras, scales):
                if kind == "lora":
                    m = load(lora.magnitude).reshape(-1) if lora.magnitude is not None else None
                    ops.append((kind, load(lora.A), load(lora.B), m, s))
                else:
                    ops.append((kind, load(lora.bias).reshape(-1), None, None, s))
        for kind, A, B, m, s in ops:
            if kind == "lora_bias":
                w.view(-1).add_(A[r0:r1], alpha=s)
                continue
            w.addmm_(B[r0:r1], A, alpha=s)
            if m is not None:  # DoRA: rescale each output row to its learnt magnitude
                factor = m[r0:r1] / torch.linalg.vector_norm(w, dim=1)
                if not torch.isfinite(factor).all():
                    raise broken(f"the DoRA scale (magnitude / row norm) of rows {r0}..{r1}")
                w.mul_(factor.unsqueeze(1))
        if r1 == (ref.shape[0] if ref.shape else 1):
            ops.clear()  # done with this tensor: let its A/B go

    return row_producer(ref, code, fold)


# ---------------------------------------------------------------------------------------------------------------
# Config, card, check


def _read_base_config(base_dir: Path) -> dict:
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


def _base_dtype(cfg: dict, base: dict[str, TensorRef]) -> str:
    for node in (cfg, cfg.get("text_config") or {}):
        for key in ("dtype", "torch_dtype"):
            value = node.get(key)
            if value in ("bfloat16", "float16", "float32"):
                return dtype_code(value)
    sizes: dict[str, int] = {}
    for r in base.values():
        if r.dtype in ("BF16", "F16", "F32"):
            sizes[r.dtype] = sizes.get(r.dtype, 0) + r.nbytes
    return max(sizes, key=sizes.get) if sizes else "F32"


def _write_config(folder: Path, plan: MergePlan) -> None:
    cfg = json.loads(json.dumps(plan.base_config))
    name = CODE_TO_CONFIG_DTYPE[dtype_code(plan.out_dtype)]

    def clean(node: dict) -> None:
        node.pop("quantization_config", None)
        node.pop("_pre_quantization_dtype", None)
        if "torch_dtype" in node:
            node["torch_dtype"] = name
        if node is cfg or "dtype" in node:
            node["dtype"] = name
        for value in node.values():
            if isinstance(value, dict):
                clean(value)
    clean(cfg)
    cfg.setdefault("architectures", ["LlavaOnevisionForConditionalGeneration"])
    (folder / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _write_card(folder: Path, base: str, adapter_dir: Path, dtype: str) -> None:
    recipe = adapter_dir / "recipe.yaml"
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    lines = [
        "---", "library_name: transformers", f"base_model: {base}", "pipeline_tag: image-text-to-text", "---", "",
        "# Merged LLaVA-OneVision checkpoint (lora-manip)", "",
        f"- base model: `{base}`", f"- adapter: `{adapter_dir}` (LoRA r={cfg.get('r')}, alpha={cfg.get('lora_alpha')}"
        f", rslora={cfg.get('use_rslora')}, dora={cfg.get('use_dora')})",
        f"- fully trained modules folded in: {cfg.get('modules_to_save') or 'none'}"
        + (" + image_newline" if (adapter_dir / EXTRA_FILE).is_file() else ""),
        f"- dtype: {dtype}", "",
        "Load with `LlavaOnevisionForConditionalGeneration.from_pretrained` like the original.", "",
    ]
    if recipe.is_file():
        lines += ["## Training recipe", "", "```yaml", recipe.read_text().rstrip(), "```", ""]
    (folder / "README.md").write_text("\n".join(lines), encoding="utf-8")


def _mem_available() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _verify(tmp: Path, adapter_dir: Path, base_dir: Path, plan: MergePlan, max_bytes: int | None) -> float | None:
    """Reload the merged output and base + adapter (fp32, one after the other) and compare logits on a probe."""
    from transformers import LlavaOnevisionForConditionalGeneration

    from .model.adapters import load_with_adapter
    from .model.processor import load_processor

    avail = _mem_available()
    limit = min(VERIFY_MAX_BYTES if max_bytes is None else max_bytes, avail // 3 if avail else VERIFY_MAX_BYTES)
    if plan.fp32_bytes > limit:
        log.warning("merge check SKIPPED: the model needs %.1f GB in fp32 to load (twice, one after the other) and "
                    "this check runs only up to %.1f GB here (available memory / 3, at most %.0f GB); the merge itself "
                    "checked every shape and tensor. Compare on a larger machine or pass --no-verify to silence this.",
                    plan.fp32_bytes / 1e9, limit / 1e9, VERIFY_MAX_BYTES / 2**30)
        return None
    if not (tmp / "processor_config.json").is_file():
        log.warning("merge check SKIPPED: neither the adapter nor the base has a processor (processor_config.json) "
                    "to build the probe input with")
        return None
    out_dtype = plan.out_dtype
    processor = load_processor(tmp)
    inputs = probe_inputs(processor)
    merged = LlavaOnevisionForConditionalGeneration.from_pretrained(tmp, dtype=torch.float32)
    got = logits_of(merged.eval(), inputs)
    del merged
    gc.collect()
    if "quantization_config" in plan.base_config:
        model = _unquantised_with_adapter(adapter_dir, base_dir, tmp)
    else:
        # sdpa: the check runs on the CPU in fp32, where flash-attention (auto's pick on a GPU box) cannot
        model, _ = load_with_adapter(adapter_dir, str(base_dir), dtype="float32", attn="sdpa")
    reference = logits_of(model, inputs)
    del model
    gc.collect()
    diff = (got - reference).abs().max().item()
    scale = max(reference.abs().max().item(), 1.0)
    log.info("merge check: max |logit diff| = %.3g (relative %.3g, tolerance %.0e)", diff, diff / scale,
             _TOLERANCE[out_dtype])
    if not diff / scale <= _TOLERANCE[out_dtype]:
        raise MergeCheckFailed(f"merged model differs from base + adapter: max |logit diff| {diff:.4g} "
                               f"(relative {diff / scale:.3g} > {_TOLERANCE[out_dtype]:.0e}); nothing written")
    return diff


def _unquantised_with_adapter(adapter_dir: Path, base_dir: Path, config_dir: Path):
    """Base + adapter in fp32 for a base whose config.json asks for quantisation: loaded with the output's config
    (the base's without quantization_config), so the reference is the same unquantised weights the merge used."""
    from peft import PeftModel
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    config = LlavaOnevisionConfig.from_pretrained(config_dir)
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(base_dir, config=config, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, str(adapter_dir))
    load_extras(model, adapter_dir)
    return model.eval()


__all__ = ["merge_adapter", "plan_merge", "resolve_base", "MergeCheckFailed", "probe_inputs", "logits_of"]
