"""Peak memory and time of one training step (forward + backward) on a long anyres-like sequence with few
supervised tokens: the stock transformers loss (full-vocabulary logits everywhere) vs the kit's loss (logits only
where a label follows). Each variant runs in its own process so its peak memory is its own.

    python benchmarks/loss_memory.py                 # CPU: Qwen2 hidden 896, 1 layer, vocab 151,936, 7,000 tokens
    python benchmarks/loss_memory.py --seq 2000      # quicker
    python benchmarks/loss_memory.py --device cuda --dtype bfloat16 --shape 7b --layers 2

Memory columns: `peak` is the whole process (CPU: peak RSS; CUDA: max_memory_allocated, weights included);
`step` is the step's own share (peak minus what was held just before the step: model, inputs, runtime).
On CUDA one warm-up step runs first, so kernel selection and allocator growth are not timed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time

SHAPES = {  # Qwen2 language models of LLaVA-OneVision 0.5B and 7B
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_attention_heads=14, num_key_value_heads=2,
                 tie_word_embeddings=True),
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_attention_heads=28, num_key_value_heads=4,
               tie_word_embeddings=False),
}


class RssPeak:
    """Peak resident memory over a window, sampled every millisecond (ru_maxrss cannot be reset, and the model's
    construction peak would hide the step's own)."""

    def __init__(self):
        self.peak, self._stop = self.now(), False
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def now() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    def _run(self):
        while not self._stop:
            self.peak = max(self.peak, self.now())
            time.sleep(0.001)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop = True
        self._thread.join()
        self.peak = max(self.peak, self.now())


def one_step(a) -> dict:
    import resource

    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from lora_manip.train.loss import IGNORE, loss_at_positions, positions_to_keep

    torch.manual_seed(0)
    cuda = a.device == "cuda"
    cfg = Qwen2Config(**SHAPES[a.shape], num_hidden_layers=a.layers, vocab_size=a.vocab,
                      max_position_embeddings=max(a.seq, 4096), attn_implementation="sdpa")
    with torch.device(a.device):
        model = Qwen2ForCausalLM(cfg).to(getattr(torch, a.dtype))
    ids = torch.randint(0, a.vocab, (1, a.seq), device=a.device)
    labels = torch.full_like(ids, IGNORE)
    labels[0, -a.supervised:] = ids[0, -a.supervised:]

    def step():
        model.zero_grad(set_to_none=True)
        if a.variant == "stock":
            loss = model(input_ids=ids, labels=labels).loss
        else:
            keep = positions_to_keep(labels)
            loss = loss_at_positions(model(input_ids=ids, logits_to_keep=keep).logits, labels, keep)
        loss.backward()
        return loss

    if cuda:
        step()
        torch.cuda.synchronize()
        model.zero_grad(set_to_none=True)
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        start = time.perf_counter()
        loss = step()
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated()
    else:
        before = RssPeak.now()
        with RssPeak() as rss:
            start = time.perf_counter()
            loss = step()
            seconds = time.perf_counter() - start
        peak = max(rss.peak, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    grad = model.model.embed_tokens.weight.grad
    return {"variant": a.variant, "seconds": seconds, "peak_gb": peak / 2**30, "step_gb": (peak - before) / 2**30,
            "loss": loss.item(), "grad_sum": float(grad.double().abs().sum())}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, default=7000)
    ap.add_argument("--supervised", type=int, default=50)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="0.5b")
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.variant:
        print(json.dumps(one_step(a)))
        return
    rows = []
    for variant in ("stock", "kit"):
        out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--variant", variant],
                             capture_output=True, text=True)
        if out.returncode:
            sys.exit(f"{variant} failed:\n{out.stderr[-3000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    stock, kit = rows
    mem = "max allocated" if a.device == "cuda" else "RSS"
    print(f"one forward+backward on {a.device} ({a.dtype}), Qwen2-{a.shape} shapes, {a.layers} layer(s), "
          f"vocab {a.vocab:,}, {a.seq:,} tokens, {a.supervised} supervised")
    print(f"{'variant':<8}{'time s':>10}{'peak ' + mem + ' GB':>22}{'step GB':>10}{'loss':>12}")
    for r in rows:
        print(f"{r['variant']:<8}{r['seconds']:>10.3f}{r['peak_gb']:>22.2f}{r['step_gb']:>10.2f}{r['loss']:>12.5f}")
    tol = 1e-4 if a.dtype == "float32" else 2e-2
    print(f"ratio stock/kit: time {stock['seconds'] / kit['seconds']:.1f}x, peak {mem} "
          f"{stock['peak_gb'] / kit['peak_gb']:.1f}x, step's own memory {stock['step_gb'] / kit['step_gb']:.1f}x; "
          f"loss equal: {abs(stock['loss'] - kit['loss']) < tol}, "
          f"embedding-gradient sums {stock['grad_sum']:.6g} vs {kit['grad_sum']:.6g}")


if __name__ == "__main__":
    main()
