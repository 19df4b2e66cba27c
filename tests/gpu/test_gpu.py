"""CUDA-only paths: 4-bit QLoRA with bitsandbytes' CUDA kernels, bf16 training, attention selection and
generation on the GPU. The CPU suite covers the same code; these check what only a GPU can run."""

import importlib.util
import json

import pytest
import torch

from lora_manip.model.layouts import unwrap_peft
from lora_manip.recipe import recipe_from_dict

from tests.conftest import tiny_recipe_dict

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _losses(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_qlora_nf4_trains_on_cuda_then_merges_and_generates(tiny_model_dir, synth_dir, tmp_path):
    import bitsandbytes as bnb

    from lora_manip.data.records import load_samples
    from lora_manip.data.encode import Chat
    from lora_manip.eval.generate import load_for_inference, predict_samples
    from lora_manip.checkpoints.merge import merge_adapter
    from lora_manip.train.workflow import build_trainer

    run = tmp_path / "run"
    recipe = recipe_from_dict(tiny_recipe_dict(
        tiny_model_dir, synth_dir, run, method="qlora", model__dtype="bfloat16", train__precision="bf16",
        train__max_steps=12, train__optimizer="paged_adamw_8bit", train__gradient_checkpointing=True))
    trainer = build_trainer(recipe)
    four_bit = {unwrap_peft(n).removesuffix(".base_layer"): m for n, m in trainer.model.named_modules()
                if isinstance(m, bnb.nn.Linear4bit)}
    assert four_bit and all(n.startswith("model.language_model.") for n in four_bit)
    some = next(iter(four_bit.values()))
    assert some.weight.device.type == "cuda"
    assert some.weight.quant_state.quant_type == "nf4" and some.weight.quant_state.nested  # double quantisation
    assert some.compute_dtype == torch.bfloat16
    trainer.train()
    losses = _losses(trainer)
    assert losses[-1] < losses[0] * 0.7, losses
    trainer.save_final(str(run))  # writes run_complete.json, which merge checks

    merged, diff = merge_adapter(str(run), out=str(tmp_path / "merged"))
    assert diff is not None and diff < 1e-2
    assert "quantization_config" not in json.loads((merged / "config.json").read_text())

    model, processor = load_for_inference(str(merged))
    assert model.device.type == "cuda" and model.dtype == torch.bfloat16
    samples = load_samples(synth_dir / "val.json", synth_dir)[0][:4]
    preds = predict_samples(model, Chat(processor, None), samples, batch_size=4, max_new_tokens=8, progress=False)
    assert len(preds) == 4 and all(isinstance(p, str) for p in preds)


def test_bf16_lora_on_cuda_matches_stock_loss(tiny_model_dir, synth_dir, tmp_path):
    """The Trainer's loss (logits only at labelled positions) equals the stock full-logit loss on the GPU."""
    from lora_manip.train.workflow import build_trainer

    recipe = recipe_from_dict(tiny_recipe_dict(tiny_model_dir, synth_dir, tmp_path / "run",
                                               model__dtype="bfloat16", train__precision="bf16"))
    trainer = build_trainer(recipe)
    batch = next(iter(trainer.get_train_dataloader()))
    model = trainer.model.to("cuda")
    batch = {k: v.to("cuda") if torch.is_tensor(v) else v for k, v in batch.items()}
    with torch.autocast("cuda", dtype=torch.bfloat16):
        kit = trainer.compute_loss(model, dict(batch))
        stock = model(**batch).loss
    assert torch.isfinite(kit) and abs(kit.item() - stock.item()) < 2e-2 * max(1.0, stock.item())


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None, reason="flash-attn is not installed")
def test_auto_attention_picks_flash_attention_2(tiny_model_dir):
    from lora_manip.model.load import load_model

    model = load_model(str(tiny_model_dir), dtype="bfloat16", attn="auto")
    assert model.config._attn_implementation == "flash_attention_2"


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None, reason="needs flash-attn")
def test_packed_logits_per_sample_equal_unpacked_with_flash_attention(tiny_model_dir, processor, synth_dir):
    """On a GPU, packing runs flash-attention's variable-length kernels from the restarting position_ids: every
    sample's logits inside the packed row equal its logits alone (bf16 tolerance), and the same comparison fails
    the row whose positions run on, where attention crosses samples (tests/gpu/packing.py)."""
    from transformers import LlavaOnevisionForConditionalGeneration

    from lora_manip.data.dataset import ManipDataset
    from lora_manip.data.encode import Chat
    from lora_manip.data.records import load_samples

    from tests.gpu.packing import TOLERANCE, compare_packed

    samples, _ = load_samples(synth_dir / "train.json", synth_dir)
    ds = ManipDataset(samples[:4], Chat(processor, "You are a helpful assistant."), max_length=10_000)
    items = [ds[i] for i in range(len(ds))]
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(
        tiny_model_dir, dtype=torch.bfloat16, attn_implementation="flash_attention_2").cuda().eval()
    tol = TOLERANCE[torch.bfloat16]
    good = compare_packed(model, processor, items, tol, device="cuda", dtype=torch.bfloat16)
    crossed = compare_packed(model, processor, items, tol, broken="positions", device="cuda", dtype=torch.bfloat16)
    print(f"RESULT packing_flash: packed {max(good.diffs):.1e}, crossing {max(crossed.diffs[1:]):.1e}, tol {tol:.0e}")
    assert good.ok, good.describe()
    assert not crossed.ok and crossed.diffs[0] <= tol, crossed.describe()


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs deepspeed")
def test_zero3_world_size_1_bf16_full_vision_tower_packed_saves_base_names(tiny_model_dir, synth_dir, tmp_path):
    """The 8-GPU recipe's path on one GPU: torchrun with one process, ZeRO-3 with DeepSpeed's bf16 engine, every
    part trained in full (the vision tower too), gradient checkpointing on both towers, a token budget with
    packing. The saved model has exactly the base's tensor names (hub layout, none left partitioned or empty),
    reloads with nothing missing or unexpected, and the vision tower really changed."""
    import socket
    import subprocess
    import sys

    import yaml
    from safetensors import safe_open
    from transformers import LlavaOnevisionForConditionalGeneration

    from tests.conftest import ROOT

    def tensors(folder):
        out = {}
        for f in sorted(folder.glob("*.safetensors")):
            with safe_open(str(f), "pt") as h:
                out.update({k: h.get_tensor(k) for k in h.keys()})
        return out

    raw = tiny_recipe_dict(tiny_model_dir, synth_dir, tmp_path / "run", method="full", model__dtype="bfloat16",
                           train__precision="bf16", train__max_steps=3, train__save_steps=3,
                           train__max_tokens_per_batch=1024, train__gradient_checkpointing=True,
                           data__packing=True, parts={"language_model": {"train": "full", "lr": 1e-4},
                                                      "projector": {"train": "full", "lr": 1e-3},
                                                      "vision_tower": {"train": "full", "lr": 1e-3}})
    raw["distributed"] = {"deepspeed": str(ROOT / "recipes" / "zero3.json")}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(raw))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1",
                           "--master_port", str(port), "-m", "lora_manip.cli", "train", str(tmp_path / "recipe.yaml")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run, base = tensors(tmp_path / "run"), tensors(tiny_model_dir)
    assert set(run) == set(base)
    assert all(run[k].shape == base[k].shape and run[k].dtype == torch.bfloat16 for k in base)
    moved = [k for k in base if k.startswith("vision_tower.") and not torch.equal(run[k], base[k].to(torch.bfloat16))]
    print(f"RESULT zero3_ws1: {len(run)} tensors named as the base; {len(moved)} vision-tower tensors trained")
    assert moved
    _, info = LlavaOnevisionForConditionalGeneration.from_pretrained(tmp_path / "run", output_loading_info=True)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
