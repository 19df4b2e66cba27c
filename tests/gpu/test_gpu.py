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
    preds = predict_samples(model, processor, samples, None, batch_size=4, max_new_tokens=8, progress=False)
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
def test_packed_row_with_flash_attention_varlen_equals_padded(tiny_model_dir, processor, synth_dir):
    """On a GPU, packing runs flash-attention's variable-length kernels from the restarting position_ids."""
    from transformers import LlavaOnevisionForConditionalGeneration

    from lora_manip.data.collate import Collator
    from lora_manip.data.dataset import ManipDataset
    from lora_manip.data.records import load_samples

    samples, _ = load_samples(synth_dir / "train.json", synth_dir)
    ds = ManipDataset(samples[:4], processor, "You are a helpful assistant.", max_length=10_000)
    items = [ds[i] for i in range(len(ds))]
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(
        tiny_model_dir, dtype=torch.bfloat16, attn_implementation="flash_attention_2").cuda()

    def loss(batch):
        batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}
        batch["pixel_values"] = batch["pixel_values"].to(torch.bfloat16)
        with torch.no_grad():
            return model(**batch).loss.float()

    torch.testing.assert_close(loss(Collator(processor, packing=True)(items)), loss(Collator(processor)(items)),
                               rtol=2e-2, atol=2e-2)
