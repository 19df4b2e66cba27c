"""A few GRPO steps at LLaVA-OneVision-0.5B's geometry (issue 16, item 6): peak memory and rollout speed.

Runs `recipes/grpo_1gpu.yaml` as shipped except for what a benchmark must change: the model is the kit's random
`ov-0.5b` checkpoint (0.5B's widths, tiles and 152k vocabulary, one layer per tower; nothing is downloaded), the
data a synthetic gripper-box + choice prompt set, no SFT adapter (a fresh LoRA), and a handful of steps. Prints one
table row per logged step from the run's train_log.jsonl: generated tokens per second during rollouts, peak memory
(allocated CUDA memory on a GPU, peak RSS on a CPU), step time, completion length and reward.

    python benchmarks/grpo_steps.py                         # GPU: QLoRA (bitsandbytes 4-bit), 5 steps
    python benchmarks/grpo_steps.py --method lora --steps 2 --completion 16   # CPU: the same path without 4-bit
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", choices=["qlora", "lora"], default="qlora")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--completion", type=int, default=40, help="max_completion_length (a box answer is ~34)")
    ap.add_argument("--work", default="runs/bench-grpo", help="folder for the model and data (reused when there) and the run (replaced)")
    args = ap.parse_args()

    from lora_manip.data.synth import write_synth_dataset
    from lora_manip.model.load import has_cuda
    from lora_manip.model.tiny import write_tiny_model
    from lora_manip.recipe import load_recipe
    from lora_manip.train.launch import launch_training

    work = Path(args.work)
    model, data, run = work / "ov-0.5b", work / "synth", work / "run"
    if not model.exists():
        write_tiny_model(model, geometry="ov-0.5b", dtype="bfloat16")
    if not (data / "train.json").exists():
        write_synth_dataset(data, n=96, seed=1, tasks=["gripper_bbox", "choice"])
    sets = {"model.path": str(model), "model.adapter": "null", "method": args.method,
            "data.train.0.annotation_path": str(data / "train.json"), "data.train.0.data_path": str(data),
            "data.train.0.sample": "null", "data.train.0.val_fraction": "null", "data.num_workers": "0",
            "grpo.max_completion_length": str(args.completion), "grpo.eval_at_start": "false",
            "train.max_steps": str(args.steps), "train.logging_steps": "1", "train.save_steps": "1000",
            "train.output_dir": str(run), "train.report_to": "[none]"}
    if not has_cuda():  # a plumbing check: one question of 8 answers per step
        sets.update({"train.optimizer": "adamw_torch", "train.gradient_checkpointing": "false",
                     "train.gradient_accumulation_steps": "1"})
    path, overrides = ROOT / "recipes" / "grpo_1gpu.yaml", [f"{k}={v}" for k, v in sets.items()]
    if args.method == "lora":  # the recipe's 4-bit block is refused without qlora: run a copy without it
        import yaml

        raw = yaml.safe_load(path.read_text())
        raw.pop("quantization")
        path = work / "grpo_lora.yaml"
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
    recipe = load_recipe(path, overrides)
    start = time.perf_counter()
    code, message = launch_training(path, overrides, overwrite=True)
    wall = time.perf_counter() - start
    if code:
        raise SystemExit(message)

    rows = [r for r in map(json.loads, (run / "train_log.jsonl").read_text().splitlines()) if "reward" in r]
    print(f"\n{args.method}, ov-0.5b geometry, {'GPU' if has_cuda() else 'CPU'}, "
          f"{recipe.train.per_device_batch_size} completions x {recipe.train.gradient_accumulation_steps} "
          f"accumulation per step, {wall:.0f} s in all")
    print("| step | rollout tokens/s | peak memory GB | step time s | completion length | reward |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['step']} | {r['generation/tokens_per_s']:.1f} | {r['peak_mem_gb']:.2f} | "
              f"{r.get('step_time', float('nan')):.2f} | {r['completions/mean_length']:.1f} | {r['reward']:.3f} |")


if __name__ == "__main__":
    main()
