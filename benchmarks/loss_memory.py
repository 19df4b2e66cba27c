"""Peak memory and time of one training step (forward + backward) on a long anyres-like sequence with few
supervised tokens: the stock transformers loss (full-vocabulary logits everywhere) vs the kit's loss (logits only
where a label follows). Each variant runs in its own process so peak RSS is its own.

    python benchmarks/loss_memory.py                 # Qwen2 hidden 896, 1 layer, vocab 151,936, 7,000 tokens
    python benchmarks/loss_memory.py --seq 2000      # quicker
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def one_step(variant: str, seq: int, supervised: int, vocab: int) -> dict:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from lora_manip.train.loss import IGNORE, loss_at_positions, positions_to_keep

    torch.manual_seed(0)
    cfg = Qwen2Config(hidden_size=896, intermediate_size=4864, num_hidden_layers=1, num_attention_heads=14,
                      num_key_value_heads=2, vocab_size=vocab, tie_word_embeddings=True,
                      max_position_embeddings=max(seq, 4096))
    model = Qwen2ForCausalLM(cfg)
    ids = torch.randint(0, vocab, (1, seq))
    labels = torch.full_like(ids, IGNORE)
    labels[0, -supervised:] = ids[0, -supervised:]
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    if variant == "stock":
        loss = model(input_ids=ids, labels=labels).loss
    else:
        keep = positions_to_keep(labels)
        loss = loss_at_positions(model(input_ids=ids, logits_to_keep=keep).logits, labels, keep)
    loss.backward()
    seconds = time.perf_counter() - start
    grad = model.model.embed_tokens.weight.grad
    return {"variant": variant, "seconds": seconds, "peak_rss_gb": resource.getrusage(
        resource.RUSAGE_SELF).ru_maxrss / 2**20, "model_rss_gb": base_rss / 2**20, "loss": loss.item(),
        "grad_sum": float(grad.double().abs().sum())}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, default=7000)
    ap.add_argument("--supervised", type=int, default=50)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--variant")
    a = ap.parse_args()
    if a.variant:
        print(json.dumps(one_step(a.variant, a.seq, a.supervised, a.vocab)))
        return
    rows = []
    for variant in ("stock", "kit"):
        out = subprocess.run([sys.executable, __file__, "--variant", variant, "--seq", str(a.seq), "--supervised",
                              str(a.supervised), "--vocab", str(a.vocab)], capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    stock, kit = rows
    print(f"one forward+backward, Qwen2 hidden 896, 1 layer, vocab {a.vocab:,}, {a.seq:,} tokens, "
          f"{a.supervised} supervised")
    print(f"{'variant':<8}{'time s':>10}{'peak RSS GB':>14}{'loss':>12}")
    for r in rows:
        print(f"{r['variant']:<8}{r['seconds']:>10.2f}{r['peak_rss_gb']:>14.2f}{r['loss']:>12.5f}")
    print(f"ratio stock/kit: time {stock['seconds'] / kit['seconds']:.1f}x, peak RSS "
          f"{stock['peak_rss_gb'] / kit['peak_rss_gb']:.1f}x; loss equal: {abs(stock['loss'] - kit['loss']) < 1e-4}, "
          f"embedding-gradient sums {stock['grad_sum']:.6g} vs {kit['grad_sum']:.6g}")


if __name__ == "__main__":
    main()
