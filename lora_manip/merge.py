"""`lora-manip merge`: fold a LoRA/QLoRA adapter and the fully trained parts back into a full LLaVA-OneVision
checkpoint that transformers and vLLM load like the original.

The base is always loaded unquantised (a QLoRA adapter is folded into full-precision weights, never into 4-bit
ones), the merge math runs in fp32 (PEFT's merge_and_unload), and the output is written to a temporary folder that
is renamed only after it has been reloaded and checked against base + adapter on a probe input.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from .errors import UserError
from .fsutil import atomic_dir

log = logging.getLogger(__name__)

_OUT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Relative tolerance (max |diff| / max |logit|) of the self-check, per output dtype: fp32 is exact up to rounding,
# 16-bit outputs round every weight once.
_TOLERANCE = {"fp32": 1e-4, "bf16": 3e-2, "fp16": 5e-3}


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


def merge_adapter(adapter_dir: str, base: str | None = None, out: str | None = None, dtype: str | None = None,
                  force: bool = False, verify: bool = True) -> tuple[Path, float | None]:
    from transformers import LlavaOnevisionForConditionalGeneration

    from .model.adapters import adapter_base, is_adapter_dir, load_with_adapter
    from .model.processor import load_processor

    adapter_dir = Path(adapter_dir)
    if not is_adapter_dir(adapter_dir):
        hint = " (it holds a full model: nothing to merge)" if (adapter_dir / "config.json").is_file() else ""
        raise UserError(f"{adapter_dir} is not an adapter folder: no adapter_config.json{hint}")
    base = base or adapter_base(adapter_dir)
    out = Path(out) if out else adapter_dir.with_name(adapter_dir.name + "-merged")
    if out.resolve() in (adapter_dir.resolve(), Path(base).resolve()):
        raise UserError(f"--out {out} would write into the adapter or base folder; choose another folder")
    if out.exists() and not force:
        raise UserError(f"{out} already exists; pass --force to replace it or --out to choose another folder")
    processor = load_processor(adapter_dir if (adapter_dir / "processor_config.json").is_file() else base)

    model, base = load_with_adapter(adapter_dir, base, dtype="float32")
    out_dtype = dtype or _dtype_name(model.config)
    inputs = probe_inputs(processor) if verify else None
    reference = logits_of(model, inputs) if verify else None
    merged = model.merge_and_unload(safe_merge=True)  # safe_merge: fail on NaNs instead of saving them
    merged.to(_OUT_DTYPES[out_dtype])
    merged.config.dtype = _OUT_DTYPES[out_dtype]
    with atomic_dir(out, force=force) as tmp:
        merged.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        _write_card(tmp, base, adapter_dir, out_dtype)
        diff = None
        if verify:
            del merged, model
            reloaded = LlavaOnevisionForConditionalGeneration.from_pretrained(tmp, dtype=torch.float32)
            got = logits_of(reloaded, inputs)
            diff = (got - reference).abs().max().item()
            scale = max(reference.abs().max().item(), 1.0)
            log.info("merge check: max |logit diff| = %.3g (relative %.3g, tolerance %.0e)", diff, diff / scale,
                     _TOLERANCE[out_dtype])
            if not diff / scale <= _TOLERANCE[out_dtype]:
                raise MergeCheckFailed(f"merged model differs from base + adapter: max |logit diff| {diff:.4g} "
                                       f"(relative {diff / scale:.3g} > {_TOLERANCE[out_dtype]:.0e}); nothing written")
    return out, diff


class MergeCheckFailed(UserError):
    exit_code = 1  # the inputs were fine; the result failed its check


def _dtype_name(config) -> str:
    dt = getattr(config, "dtype", None) or getattr(config.text_config, "dtype", None)
    return {torch.bfloat16: "bf16", torch.float16: "fp16", "bfloat16": "bf16", "float16": "fp16"}.get(dt, "fp32")


def _write_card(folder: Path, base: str, adapter_dir: Path, dtype: str) -> None:
    recipe = adapter_dir / "recipe.yaml"
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    lines = [
        "---", "library_name: transformers", f"base_model: {base}", "pipeline_tag: image-text-to-text", "---", "",
        "# Merged LLaVA-OneVision checkpoint (lora-manip)", "",
        f"- base model: `{base}`", f"- adapter: `{adapter_dir}` (LoRA r={cfg.get('r')}, alpha={cfg.get('lora_alpha')}"
        f", rslora={cfg.get('use_rslora')}, dora={cfg.get('use_dora')})",
        f"- fully trained modules folded in: {cfg.get('modules_to_save') or 'none'}", f"- dtype: {dtype}", "",
        "Load with `LlavaOnevisionForConditionalGeneration.from_pretrained` like the original.", "",
    ]
    if recipe.is_file():
        lines += ["## Training recipe", "", "```yaml", recipe.read_text().rstrip(), "```", ""]
    (folder / "README.md").write_text("\n".join(lines), encoding="utf-8")
