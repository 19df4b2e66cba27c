"""What real checkpoints and real recipes need beyond fp32 on all-image data: fp32 master weights under bf16,
QLoRA without needless upcasts, 8-bit optimizer state kept 32-bit for embeddings, text-only batches that still
run the vision tower, and trained folders in the base's own format."""

import json

import pytest
import torch
from transformers import LlavaOnevisionForConditionalGeneration

from lora_manip.model.adapters import prepare_trainable
from lora_manip.model.layouts import part_of, unwrap_peft
from lora_manip.recipe import recipe_from_dict

from tests.conftest import tiny_recipe_dict


def _recipe(tiny_model_dir, tmp_path, **over):
    return recipe_from_dict(tiny_recipe_dict(tiny_model_dir, tmp_path, tmp_path / "out", **over))


def _image_batch(processor, n_images=1):
    from PIL import Image

    from lora_manip.data.encode import Chat, prompt_text

    text = prompt_text(Chat(processor, None), [{"role": "user", "content": "<image>\nWhere is the red cube?"}])
    img = Image.new("RGB", (320, 180), (120, 90, 60))
    inputs = processor(images=[img], text=[text + "It is here.<|im_end|>"], return_tensors="pt")
    inputs["labels"] = inputs["input_ids"].clone()
    return inputs


# ------------------------------------------------------------------------------------------ fp32 master weights

def _one_bf16_step(model, batch, lr=2e-5):
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n}
    before = {n: p.detach().clone() for n, p in trained.items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**batch).loss
    loss.backward()
    opt.step()
    # Elements with a zero gradient (embedding rows of tokens not in the batch) rightly stay: count the others.
    live = {n: p.grad != 0 if p.grad is not None else torch.zeros_like(p, dtype=torch.bool)
            for n, p in trained.items()}
    changed = sum(int(((p.detach() != before[n]) & live[n]).sum()) for n, p in trained.items())
    return trained, changed / sum(int(m.sum()) for m in live.values())


@pytest.mark.parametrize("over", [
    {},  # LoRA on the LM, projector + image_newline in full
    {"parts__vision_tower": {"train": "full", "lr": 4e-6}},
    {"method": "full"},
])
def test_fully_trained_parts_get_fp32_master_weights_and_move(tiny_model_dir, processor, tmp_path, over):
    recipe = _recipe(tiny_model_dir, tmp_path, **over)
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    model = prepare_trainable(model, recipe)
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all(p.dtype == torch.float32 for _, p in trained)
    frozen = [p for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen == [] or all(p.dtype == torch.bfloat16 for p in frozen)  # the rest stays in the load dtype
    params, moved = _one_bf16_step(model, _image_batch(processor))
    assert {part_of(n) for n in params} >= {"projector"}
    assert moved >= 0.99, moved


def test_bf16_trained_weights_would_not_move(tiny_model_dir, processor, tmp_path, monkeypatch):
    """The control for the test above: without the fp32 copy, most updates round away."""
    import lora_manip.model.adapters as adapters

    monkeypatch.setattr(adapters, "fp32_master_weights", lambda model: 0)
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    model = prepare_trainable(model, _recipe(tiny_model_dir, tmp_path))
    _, moved = _one_bf16_step(model, _image_batch(processor))
    assert moved < 0.9


@pytest.mark.parametrize("masters", [True, False])
def test_fp16_trains_with_grad_scaler_thanks_to_fp32_masters(tiny_model_dir, processor, tmp_path, monkeypatch,
                                                             masters):
    """precision: fp16 works the same way: GradScaler refuses to unscale fp16 gradients, and gets fp32 ones."""
    import lora_manip.model.adapters as adapters

    if not masters:
        monkeypatch.setattr(adapters, "fp32_master_weights", lambda model: 0)
    recipe = _recipe(tiny_model_dir, tmp_path, model__dtype="float16", train__precision="fp16")
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(tiny_model_dir, dtype=torch.float16)
    model = prepare_trainable(model, recipe)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-5)
    scaler = torch.amp.GradScaler("cpu")
    with torch.autocast("cpu", dtype=torch.float16):
        loss = model(**_image_batch(processor)).loss
    scaler.scale(loss).backward()
    if masters:
        scaler.step(opt)
        scaler.update()
    else:
        with pytest.raises(ValueError, match="FP16 gradients"):
            scaler.step(opt)


def test_full_run_saves_in_the_base_dtype_and_names(tiny_model_dir, synth_dir, tmp_path):
    """Trained in fp32 master weights, written as the base was: same dtype and tensor names."""
    from safetensors import safe_open

    from lora_manip.train.workflow import run_training

    base_bf16 = tmp_path / "base"
    from lora_manip.model.tiny import write_tiny_model

    write_tiny_model(base_bf16, dtype="bfloat16")
    recipe = recipe_from_dict(tiny_recipe_dict(base_bf16, synth_dir, tmp_path / "run", method="full",
                                               model__dtype="bfloat16", train__max_steps=1))
    import lora_manip.model.load as load

    # CPU computes in fp32 whatever the recipe says; pretend the recipe's dtype is honoured, as on a GPU.
    orig = load.compute_dtype
    load.compute_dtype = lambda name: torch.bfloat16 if name == "bfloat16" else orig(name)
    try:
        run = run_training(recipe)
    finally:
        load.compute_dtype = orig

    def tensors(folder):
        with safe_open(str(folder / "model.safetensors"), "pt") as f:
            return {k: f.get_slice(k).get_dtype() for k in f.keys()}

    assert tensors(run) == tensors(base_bf16)
    from tests.e2e.test_e2e import assert_same_processor_files

    assert_same_processor_files(base_bf16, run)


# ------------------------------------------------------------------------------------------------------ QLoRA

def test_qlora_keeps_frozen_weights_in_the_compute_dtype(tiny_model_dir, tmp_path):
    import bitsandbytes as bnb
    from transformers import BitsAndBytesConfig

    from lora_manip.model.load import NEVER_QUANTISED

    recipe = _recipe(tiny_model_dir, tmp_path, method="qlora")
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.bfloat16, llm_int8_skip_modules=NEVER_QUANTISED)
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(
        tiny_model_dir, dtype=torch.bfloat16, quantization_config=q, device_map={"": "cpu"})
    model = prepare_trainable(model, recipe)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    by_dtype: dict = {}
    for n, p in model.named_parameters():
        if p.dtype == torch.uint8:
            continue  # packed 4-bit weights
        key = "trained" if p.requires_grad else unwrap_peft(n).split(".")[1]
        by_dtype.setdefault(key, set()).add(p.dtype)
    assert by_dtype.pop("trained") == {torch.float32}
    # frozen vision tower, embeddings, norms, lm_head: bf16 as loaded (PEFT's kbit preparation made them fp32)
    assert all(d == {torch.bfloat16} for d in by_dtype.values()), by_dtype


# -------------------------------------------------------------------------------------------- 8-bit optimizers

def test_8bit_optimizer_keeps_embeddings_in_32bit_state(tiny_model_dir, synth_dir, tmp_path):
    from lora_manip.train.workflow import build_trainer

    recipe = recipe_from_dict(tiny_recipe_dict(tiny_model_dir, synth_dir, tmp_path / "run", method="full",
                                               train__optimizer="adamw_8bit", train__max_steps=1))
    trainer = build_trainer(recipe)
    trainer.train()
    state = trainer.optimizer.state
    embed = trainer.model.model.language_model.embed_tokens.weight
    big_linear = trainer.model.model.language_model.layers[0].mlp.up_proj.weight
    assert embed.numel() >= 4096 and big_linear.numel() >= 4096  # both big enough for 8-bit state
    assert state[big_linear]["state1"].dtype == torch.uint8
    assert state[embed]["state1"].dtype == torch.float32


# ------------------------------------------------------------------------------------ text-only batches + dummy

def test_dummy_image_runs_the_vision_tower_and_leaves_gradients_unchanged(tiny_model_dir, processor, tmp_path):
    from lora_manip.data.collate import DUMMY_IMAGE, Collator
    from lora_manip.train.trainer import image_features_unused

    recipe = _recipe(tiny_model_dir, tmp_path, parts__vision_tower={"train": "full", "lr": 1e-5})
    batch_items = [{"input_ids": ids, "labels": ids, "images": [], "id": str(i)} for i, ids in enumerate(
        processor.tokenizer(["How do I stack the cups? First the red one.", "Plan: grasp, lift."],
                            add_special_tokens=False)["input_ids"])]

    def grads(dummy):
        torch.manual_seed(0)
        model = prepare_trainable(LlavaOnevisionForConditionalGeneration.from_pretrained(tiny_model_dir), recipe)
        batch = Collator(processor, dummy_image=dummy)(batch_items)
        assert (DUMMY_IMAGE in batch) == dummy and ("pixel_values" in batch) == dummy
        batch.pop(DUMMY_IMAGE, None)
        calls = []
        tower = next(m for n, m in model.named_modules() if n.endswith("model.vision_tower"))
        tower.register_forward_hook(lambda *a: calls.append(1))
        ctx = image_features_unused(model) if dummy else torch.enable_grad()
        with ctx:
            model(**batch).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}, len(calls)

    plain, plain_calls = grads(False)
    with_dummy, dummy_calls = grads(True)
    assert plain_calls == 0 and dummy_calls == 1
    for n, g in plain.items():
        if part_of(n) == "language_model":
            torch.testing.assert_close(with_dummy[n], g, atol=1e-6, rtol=1e-5)
    # never reached without the dummy; with it: a gradient, exactly zero (SigLIP's post_layernorm is unused by
    # LLaVA-OneVision either way)
    others = {n: g for n, g in with_dummy.items() if part_of(n) != "language_model"}
    assert all(plain[n] is None for n in others)
    reached = {n for n, g in others.items() if g is not None}
    assert all(not others[n].any() for n in reached)
    assert any("multi_modal_projector" in n for n in reached) and any("encoder.layers" in n for n in reached)
    assert reached == {n for n in others if "post_layernorm" not in n}


@pytest.mark.slow
def test_zero3_two_processes_half_text_only_batch_one(zero3_lora_run):
    """The case that died with a gloo collective mismatch: ZeRO-3, 2 processes, half the records text-only,
    batch 1 (one process gets an image batch while the other gets a text-only one): conftest.zero3_lora_run, whose
    adapter test_train.test_zero3_lora_two_processes_saves_complete_adapter also merges and checks."""
    run = zero3_lora_run
    assert (run / "run_complete.json").is_file() and (run / "adapter_model.safetensors").is_file()
    lines = [json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in lines) == 4  # every step ran on both processes, none hung


# ------------------------------------------------------------------------------------------- real geometry

def test_real_05b_geometry_trains_merges_and_predicts(tmp_path):
    """LLaVA-OneVision-0.5B's real widths, 384-px tiles, pinpoints up to 2304, anyres_max_9 and the real Qwen2
    vocabulary (one layer per tower, random weights, bf16 on disk as on the hub): LoRA on RH20T- and DROID-sized
    frames -> merge -> predict, through the CLI."""
    import yaml
    from PIL import Image
    from typer.testing import CliRunner

    from lora_manip.cli import app
    from lora_manip.data.processor import image_token_counts, load_processor
    from lora_manip.model.tiny import write_tiny_model

    from tests.e2e.test_e2e import assert_same_processor_files, safetensors_names

    base = write_tiny_model(tmp_path / "ov05", geometry="ov-0.5b", dtype="bfloat16")
    processor = load_processor(base)
    assert processor.image_token_id == 151646 and len(processor.tokenizer) == 151648
    assert image_token_counts(processor, [(640, 480)]) == [2929]  # as the real processor counts them
    assert image_token_counts(processor, [(320, 180)]) == [1149]
    data = tmp_path / "data"
    (data / "img").mkdir(parents=True)
    records = []
    for i, size in enumerate([(640, 480), (320, 180), (640, 480), (320, 180)]):
        Image.new("RGB", size, (40 * i, 90, 200)).save(data / "img" / f"{i}.png")
        records.append({"id": f"r{i}", "images": [f"img/{i}.png"], "conversations": [
            {"from": "human", "value": "<image>\nWhat is the bounding box of the cube?"},
            {"from": "gpt", "value": '{"current_bbox": [[0.1, 0.2], [0.3, 0.4]]}'}]})
    (data / "train.json").write_text(json.dumps(records))
    raw = tiny_recipe_dict(base, data, tmp_path / "run", train__per_device_batch_size=1, train__max_steps=2,
                           lora__r=4, lora__target_modules=["q_proj", "v_proj"])
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))
    runner = CliRunner()
    result = runner.invoke(app, ["train", str(tmp_path / "r.yaml")])
    assert result.exit_code == 0, result.output
    assert_same_processor_files(base, tmp_path / "run")
    result = runner.invoke(app, ["merge", str(tmp_path / "run"), "--out", str(tmp_path / "merged")])
    assert result.exit_code == 0, result.output
    assert safetensors_names(tmp_path / "merged") == safetensors_names(base)
    assert_same_processor_files(base, tmp_path / "merged")
    # 16 new tokens: the pipeline at the real geometry is the point; 256 of a random model's tokens add ~15 s
    result = runner.invoke(app, ["predict", str(tmp_path / "merged"), str(data / "img" / "1.png"),
                                 "Where is the cube?", "--max-new-tokens", "16"])
    assert result.exit_code == 0, result.output


def test_chatml_checkpoint_trains_merges_and_evaluates(chatml_model_dir, synth_dir, tmp_path):
    """The other template style end to end: lmms-lab's string ChatML (with its default system turn)."""
    import yaml
    from typer.testing import CliRunner

    from lora_manip.cli import app

    from tests.e2e.test_e2e import assert_same_processor_files

    raw = tiny_recipe_dict(chatml_model_dir, synth_dir, tmp_path / "run", train__max_steps=2)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))
    runner = CliRunner()
    result = runner.invoke(app, ["train", str(tmp_path / "r.yaml")])
    assert result.exit_code == 0, result.output
    assert_same_processor_files(chatml_model_dir, tmp_path / "run")
    result = runner.invoke(app, ["merge", str(tmp_path / "run"), "--out", str(tmp_path / "merged")])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["eval", str(tmp_path / "merged"), "--data", str(synth_dir / "val.json"),
                                 "--limit", "4", "--out", str(tmp_path / "eval")])
    assert result.exit_code in (0, 1), result.output  # 1: some answers of the barely trained model do not score
    rows = [json.loads(x) for x in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines() if x.strip()]
    assert len([r for r in rows if "pred" in r]) == 4
