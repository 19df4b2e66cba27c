"""The merge's self-check: reload the merged folder and the model the adapter was trained on plus the adapter, one
after the other in fp32 on the CPU, and compare their logits on a probe image + question.

The reference is what the merge claims to reproduce: the unquantised base + adapter by default, the 4-bit base
(loaded with the recipe's quantisation settings) + adapter with `--base-as-trained`.
"""

from __future__ import annotations

import gc
import logging
from pathlib import Path

import torch

from ..errors import UserError
from ..recipe import DataCfg

log = logging.getLogger(__name__)

# Relative tolerance (max |diff| / max |logit|) per output dtype: fp32 is exact up to rounding, 16-bit outputs round
# every weight once.
TOLERANCE = {"fp32": 1e-4, "bf16": 3e-2, "fp16": 5e-3}
# Both models are loaded one after the other in fp32: skip the check above this size.
VERIFY_MAX_BYTES = 8 * 2**30
PROBE_SYSTEM_PROMPT = DataCfg.model_fields["system_prompt"].default  # what training adds when a record has none
PROBE_QUESTION = "<image>\nWhere is the red cube?"


class MergeCheckFailed(UserError):
    exit_code = 1  # the inputs were fine; the result failed its check


def probe_inputs(processor):
    """A fixed image + question through the real processor and the checkpoint's own chat template (in the message
    form it needs), so the check exercises vision tower, projector, image_newline (anyres) and LM. A probe whose
    prompt lost its image would compare two text-only runs and pass whatever the vision weights are: an error."""
    from PIL import Image, ImageDraw

    from ..data.encode import Chat, prompt_text
    from ..data.processor import image_token_counts

    img = Image.new("RGB", (320, 180), (120, 90, 60))
    ImageDraw.Draw(img).rectangle([100, 60, 180, 130], fill=(220, 30, 30))
    text = prompt_text(Chat(processor, PROBE_SYSTEM_PROMPT), [{"role": "user", "content": PROBE_QUESTION}])
    where = getattr(processor.tokenizer, "name_or_path", "") or "the checkpoint"
    if text.count(processor.image_token) != 1 or "red cube" not in text:
        raise UserError(f"the chat template of {where} rendered the probe question with "
                        f"{text.count(processor.image_token)} {processor.image_token} placeholder(s) and "
                        f"{'its' if 'red cube' in text else 'without its'} text; the self-check needs one image")
    inputs = processor(images=[img], text=[text], return_tensors="pt")
    got = int((inputs["input_ids"] == processor.image_token_id).sum())
    want = sum(image_token_counts(processor, [img.size]))
    if got == 0 or got != want:
        raise UserError(f"the probe input of {where} holds {got} image tokens, expected {want}: the processor's "
                        "files disagree with each other")
    return inputs


@torch.no_grad()
def logits_of(model, inputs) -> torch.Tensor:
    return model(**inputs).logits.float()


def _mem_available() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def verify(tmp: Path, adapter_dir: Path, base_dir: Path, plan, max_bytes: int | None) -> float | None:
    """Max |logit diff| between the merged folder `tmp` and base + adapter, or None when the check cannot run here;
    MergeCheckFailed over tolerance."""
    from transformers import LlavaOnevisionForConditionalGeneration

    from ..data.processor import load_processor

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
    inputs = probe_inputs(load_processor(tmp))
    merged = LlavaOnevisionForConditionalGeneration.from_pretrained(tmp, dtype=torch.float32)
    got = logits_of(merged.eval(), inputs)
    del merged
    gc.collect()
    model = reference_model(adapter_dir, base_dir, tmp, plan.quant)
    reference = logits_of(model, inputs)
    del model
    gc.collect()
    diff = (got - reference).abs().max().item()
    scale = max(reference.abs().max().item(), 1.0)
    tol = TOLERANCE[plan.out_dtype]
    against = "the 4-bit base + adapter" if plan.quant is not None else "base + adapter"
    log.info("merge check against %s: max |logit diff| = %.3g (relative %.3g, tolerance %.0e)", against, diff,
             diff / scale, tol)
    if not diff / scale <= tol:
        raise MergeCheckFailed(f"merged model differs from {against}: max |logit diff| {diff:.4g} (relative "
                               f"{diff / scale:.3g} > {tol:.0e}); nothing written")
    return diff


def reference_model(adapter_dir: Path, base_dir: Path, config_dir: Path, quant=None):
    """Base + adapter (+ extra trainables) in fp32 on the CPU. The config is the merged output's (the base's without
    any quantization_config), so a base whose config.json asks for quantisation is read unquantised, as the merge
    read it; with `quant` the base is quantised the way QLoRA training quantised it."""
    from peft import PeftModel
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    from ..model.adapters import load_extras

    kwargs = {}
    if quant is not None:
        from transformers import BitsAndBytesConfig

        from ..model.load import NEVER_QUANTISED

        kwargs = dict(device_map={"": "cpu"}, quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=quant.quant_type, bnb_4bit_use_double_quant=quant.double_quant,
            bnb_4bit_compute_dtype=torch.float32, llm_int8_skip_modules=NEVER_QUANTISED))
    config = LlavaOnevisionConfig.from_pretrained(config_dir)
    # sdpa: the check runs on the CPU in fp32, where flash-attention (auto's pick on a GPU box) cannot
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(
        base_dir, config=config, dtype=torch.float32, attn_implementation="sdpa", **kwargs)
    try:
        model = PeftModel.from_pretrained(model, str(adapter_dir))
    except (RuntimeError, ValueError) as e:
        raise UserError(f"adapter {adapter_dir} does not fit base {base_dir}: {str(e).splitlines()[0]}") from None
    load_extras(model, adapter_dir)
    return model.eval()
