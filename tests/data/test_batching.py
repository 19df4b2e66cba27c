"""Bounded memory: token-budget micro-batches, packing, per-part gradient checkpointing."""

import json

import numpy as np
import pytest
import torch
from transformers import LlavaOnevisionForConditionalGeneration

from lora_manip.data.collate import Collator
from lora_manip.data.dataset import ManipDataset
from lora_manip.data.encode import Chat
from lora_manip.data.records import load_samples
from lora_manip.data.sampler import TokenBudgetBatchSampler, batch_cost, padding_efficiency
from lora_manip.recipe import recipe_from_dict

from tests.conftest import tiny_recipe_dict, write_two_images

SYSTEM = "You are a helpful assistant."


# ------------------------------------------------------------------------------------------- the sampler

def _mixture(n=600, seed=0):
    rng = np.random.default_rng(seed)
    has_images = rng.random(n) > 0.1
    tiles = np.where(has_images, rng.choice([2, 5, 31], n, p=[0.5, 0.45, 0.05]), 0)
    lengths = np.where(has_images, tiles * 300, 0) + rng.integers(20, 200, n)
    return lengths, has_images, tiles


@pytest.mark.parametrize("packing", [False, True])
def test_budget_batches_cover_every_sample_once_within_budget(packing):
    lengths, has_images, tiles = _mixture()
    s = TokenBudgetBatchSampler(lengths, has_images, tiles, budget=12_000, tile_tokens=100, seed=3,
                                packing=packing)
    batches = s.batches(0)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(len(lengths)))  # each sample exactly once
    for b in batches:
        cost = batch_cost(lengths[b], tiles[b], 100, packing)
        assert cost <= 12_000 or len(b) == 1  # over budget only a sample that alone exceeds it
        assert len(set(has_images[b].tolist())) == 1  # images and text-only apart
    alone = [b for b in batches if batch_cost(lengths[b], tiles[b], 100, packing) > 12_000]
    assert len(alone) == s.over_budget > 0  # the 31-tile images
    costs = [batch_cost(lengths[b], tiles[b], 100, packing) for b in batches]
    assert costs[0] == max(costs)  # the costliest batch first: an out-of-memory shows at step 1
    sizes = {len(b) for b in batches}
    assert len(sizes) > 3  # variable-size batches: short samples are batched more densely
    if not packing:
        assert padding_efficiency(lengths, batches) > 0.9


def test_budget_batches_are_seeded_per_epoch_and_even_across_processes():
    lengths, has_images, tiles = _mixture()
    a = TokenBudgetBatchSampler(lengths, has_images, tiles, 8_000, 100, seed=1, world_size=4)
    b = TokenBudgetBatchSampler(lengths, has_images, tiles, 8_000, 100, seed=1, world_size=4)
    assert all(np.array_equal(x, y) for x, y in zip(a.batches(0), b.batches(0)))
    assert not all(np.array_equal(x, y) for x, y in zip(a.batches(0), a.batches(1)))
    for epoch in range(3):
        assert len(a.batches(epoch)) % 4 == 0  # every process gets the same number of micro-batches
    a.set_epoch(2)
    assert [list(x) for x in a.batches(2)] == list(iter(a))


# --------------------------------------------------------------------------------- records with images

@pytest.fixture()
def samples(tmp_path):
    write_two_images(tmp_path)
    recs = [
        {"id": "a", "images": ["img/a.png"], "conversations": [
            {"from": "human", "value": "<image>\nWhere is the cube?"},
            {"from": "gpt", "value": '{"current_bbox": [[0.1, 0.2], [0.3, 0.4]]}'}]},
        {"id": "multi", "images": ["img/a.png", "img/b.png"], "conversations": [
            {"from": "human", "value": "<image>\n<image>\nWhich frame is later?"},
            {"from": "gpt", "value": "The second."},
            {"from": "human", "value": "Is the gripper open?"},
            {"from": "gpt", "value": "Yes"}]},
        {"id": "b", "images": ["img/b.png"], "conversations": [
            {"from": "human", "value": "<image>\nWhere will the gripper go?"},
            {"from": "gpt", "value": '{"future_traj": [[0.1, 0.2], [0.5, 0.5], [0.9, 0.8]]}'}]},
        {"id": "text", "conversations": [
            {"from": "human", "value": "How to put the cup away?"},
            {"from": "gpt", "value": "1. grasp the cup 2. place it"}]},
    ]
    (tmp_path / "a.json").write_text(json.dumps(recs))
    out, problems = load_samples(tmp_path / "a.json", tmp_path)
    assert problems == []
    return out


def _loss_and_grads(model, batch):
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_packed_row_equals_the_same_samples_unpacked(tiny_model_dir, processor, samples):
    """Loss and every gradient of one packed row equal those of the padded batch (fp32, tolerance 1e-5 relative):
    attention never crosses samples and each sample's image features land on its own image tokens."""
    ds = ManipDataset(samples, Chat(processor, SYSTEM), max_length=10_000)
    items = [ds[i] for i in range(len(ds))]
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(tiny_model_dir, attn_implementation="sdpa")
    padded = Collator(processor)(items)
    packed = Collator(processor, packing=True)(items)
    assert packed["input_ids"].shape == (1, sum(len(x["input_ids"]) for x in items))
    assert "attention_mask" not in packed and packed["batch_num_images"].tolist() == [1, 2, 1]
    loss_a, grads_a = _loss_and_grads(model, padded)
    loss_b, grads_b = _loss_and_grads(model, packed)
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-6)
    assert grads_a.keys() == grads_b.keys()
    for n in grads_a:
        torch.testing.assert_close(grads_b[n], grads_a[n], rtol=1e-4, atol=1e-6, msg=n)
    # the check can see misplaced features: with the two single-image samples' images swapped, the loss moves
    swapped = [dict(items[0], images=items[2]["images"]), items[1], dict(items[2], images=items[0]["images"])]
    with torch.no_grad():
        assert abs(model(**Collator(processor, packing=True)(swapped)).loss - loss_b) > 1e-3


@pytest.mark.parametrize("attn,dtype", [("sdpa", torch.float32), ("eager", torch.float32), ("sdpa", torch.bfloat16)])
def test_per_sample_packing_check_passes_packing_and_fails_crossing(tiny_model_dir, processor, samples, attn, dtype):
    """The comparison the GPU check runs with flash-attention (tests/gpu/packing.py), shown here to discriminate at
    its tolerances: each sample's logits packed behind the others equal its logits alone, and a row whose
    positions run on or whose mask is one causal mask over the row (attention crosses samples) fails, the
    first sample (nothing before it to see) excepted."""
    from tests.gpu.packing import TOLERANCE, compare_packed

    ds = ManipDataset(samples, Chat(processor, SYSTEM), max_length=10_000)
    items = [ds[i] for i in range(len(ds))]
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(tiny_model_dir, attn_implementation=attn,
                                                                   dtype=dtype).eval()
    tol = TOLERANCE[dtype]
    good = compare_packed(model, processor, items, tol, dtype=dtype)
    assert good.ok, good.describe()
    for how in ("positions", "mask"):
        crossed = compare_packed(model, processor, items, tol, broken=how, dtype=dtype)
        assert not crossed.ok and crossed.diffs[0] <= tol, crossed.describe()
        assert min(crossed.diffs[1:]) > 5 * tol, crossed.describe()  # every later sample moves, well past it


# ------------------------------------------------------------------------------------ through the Trainer

@pytest.mark.parametrize("reduction", ["token", "sample"])
def test_token_budget_training_with_accumulation_is_exact(tiny_model_dir, synth_dir, tmp_path, reduction):
    """Variable-size micro-batches under gradient accumulation: the summed gradient equals that of all their
    samples in one batch (token or sample mean over the whole accumulated batch)."""
    from lora_manip.data.sampler import token_budget_sampler
    from lora_manip.train.workflow import build_trainer

    recipe = recipe_from_dict(tiny_recipe_dict(tiny_model_dir, synth_dir, tmp_path / "run",
                                               train__max_tokens_per_batch=900, train__gradient_accumulation_steps=2,
                                               train__max_steps=2, train__loss_reduction=reduction))
    trainer = build_trainer(recipe)
    ds, collate = trainer.train_dataset, trainer.data_collator
    sizes = [len(b["input_ids"]) for b, _ in zip(trainer.get_train_dataloader(), range(6))]
    assert len(set(sizes)) > 1  # the Trainer's loader yields the budget's variable-size batches
    batches = token_budget_sampler(ds, 900, trainer.processor.num_image_tokens).batches(0)
    pair = next((a, b) for a, b in zip(batches, batches[1:]) if len(a) != len(b))
    micro = [collate([ds[i] for i in b]) for b in pair]
    model = trainer.model
    num_items = trainer._get_num_items_in_batch(micro, "cpu")
    model.zero_grad()
    for b in micro:
        trainer.compute_loss(model, dict(b), num_items_in_batch=num_items).backward()
    acc = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    trainer.compute_loss(model, dict(collate([ds[i] for b in pair for i in b]))).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert acc.keys() == grads.keys()
    for n, g in acc.items():
        torch.testing.assert_close(g, grads[n], rtol=1e-4, atol=1e-6, msg=n)
    trainer.train()
    assert trainer.state.global_step == 2


def test_packed_training_runs(tiny_model_dir, synth_dir, tmp_path):
    from lora_manip.train.workflow import build_trainer

    recipe = recipe_from_dict(tiny_recipe_dict(tiny_model_dir, synth_dir, tmp_path / "run", data__packing=True,
                                               train__max_tokens_per_batch=1200, train__max_steps=2))
    trainer = build_trainer(recipe)
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["input_ids"].shape[0] == 1 and "position_ids" in batch
    assert (batch["position_ids"][0] == 0).sum() > 1  # several samples in the row
    trainer.train()
    assert trainer.state.global_step == 2


def test_packing_without_a_budget_is_refused(tiny_model_dir, synth_dir, tmp_path):
    from lora_manip.errors import UserError

    with pytest.raises(UserError, match="max_tokens_per_batch"):
        recipe_from_dict(tiny_recipe_dict(tiny_model_dir, synth_dir, tmp_path / "run", data__packing=True))


# ------------------------------------------------------------------------------ per-part checkpointing

@pytest.mark.parametrize("which", [["lm"], ["vision_tower"], True])
def test_gradient_checkpointing_per_part(tiny_model_dir, processor, samples, tmp_path, which):
    from lora_manip.model.adapters import checkpoint_parts, prepare_trainable

    recipe = recipe_from_dict(tiny_recipe_dict(tiny_model_dir, tmp_path, tmp_path / "o",
                                               parts__vision_tower={"train": "full", "lr": 1e-5}))
    ds = ManipDataset(samples[:1], Chat(processor, SYSTEM), max_length=10_000)
    batch = Collator(processor)([ds[0]])
    torch.manual_seed(0)
    plain = prepare_trainable(LlavaOnevisionForConditionalGeneration.from_pretrained(tiny_model_dir), recipe)
    torch.manual_seed(0)
    ckpt = prepare_trainable(LlavaOnevisionForConditionalGeneration.from_pretrained(tiny_model_dir), recipe)
    parts = checkpoint_parts(ckpt, which)
    ckpt.train(), plain.train()
    on = {type(m).__name__ for m in ckpt.modules() if getattr(m, "gradient_checkpointing", False)
          and type(m).__name__.endswith("Layer")}
    want = {"lm": "Qwen2DecoderLayer", "vision_tower": "SiglipEncoderLayer"}
    assert on == {want[p] for p in parts}
    _, g1 = _loss_and_grads(plain, batch)
    _, g2 = _loss_and_grads(ckpt, batch)
    for n in g1:
        torch.testing.assert_close(g2[n], g1[n], rtol=1e-4, atol=1e-6, msg=n)


# ----------------------------------------------------------------------------------------- image caps

def test_max_image_tiles_caps_measurement_training_and_generation(tiny_model_dir, synth_dir, tmp_path):
    """data.max_image_tiles limits anyres identically where tokens are counted, where the model places features
    (its config) and in eval, which reads the run's recipe.yaml."""
    from lora_manip.eval.generate import load_for_inference
    from lora_manip.data.processor import image_tiles, image_token_counts, load_processor
    from lora_manip.train.workflow import build_trainer

    full = load_processor(tiny_model_dir)
    capped = load_processor(tiny_model_dir, max_image_tiles=2)
    big = (640, 480)
    assert image_tiles(full, [big]) == 1 + 9 and image_tiles(capped, [big]) == 1 + 2
    assert image_token_counts(capped, [big])[0] < image_token_counts(full, [big])[0]
    recipe = recipe_from_dict(tiny_recipe_dict(tiny_model_dir, synth_dir, tmp_path / "run", train__max_steps=1,
                                               data__max_image_tiles=2))
    trainer = build_trainer(recipe)
    assert trainer.model.config.image_grid_pinpoints == [list(p) for p in capped.image_processor.image_grid_pinpoints]
    assert max(trainer.train_dataset.tiles) <= 3
    trainer.train()  # a token-count mismatch between processor and model would raise here
    trainer.save_final(str(tmp_path / "run"))
    model, proc = load_for_inference(str(tmp_path / "run"))
    assert proc.image_processor.image_grid_pinpoints == capped.image_processor.image_grid_pinpoints
    assert model.config.image_grid_pinpoints == [list(p) for p in capped.image_processor.image_grid_pinpoints]


def test_data_check_reports_capped_images_and_tokens_before_after(tiny_model_dir, synth_dir, tmp_path):
    import yaml
    from typer.testing import CliRunner

    from lora_manip.cli import app

    raw = tiny_recipe_dict(tiny_model_dir, synth_dir, tmp_path / "run", data__max_image_tiles=2)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(app, ["data", "check", str(tmp_path / "r.yaml"), "--json"])
    assert result.exit_code in (0, 1), result.output
    cap = json.loads(result.output[result.output.index("{"):])["image_cap"]
    assert cap["max_image_tiles"] == 2 and 0 < cap["capped_records"] <= cap["records"]
    assert cap["tokens_after"]["max"] < cap["tokens_before"]["max"]
    text = CliRunner().invoke(app, ["data", "check", str(tmp_path / "r.yaml")]).output
    assert f"data.max_image_tiles 2: {cap['capped_records']} of {cap['records']} records have an image capped" in text
