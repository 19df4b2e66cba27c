"""Streaming merge vs PEFT's merge_and_unload on a LLaVA-OneVision-7B-shaped checkpoint.

Builds, in a temporary folder, a random bf16 checkpoint with the real LLaVA-OV-7B tensor shapes (Qwen2 hidden 3584,
28 heads / 4 KV heads, MLP 18944, vocab 152128, untied lm_head; SigLIP-so400m hidden 1152, MLP 4304, 26 layers,
patch 14, 384 px; projector 1152 -> 3584 -> 3584), sharded like the hub checkpoint (5 GB shards), and a rank-64
LoRA adapter on every linear layer of the LM (q/k/v/o/gate/up/down) with a fully trained projector and
image_newline, as `lora-manip train` saves it. Then it measures, each in its own fresh interpreter (wall time, and
peak RSS as the child's own VmHWM):

1. copying the checkpoint's bytes (shutil.copytree, an in-kernel copy): the floor any merge has to pay;
2. the streaming merge (`lora_manip.checkpoints.merge.merge_adapter`, --no-verify);
3. PEFT's path: from_pretrained (bf16) + PeftModel.from_pretrained + merge_and_unload + save_pretrained. It holds
   the whole model in memory (~16 GB at 28 layers, more while saving), so it runs only up to --peft-max-layers.

--layers sets the number of Qwen2 layers (28 = the real 7B, ~16 GB; the default 4 builds ~4.9 GB and runs in a few
minutes on 2 cores). Nothing is kept unless --keep.

    python benchmarks/merge_7b.py                 # 4 LM layers, all three stages
    python benchmarks/merge_7b.py --layers 28     # the full 7B shapes (~16 GB of disk per copy); PEFT skipped
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Real LLaVA-OneVision-qwen2-7b-ov-hf shapes.
TEXT = dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_attention_heads=28,
            num_key_value_heads=4, vocab_size=152128, max_position_embeddings=32768, rms_norm_eps=1e-6,
            rope_theta=1000000.0, tie_word_embeddings=False, hidden_act="silu")
VISION = dict(model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304, num_attention_heads=16,
              num_hidden_layers=26, image_size=384, patch_size=14, vision_use_head=False)
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def build_config(layers: int):
    from transformers import LlavaOnevisionConfig

    pinpoints = [[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)]
    return LlavaOnevisionConfig(
        text_config={**TEXT, "num_hidden_layers": layers}, vision_config=VISION, image_token_index=151646,
        video_token_index=151647, vision_feature_select_strategy="full", vision_feature_layer=-1,
        vision_aspect_ratio="anyres_max_9", image_grid_pinpoints=pinpoints, tie_word_embeddings=False,
        dtype="bfloat16")


def _random_producer(shape, dtype, seed: int, std: float = 0.02):
    import torch

    from lora_manip.checkpoints.shards import CHUNK_BYTES

    def produce(sink):
        g = torch.Generator().manual_seed(seed)
        if not shape:
            sink.write(torch.randn((), generator=g).to(dtype))
            return
        per_row = max(1, math.prod(shape[1:]) * 4)
        step = max(1, CHUNK_BYTES // per_row)
        for r0 in range(0, shape[0], step):
            rows = torch.randn((min(step, shape[0] - r0), *shape[1:]), generator=g).mul_(std)
            sink.write(rows.to(dtype))
    return produce


def build_base(folder: Path, layers: int, shard: str) -> dict:
    import torch
    from transformers import LlavaOnevisionForConditionalGeneration

    from lora_manip.checkpoints.shards import OutTensor, parse_size, write_checkpoint
    from lora_manip.dtypes import TORCH_TO_CODE
    from lora_manip.model.layouts import hub_name

    config = build_config(layers)
    with torch.device("meta"):
        model = LlavaOnevisionForConditionalGeneration(config)
    shapes = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    folder.mkdir(parents=True)
    tensors = [OutTensor(hub_name(n), TORCH_TO_CODE[torch.bfloat16], s,
                         _random_producer(s, torch.bfloat16, seed=i)) for i, (n, s) in enumerate(shapes.items())]
    write_checkpoint(folder, tensors, parse_size(shard))
    config.save_pretrained(folder)
    return {n: s for n, s in shapes.items()}


def build_adapter(folder: Path, base: Path, shapes: dict, rank: int) -> int:
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(1234)
    tensors = {}
    for name, shape in shapes.items():
        module = name[: -len(".weight")] if name.endswith(".weight") else None
        if module and module.startswith("model.language_model.") and module.rsplit(".", 1)[-1] in LORA_TARGETS:
            out_f, in_f = shape
            tensors[f"base_model.model.{module}.lora_A.weight"] = torch.randn(rank, in_f, generator=g) / math.sqrt(in_f)
            tensors[f"base_model.model.{module}.lora_B.weight"] = torch.randn(out_f, rank, generator=g) * 1e-3
        elif name.startswith("model.multi_modal_projector."):
            tensors[f"base_model.model.{name}"] = torch.randn(shape, generator=g) * 0.02
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    save_file({"model.image_newline": torch.randn(shapes["model.image_newline"], generator=g)},
              str(folder / "extra_trainables.safetensors"))
    targets = "|".join(LORA_TARGETS)
    cfg = {"peft_type": "LORA", "task_type": None, "base_model_name_or_path": str(base), "r": rank,
           "lora_alpha": 2 * rank, "lora_dropout": 0.0, "bias": "none", "use_rslora": False, "use_dora": False,
           "target_modules": rf"^(model\.language_model)\..*\.({targets})$",
           "modules_to_save": ["multi_modal_projector"],
           "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True}
    (folder / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    return sum(t.numel() * t.element_size() for t in tensors.values())


STAGES = {
    "copy": (
        "import json, shutil, sys, time\n"
        "t = time.perf_counter()\n"
        "shutil.copytree(sys.argv[1], sys.argv[2])\n"
        "print(json.dumps({'inner_s': time.perf_counter() - t}))\n"),
    "stream": (
        "import json, sys, time\n"
        "t = time.perf_counter()\n"
        "from lora_manip.checkpoints.merge import merge_adapter\n"
        "merge_adapter(sys.argv[1], out=sys.argv[2], verify=False)\n"
        "print(json.dumps({'inner_s': time.perf_counter() - t}))\n"),
    "peft": (
        "import json, sys, time\n"
        "t = time.perf_counter()\n"
        "import torch\n"
        "from pathlib import Path\n"
        "from peft import PeftModel\n"
        "from safetensors.torch import load_file\n"
        "from transformers import LlavaOnevisionForConditionalGeneration as M\n"
        "adapter, out = Path(sys.argv[1]), sys.argv[2]\n"
        "base = json.loads((adapter / 'adapter_config.json').read_text())['base_model_name_or_path']\n"
        "model = PeftModel.from_pretrained(M.from_pretrained(base, dtype=torch.bfloat16), str(adapter))\n"
        "with torch.no_grad():\n"
        "    model.base_model.model.model.image_newline.copy_(load_file(str(adapter / 'extra_trainables.safetensors'))"
        "['model.image_newline'])\n"
        "merged = model.merge_and_unload()\n"
        "merged.save_pretrained(out)\n"
        "print(json.dumps({'inner_s': time.perf_counter() - t}))\n"),
}


def run_stage(stage: str, src: Path, dst: Path) -> dict:
    """Run one stage in a fresh interpreter: wall time (interpreter start, imports and a final sync() that puts
    the stage's writes on disk included, so no stage leaves writeback to the next), the time the work itself took
    before that sync, and the child's peak RSS. The peak is the child's VmHWM read by itself at exit: it starts
    at exec, whereas getrusage/wait4's ru_maxrss also counts the pages of this (much larger) parent that the
    child shares between fork and exec."""
    os.sync()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    code = STAGES[stage] + _HWM
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, str(src), str(dst)], capture_output=True, env=env, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"stage {stage} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    info: dict = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            info.update(json.loads(line))
    return {"wall_s": wall, "inner_s": info.get("inner_s"), "sync_s": info.get("sync_s"),
            "peak_rss_gb": info["hwm_kb"] * 1024 / 1e9}


_HWM = (
    "\nimport json as _j, os as _os, time as _t\n"
    "_t0 = _t.perf_counter(); _os.sync()\n"
    "print(_j.dumps({'sync_s': _t.perf_counter() - _t0}))\n"
    "_kb = [int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM:')][0]\n"
    "print(_j.dumps({'hwm_kb': _kb}))\n")


def dir_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def compare_outputs(a: Path, b: Path, key: str) -> float:
    from lora_manip.checkpoints.tensors import Checkpoint, read_tensor

    def get(folder):
        return next(read_tensor(r) for r in Checkpoint(folder).tensors() if r.name == key).float()
    return (get(a) - get(b)).abs().max().item() if key else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4, help="Qwen2 layers to build (28 = real 7B). Default 4.")
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--shard-size", default="5GB", help="Base checkpoint shard size (output uses the default 5GB).")
    ap.add_argument("--peft-max-layers", type=int, default=6,
                    help="Run the PEFT baseline only up to this many layers (it holds the whole model in RAM).")
    ap.add_argument("--skip-peft", action="store_true")
    ap.add_argument("--workdir", default=None, help="Where to build (default: a temp folder under /tmp).")
    ap.add_argument("--keep", action="store_true", help="Keep the built files.")
    ap.add_argument("--reuse", action="store_true", help="Reuse base + adapter kept in --workdir by an earlier "
                    "--keep run with the same --layers/--rank/--shard-size.")
    args = ap.parse_args()

    # bf16 bytes of the checkpoint, roughly: LM layers + embeddings/head + SigLIP + projector.
    h, m, kv = TEXT["hidden_size"], TEXT["intermediate_size"], TEXT["hidden_size"] // TEXT["num_attention_heads"] * 4
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * m
    est = 2 * (args.layers * per_layer + 2 * TEXT["vocab_size"] * h + 0.41e9 + 17e6)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="merge7b-"))
    work.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(work).free
    need = est * (3 if not args.skip_peft and args.layers <= args.peft_max_layers else 2) * 1.05
    print(f"checkpoint ~{est / 1e9:.1f} GB; disk free at {work}: {free / 1e9:.1f} GB (need ~{need / 1e9:.1f} GB)")
    if free < need:
        raise SystemExit("not enough disk space: lower --layers or point --workdir elsewhere")
    try:
        t = time.perf_counter()
        marker = {"layers": args.layers, "rank": args.rank, "shard_size": args.shard_size}
        built = work / "built.json"
        if args.reuse and built.is_file() and json.loads(built.read_text())["spec"] == marker:
            shapes = {k: tuple(v) for k, v in json.loads(built.read_text())["shapes"].items()}
            adapter_bytes = (work / "adapter" / "adapter_model.safetensors").stat().st_size
            print(f"reusing the checkpoint and adapter in {work}")
        else:
            for name in ("base", "adapter", "built.json"):
                shutil.rmtree(work / name, ignore_errors=True) if name != "built.json" else built.unlink(True)
            shapes = build_base(work / "base", args.layers, args.shard_size)
            adapter_bytes = build_adapter(work / "adapter", work / "base", shapes, args.rank)
            built.write_text(json.dumps({"spec": marker, "shapes": {k: list(v) for k, v in shapes.items()}}))
        for name in ("copy", "merged", "peft"):
            shutil.rmtree(work / name, ignore_errors=True)
        base_bytes = dir_bytes(work / "base")
        n_params = sum(math.prod(s) for s in shapes.values())
        shards = len(list((work / "base").glob("*.safetensors")))
        print(f"built in {time.perf_counter() - t:.0f} s: {n_params / 1e9:.2f} B params, "
              f"{base_bytes / 1e9:.2f} GB bf16 "
              f"in {shards} shard(s); adapter rank {args.rank}: {adapter_bytes / 1e6:.0f} MB (fp32) + projector + "
              "image_newline")

        results = {}
        results["copy checkpoint bytes (shutil.copytree)"] = run_stage("copy", work / "base", work / "copy")
        shutil.rmtree(work / "copy")
        results["streaming merge (lora-manip)"] = run_stage("stream", work / "adapter", work / "merged")
        peft_note = ""
        if args.skip_peft:
            peft_note = "PEFT baseline skipped (--skip-peft)"
        elif args.layers > args.peft_max_layers:
            peft_note = (f"PEFT baseline skipped: {args.layers} layers > --peft-max-layers {args.peft_max_layers} "
                         "(it loads the whole model; ~16+ GB at 28 layers)")
        else:
            results["PEFT merge_and_unload (bf16 load, merge, save)"] = run_stage("peft", work / "adapter",
                                                                                  work / "peft")
        copy = results["copy checkpoint bytes (shutil.copytree)"]["wall_s"]
        print()
        print(f"LLaVA-OV-7B shapes with {args.layers}/28 LM layers, {base_bytes / 1e9:.2f} GB bf16, rank-{args.rank} "
              f"adapter; {os.cpu_count()} CPU cores")
        print("wall s: whole subprocess incl. interpreter start, imports and the final sync(); work s: the work "
              "before sync()")
        print(f"{'stage':<48} {'wall s':>8} {'work s':>8} {'sync s':>7} {'peak RSS GB':>12} {'x copy':>7}")
        for name, r in results.items():
            inner = f"{r['inner_s']:.1f}" if r["inner_s"] is not None else "-"
            print(f"{name:<48} {r['wall_s']:>8.1f} {inner:>8} {r['sync_s']:>7.1f} {r['peak_rss_gb']:>12.2f} "
                  f"{r['wall_s'] / copy:>7.2f}")
        if peft_note:
            print(peft_note)
        if (work / "peft").exists():
            key = "language_model.model.layers.0.self_attn.q_proj.weight"
            print(f"max |streaming - PEFT| on {key}: {compare_outputs(work / 'merged', work / 'peft', key):.3g} (bf16)")
        s = results["streaming merge (lora-manip)"]
        print(f"targets: peak RSS < 3 GB: {'yes' if s['peak_rss_gb'] < 3 else 'NO'} ({s['peak_rss_gb']:.2f}); "
              f"time <= 2x copy: {'yes' if s['wall_s'] <= 2 * copy else 'NO'} ({s['wall_s'] / copy:.2f}x)")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"kept {work}")


if __name__ == "__main__":
    main()
