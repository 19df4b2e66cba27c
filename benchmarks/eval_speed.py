"""Generation speed of `lora-manip eval`: records/s one at a time vs batched (grouped by length, left padding).

    python benchmarks/eval_speed.py                       # tiny random LLaVA-OneVision, synthetic records, CPU
    python benchmarks/eval_speed.py --n 64 --batch-sizes 1,8,32 --max-new-tokens 48
    python benchmarks/eval_speed.py --model /models/llava-ov-7b-merged --data val.json --n 200   # a real one

The model is loaded once; each row times generation only (prompt building, image loading, batching, generate,
decoding) after one warm-up batch. Batch sizes are timed in turn, `--repeats` rounds, and each row shows its best
round: on a machine shared with other jobs the best round is the one least disturbed by them. "same" says whether the answers equal the one-at-a-time answers (greedy: they
should, up to ties broken differently by padded matrix shapes).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="checkpoint folder (default: write the tiny random model)")
    ap.add_argument("--data", help="annotation file (default: synthetic records)")
    ap.add_argument("--n", type=int, default=48, help="records to generate for")
    ap.add_argument("--batch-sizes", default="1,4,8,16")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3, help="rounds over all batch sizes; the best is shown")
    args = ap.parse_args()

    import torch

    from lora_manip.data.records import load_samples
    from lora_manip.data.encode import Chat
    from lora_manip.eval.generate import load_for_inference, predict_samples

    tmp = Path(tempfile.mkdtemp(prefix="eval_speed."))
    model_path = args.model
    if model_path is None:
        from lora_manip.model.tiny import write_tiny_model

        model_path = str(write_tiny_model(tmp / "tiny"))
    data = args.data
    if data is None:
        from lora_manip.data.synth import write_synth_dataset

        write_synth_dataset(tmp / "synth", n=max(2 * args.n, 40), seed=0, val_fraction=0.5)
        data = str(tmp / "synth" / "val.json")
    samples, problems = load_samples(data, Path(data).parent)
    if problems:
        sys.exit(f"{len(problems)} bad records in {data}, first: {problems[0]}")
    samples = samples[: args.n]
    model, processor = load_for_inference(model_path)
    device = "cuda: " + torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    predict_samples(model, Chat(processor, "You are a helpful assistant."), samples[:4], 4, args.max_new_tokens, False)

    sizes = [int(b) for b in args.batch_sizes.split(",")]
    best: dict[int, float] = {}
    answers_of: dict[int, list[str]] = {}
    for _ in range(args.repeats):
        for bs in sizes:
            t0 = time.perf_counter()
            answers_of[bs] = predict_samples(model, Chat(processor, "You are a helpful assistant."), samples, bs,
                                             args.max_new_tokens, progress=False)
            best[bs] = min(best.get(bs, float("inf")), time.perf_counter() - t0)
    reference = answers_of[sizes[0]]
    rows = [(bs, len(samples), best[bs], len(samples) / best[bs], sum(a == b for a, b in zip(answers_of[bs], reference)))
            for bs in sizes]
    base = rows[0][3]
    print(f"\nmodel: {model_path}\ndevice: {device}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"{len(samples)} records, max_new_tokens {args.max_new_tokens}, greedy, best of {args.repeats} rounds\n")
    print(f"{'batch size':>10}  {'seconds':>8}  {'records/s':>9}  {'speed-up':>8}  {'same answers':>12}")
    for bs, n, dt, rate, same in rows:
        print(f"{bs:>10}  {dt:>8.2f}  {rate:>9.2f}  {rate / base:>7.2f}x  {same:>6}/{n}")


if __name__ == "__main__":
    main()
