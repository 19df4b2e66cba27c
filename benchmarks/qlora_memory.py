"""Weight memory of a QLoRA model after the kit's setup vs after PEFT's prepare_model_for_kbit_training.

Both start from the same 4-bit load (NF4, double quantisation, bf16 compute; vision tower, projector and lm_head
never quantised) of a random LLaVA-OneVision with LLaVA-OneVision-0.5B's widths and vocabulary (one layer per
tower; `--layers` for more) and attach the same LoRA. Printed: bytes held by parameters per dtype (exact), and the
process's RSS growth during setup. Run on CPU (bitsandbytes' 4-bit works there); on a GPU add `--device cuda` for
allocated memory instead of RSS.

    python benchmarks/qlora_memory.py
"""

from __future__ import annotations

import argparse
import gc
import resource
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def param_bytes(model) -> dict[str, float]:
    out: dict[str, float] = {}
    seen = set()
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        key = str(p.dtype).replace("torch.", "")
        out[key] = out.get(key, 0) + p.numel() * p.element_size() / 2**20
    return out


def setup(folder: Path, kit: bool, device: str):
    from peft import prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig, LlavaOnevisionForConditionalGeneration

    from lora_manip.model.adapters import prepare_trainable
    from lora_manip.model.load import NEVER_QUANTISED
    from lora_manip.recipe import recipe_from_dict

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.bfloat16, llm_int8_skip_modules=NEVER_QUANTISED)
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(
        folder, dtype=torch.bfloat16, quantization_config=q, device_map={"": device})
    loaded = param_bytes(model)
    before = torch.cuda.memory_allocated() / 2**20 if device == "cuda" else rss_mb()
    if not kit:  # what the kit did before: PEFT's preparation first
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    recipe = recipe_from_dict({"model": {"path": str(folder)}, "method": "qlora",
                               "data": {"train": [{"annotation_path": "x.json", "data_path": "."}]},
                               "train": {"output_dir": "unused"}})
    model = prepare_trainable(model, recipe)
    after = torch.cuda.memory_allocated() / 2**20 if device == "cuda" else rss_mb()
    return loaded, param_bytes(model), after - before


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    from lora_manip.model.tiny import write_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        folder = write_tiny_model(Path(tmp) / "ov05", geometry="ov-0.5b", dtype="bfloat16")
        rows = []
        for name, kit in (("PEFT prepare_model_for_kbit_training", False), ("kit (trained weights only)", True)):
            gc.collect()
            loaded, after, grew = setup(folder, kit, args.device)
            rows.append((name, after, grew))
            gc.collect()
    print("LLaVA-OneVision-0.5B widths (1 layer per tower), 4-bit NF4 + double quant, LoRA r=64 on the LM")
    print(f"{'setup':<40}{'bf16 MiB':>10}{'fp32 MiB':>10}{'uint8 MiB':>10}{'growth MiB':>12}")
    for name, b, grew in rows:
        print(f"{name:<40}{b.get('bfloat16', 0):>10.1f}{b.get('float32', 0):>10.1f}{b.get('uint8', 0):>10.1f}"
              f"{grew:>12.1f}")
    (_, peft, _), (_, kit, _) = rows
    saved = sum(peft.values()) - sum(kit.values())
    print(f"parameter memory saved by the kit: {saved:.1f} MiB "
          f"({sum(peft.values()) / sum(kit.values()):.2f}x less)")


if __name__ == "__main__":
    main()
