"""Tokens/s and per-step peak memory of four ways to batch a RoboInter-like mixture, in one run.

Model: a random LLaVA-OneVision with LLaVA-OneVision-0.5B's real geometry (SigLIP 1152 wide at 384-px tiles,
pinpoints up to 2304, anyres_max_9; Qwen2 896 wide, the real vocabulary) and `--layers` layers per tower; LoRA on
the LM, projector trained in full, as the 1-GPU recipes do. Data: 640x480 (RH20T) and 320x180 (DROID) frames,
5% very large (1280x720), 10% text-only, answers of 1 to 60 tokens.

Modes, each over the same samples for `--epochs`:
- fixed-worst: a fixed number of samples per batch, chosen so the costliest possible batch fits the budget (what
  a recipe must do without token budgets), random order;
- grouped: the same batch size, length-grouped (the kit's default sampler);
- budget: micro-batches filled up to `--budget` tokens (train.max_tokens_per_batch);
- packed: the same budget, samples packed into one row (data.packing).
Per step: real tokens / second, and the step's memory (CPU: the bytes autograd saves for the backward pass, i.e.
the activations, since RSS hides behind the allocator's cache; GPU: max allocated above the step's start).
"spread" is the largest step's memory over the median step's: how far a step's memory swings above the usual.
On a GPU the model computes in bf16 (autocast over fp32 trained weights, as training does) with flash-attention 2
when it is installed, and MFU is printed: the FLOPs the step needs for its real tokens (`step_flops`: padding and
masked-out attention count for nothing) over the time taken, as a share of `--peak-tflops` (989: an H100 / H200's
dense bf16).

    python benchmarks/throughput.py                       # CPU, 1 layer per tower
    python benchmarks/throughput.py --device cuda --layers 4 --budget 16384
    python benchmarks/throughput.py --device cuda --geometry 7b --layers 2 --budget 16384
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class SavedBytes:
    """Bytes autograd keeps for the backward pass during a step (each storage counted once): the activation
    memory, which is what the batch composition changes. Unlike RSS it does not hide behind the allocator's cache
    (freed memory stays in the process), so steps compare fairly on a CPU."""

    def __enter__(self):
        self.total, self._seen = 0, set()

        def pack(t):
            key = (t.untyped_storage().data_ptr(), t.device)
            if key not in self._seen:
                self._seen.add(key)
                self.total += t.untyped_storage().nbytes()
            return t

        self._ctx = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)


def step_flops(lengths, tiles, cfg, tile_tokens: int) -> float:
    """FLOPs one training step needs for these samples (LoRA on the LM, projector trained, vision tower frozen):
    LM matmuls 2N forward + 2N backward (activation gradients; the LoRA weights' own are negligible) per token, N
    its non-embedding weights (logits are only computed at the few labelled positions); causal attention
    2 x hidden x T^2 per layer forward, twice that backward; the frozen vision tower forward only (nothing before it
    trains): 2N per patch token and 4 x hidden x 729^2 per layer and tile. Per sample, so padding counts nothing."""
    t, v = cfg.text_config, cfg.vision_config
    kv = t.hidden_size * t.num_key_value_heads // t.num_attention_heads
    lm_n = t.num_hidden_layers * (2 * t.hidden_size ** 2 + 2 * t.hidden_size * kv + 3 * t.hidden_size *
                                  t.intermediate_size)
    vt_n = v.num_hidden_layers * (4 * v.hidden_size ** 2 + 2 * v.hidden_size * v.intermediate_size)
    total = 0.0
    for n, k in zip(lengths, tiles):
        total += 4 * lm_n * n + 6 * t.num_hidden_layers * t.hidden_size * n * n
        total += k * (2 * vt_n * tile_tokens + 4 * v.num_hidden_layers * v.hidden_size * tile_tokens ** 2)
    return total


def make_data(root: Path, n: int, seed: int) -> Path:
    from PIL import Image

    rng = random.Random(seed)
    (root / "img").mkdir(parents=True)
    words = "pick the red cube and place it on the blue plate then move left".split()
    records = []
    for i in range(n):
        r = rng.random()
        size = None if r < 0.10 else (1280, 720) if r < 0.15 else (640, 480) if r < 0.575 else (320, 180)
        answer = " ".join(rng.choice(words) for _ in range(rng.randint(1, 60)))
        rec = {"id": f"s{i}", "conversations": [
            {"from": "human", "value": ("<image>\n" if size else "") + "What should the robot do next?"},
            {"from": "gpt", "value": answer}]}
        if size:
            Image.new("RGB", size, (rng.randrange(256), 90, 160)).save(root / "img" / f"{i}.png")
            rec["images"] = [f"img/{i}.png"]
        records.append(rec)
    (root / "train.json").write_text(json.dumps(records))
    return root / "train.json"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--n", type=int, default=60)
    ap.add_argument("--budget", type=int, default=12288)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--geometry", choices=("0.5b", "7b"), default="0.5b", help="LLaVA-OneVision widths to use")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="the device's dense bf16 peak, for MFU")
    args = ap.parse_args()

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA GPU here")
    from transformers import LlavaOnevisionForConditionalGeneration

    from lora_manip.data.collate import Collator
    from lora_manip.data.dataset import ManipDataset
    from lora_manip.data.encode import Chat
    from lora_manip.data.records import load_samples
    from lora_manip.data.sampler import GroupedSampler, TokenBudgetBatchSampler, batch_cost, random_batches
    from lora_manip.model.adapters import prepare_trainable
    from lora_manip.data.processor import load_processor
    from lora_manip.model.tiny import GEOMETRIES, write_tiny_model
    from lora_manip.recipe import recipe_from_dict
    from lora_manip.train.loss import loss_at_positions, positions_to_keep

    import importlib.util

    if args.geometry == "7b":  # LLaVA-OneVision-7B's widths (SigLIP is the same so400m tower)
        GEOMETRIES["ov-0.5b"]["text"].update(hidden_size=3584, intermediate_size=18944, num_attention_heads=28,
                                             num_key_value_heads=4, vocab_size=152128, tie_word_embeddings=False)
    GEOMETRIES["ov-0.5b"]["vision"]["num_hidden_layers"] = args.layers
    GEOMETRIES["ov-0.5b"]["text"]["num_hidden_layers"] = args.layers
    gpu = args.device == "cuda"
    attn = "flash_attention_2" if gpu and importlib.util.find_spec("flash_attn") else "sdpa"
    tmp = Path(tempfile.mkdtemp())
    base = write_tiny_model(tmp / "model", geometry="ov-0.5b", dtype="bfloat16" if gpu else "float32")
    ann = make_data(tmp / "data", args.n, args.seed)
    processor = load_processor(base)
    samples, problems = load_samples(ann, tmp / "data")
    assert not problems
    ds = ManipDataset(samples, Chat(processor, "You are a helpful assistant."), max_length=32768)
    tile_tokens = processor.num_image_tokens
    lengths, tiles = ds.lengths.astype(np.int64), ds.tiles.astype(np.int64)

    worst = max(batch_cost(lengths[[i]], tiles[[i]], tile_tokens, False) for i in range(len(ds)))
    fixed = max(1, args.budget // worst)  # samples per batch so that even the costliest batch fits the budget
    modes = {
        "fixed-worst": random_batches(len(ds), fixed, args.seed),
        "grouped": GroupedSampler(lengths, ds.has_images, fixed, args.seed).batches(0),
        "budget": TokenBudgetBatchSampler(lengths, ds.has_images, tiles, args.budget, tile_tokens,
                                          args.seed).batches(0),
        "packed": TokenBudgetBatchSampler(lengths, ds.has_images, tiles, args.budget, tile_tokens, args.seed,
                                          packing=True).batches(0),
    }
    recipe = recipe_from_dict({"model": {"path": str(base)}, "method": "lora",
                               "data": {"train": [{"annotation_path": str(ann), "data_path": str(tmp / "data")}]},
                               "train": {"output_dir": str(tmp / "out")}})
    torch.manual_seed(0)
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(base, attn_implementation=attn)
    model.config.use_cache = False
    model = prepare_trainable(model, recipe).to(args.device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    items = [ds[i] for i in range(len(ds))]
    print(f"{len(ds)} samples; tokens per sample {lengths.min()}..{lengths.max()} (median {int(np.median(lengths))});"
          f" tiles {tiles.min()}..{tiles.max()}; budget {args.budget}; fixed batch {fixed} (worst sample costs "
          f"{worst}); attention {attn}, {'bf16 autocast' if gpu else 'fp32'}")

    def step(batch_idx, packing):
        batch = Collator(processor, packing=packing)([items[i] for i in batch_idx])
        batch = {k: v.to(args.device) if torch.is_tensor(v) else v for k, v in batch.items()}
        labels = batch.pop("labels")
        keep = positions_to_keep(labels)
        if gpu and "pixel_values" in batch:
            batch["pixel_values"] = batch["pixel_values"].to(torch.bfloat16)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=gpu):
            out = model(**batch, logits_to_keep=keep)
            loss = loss_at_positions(out.logits, labels, keep)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return int(lengths[batch_idx].sum())

    step(modes["grouped"][0], False)  # warm-up
    rows = []
    flops = step_flops(lengths, tiles, model.config, tile_tokens) * args.epochs  # the same samples in every mode
    for name, batches in modes.items():
        tokens, seconds, peaks = 0, 0.0, []
        for _ in range(args.epochs):
            for b in batches:
                if args.device == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    held = torch.cuda.memory_allocated()
                t0 = time.perf_counter()
                with SavedBytes() as mem:
                    tokens += step(b, name == "packed")
                    if args.device == "cuda":
                        torch.cuda.synchronize()
                seconds += time.perf_counter() - t0
                peaks.append((torch.cuda.max_memory_allocated() - held) if args.device == "cuda" else mem.total)
        mfu = flops / seconds / (args.peak_tflops * 1e12)
        rows.append((name, len(batches), tokens / seconds, max(peaks), float(np.median(peaks)), mfu))
        print(f"  {name}: {len(batches)} steps, {tokens / seconds:.0f} tokens/s, MFU {100 * mfu:.1f}%", flush=True)
    print(f"{'mode':<13}{'steps':>6}{'tokens/s':>10}{'max step MB':>13}{'median MB':>13}{'spread':>8}"
          f"{'vs fixed':>10}{'MFU':>8}")
    base_tps = rows[0][2]
    for name, steps, tps, peak, med, mfu in rows:
        print(f"{name:<13}{steps:>6}{tps:>10.0f}{peak / 2**20:>13.0f}{med / 2**20:>13.0f}"
              f"{peak / max(med, 1):>8.2f}{tps / base_tps:>9.2f}x{100 * mfu:>7.1f}%")
    best = max(rows, key=lambda r: r[2])
    print(f"RESULT throughput: {best[0]} {best[2]:,.0f} tokens/s, MFU {100 * best[5]:.1f}% of {args.peak_tflops:g} "
          f"TFLOP/s ({args.geometry} widths, {args.layers} layers, {attn}); fixed-worst {rows[0][2]:,.0f} tokens/s")


if __name__ == "__main__":
    main()
