"""Training: per-part optimizer groups, QLoRA on CPU (bitsandbytes), ZeRO-3 over 2 CPU processes, dry-run plans."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lora_manip.errors import UserError
from lora_manip.model.layouts import part_of, unwrap_peft
from lora_manip.recipe import recipe_from_dict

from tests.conftest import tiny_recipe_dict, train_two_processes

ROOT = Path(__file__).parents[2]


def test_trainer_optimizer_has_one_group_per_part_lr(tiny_model_dir, synth_dir, tmp_path):
    from lora_manip.train.workflow import build_trainer

    recipe = recipe_from_dict(tiny_recipe_dict(
        tiny_model_dir, synth_dir, tmp_path / "run", parts={"language_model": {"lr": 1e-3},
                                                             "projector": {"lr": 3e-4},
                                                             "vision_tower": {"train": "full", "lr": 4e-6}},
        train__max_steps=1, train__weight_decay=0.05))
    trainer = build_trainer(recipe)
    trainer.train()
    names = {id(p): unwrap_peft(n) for n, p in trainer.model.named_parameters()}
    want = {"language_model": 1e-3, "projector": 3e-4, "vision_tower": 4e-6}
    covered = set()
    for g in trainer.optimizer.param_groups:
        part = g["group_name"].split("/")[0]
        assert g["initial_lr"] == want[part]
        assert g["weight_decay"] == (0.0 if g["group_name"].endswith("no_decay") else 0.05)
        assert all(part_of(names[id(p)]) == part for p in g["params"])
        covered |= {id(p) for p in g["params"]}
    assert covered == {id(p) for p in trainer.model.parameters() if p.requires_grad}


def test_qlora_trains_on_cpu_with_4bit_language_model(tiny_model_dir, synth_dir, tmp_path):
    import bitsandbytes as bnb

    from lora_manip.checkpoints.merge import merge_adapter
    from lora_manip.train.workflow import build_trainer

    recipe = recipe_from_dict(tiny_recipe_dict(tiny_model_dir, synth_dir, tmp_path / "run", method="qlora",
                                               train__max_steps=2, train__optimizer="paged_adamw_8bit",
                                               train__gradient_checkpointing=True))
    trainer = build_trainer(recipe)
    four_bit = {unwrap_peft(n).removesuffix(".base_layer") for n, m in trainer.model.named_modules()
                if isinstance(m, bnb.nn.Linear4bit)}
    assert four_bit and all(n.startswith("model.language_model.") for n in four_bit)
    assert not any(n.startswith(("model.vision_tower", "model.multi_modal_projector", "lm_head")) for n in four_bit)
    trainer.train()
    trainer.save_final(str(tmp_path / "run"))  # writes run_complete.json, which merge checks
    cfg = json.loads((tmp_path / "run" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(tiny_model_dir)
    merged, diff = merge_adapter(str(tmp_path / "run"), out=str(tmp_path / "merged"))
    assert diff is not None and diff < 1e-3
    assert "quantization_config" not in json.loads((merged / "config.json").read_text())


def test_attention_and_quantisation_refused_before_loading(tiny_model_dir, synth_dir, tmp_path):
    from lora_manip.train.workflow import build_trainer

    if torch.cuda.is_available():
        pytest.skip("flash-attention may be available on this machine")
    recipe = recipe_from_dict(tiny_recipe_dict(tiny_model_dir, synth_dir, tmp_path / "run",
                                               model__attn_implementation="flash_attention_2"))
    with pytest.raises(UserError, match="flash_attention_2 cannot be used: no CUDA GPU"):
        build_trainer(recipe)
    assert not (tmp_path / "run").exists()


def _dry_run_7b(tmp_path, recipe_name, *sets):
    from transformers import LlavaOnevisionConfig

    cfg = LlavaOnevisionConfig(  # real LLaVA-OneVision-7B shapes, no weights
        vision_config=dict(model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304,
                           num_hidden_layers=26, num_attention_heads=16, image_size=384, patch_size=14),
        text_config=dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                         num_attention_heads=28, num_key_value_heads=4, vocab_size=152128,
                         tie_word_embeddings=False))
    cfg.save_pretrained(tmp_path / "ov7b")
    from typer.testing import CliRunner

    from lora_manip.cli import app

    args = ["train", str(ROOT / "recipes" / recipe_name), "--dry-run", "--set", f"model.path={tmp_path / 'ov7b'}"]
    for s in sets:
        args += ["--set", s]
    result = CliRunner().invoke(app, args)
    # the shipped recipes name placeholder data (data/rh20t/...): the plan is printed, then exit 2 saying so
    assert result.exit_code == 2, result.output
    assert result.output.splitlines()[-1].startswith("error: the run would stop on its data: annotation file not "
                                                     "found for"), result.output
    return result.output


def test_dry_run_full_8gpu_plan(tmp_path):
    out = _dry_run_7b(tmp_path, "full_8gpu.yaml")
    assert "8,0" in out or "8,1" in out or "8,2" in out  # ~8.0-8.2 B parameters
    assert "vision_tower               lr 4e-06" in out and "language_model             lr 2e-05" in out
    assert "token budget 16,384 tokens per micro-batch x 2 accumulation x 8 processes" in out  # not "= 32"
    assert "DeepSpeed" in out and "quantised: nothing" in out


def test_dry_run_qlora_plan(tmp_path):
    out = _dry_run_7b(tmp_path, "qlora_1gpu.yaml")
    assert "4-bit nf4 + double quantisation: 6.53B" in out
    assert "never: model.vision_tower, model.multi_modal_projector, lm_head" in out
    lora_line = [line for line in out.splitlines() if line.strip().startswith("language_model") and "(lora)" in line]
    assert lora_line and "161,480,704" in lora_line[0]  # rank 64 on all 7 linear layers x 28 layers
    # 6.53B nf4 weights (0.516 B each with double quantisation) + bf16 embeddings and lm_head (2 x 0.55B x 2 B)
    # + fp32 LoRA (0.16B x 4 B); the frozen vision tower stays bf16 (0.40B x 2 B), never upcast to fp32
    memory = {line.split()[0]: line.split() for line in out.splitlines()[out.splitlines().index(
        next(x for x in out.splitlines() if x.startswith("expected memory"))) + 1:][:4]}
    assert memory["language_model"][1] == "5.77" and memory["vision_tower"][1] == "0.77"
    assert memory["vision_tower"][3] == "0.00"  # frozen: no gradient, no optimizer state
    assert "token budget: 8192 tokens per micro-batch" in out and "activations ~3.3 GiB" in out


# ---------------------------------------------------------------------------------------------------------------
# ZeRO-3 with 2 CPU processes over gloo (the 8-GPU recipe's code path)


def _logged_groups(run):
    first = json.loads((run / "train_log.jsonl").read_text().splitlines()[0])
    return {g["group_name"]: g["lr"] for g in first["optimizer_groups"]}


@pytest.mark.slow
def test_zero3_lora_two_processes_saves_complete_adapter(zero3_lora_run, tmp_path):
    from lora_manip.checkpoints.merge import merge_adapter

    run = zero3_lora_run
    weights = load_file(run / "adapter_model.safetensors")
    assert weights and all(t.numel() > 0 for t in weights.values())
    assert any("multi_modal_projector" in k for k in weights)
    assert weights["base_model.model.model.image_newline"].numel() > 0  # gathered under ZeRO-3, where PEFT loads it
    ckpt = load_file(run / "checkpoint-4" / "adapter_model.safetensors")
    assert ckpt.keys() == weights.keys() and all(torch.equal(ckpt[k], weights[k]) for k in weights)
    assert _logged_groups(run) == {"language_model": 5e-3, "projector": 5e-3, "projector/no_decay": 5e-3}
    steps = [json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines() if '"loss"' in x]
    assert steps and all(r["lr/language_model"] > 0 and r["peak_mem_gb"] > 0.1 for r in steps)
    _, diff = merge_adapter(str(run), out=str(tmp_path / "merged"))
    assert diff < 1e-3


@pytest.mark.slow
def test_zero3_full_two_processes_saves_complete_model(tiny_model_dir, synth_dir, tmp_path):
    from transformers import LlavaOnevisionForConditionalGeneration

    run = train_two_processes(tmp_path, synth_dir, tiny_model_dir, method="full",
                               parts={"language_model": {"lr": 1e-4}, "projector": {"lr": 1e-3},
                                      "vision_tower": {"train": "frozen"}})
    trained = dict(LlavaOnevisionForConditionalGeneration.from_pretrained(run).named_parameters())
    base = dict(LlavaOnevisionForConditionalGeneration.from_pretrained(tiny_model_dir).named_parameters())
    assert trained.keys() == base.keys()
    for name, p in trained.items():
        assert p.shape == base[name].shape and p.numel() > 0, name
        changed = not torch.equal(p, base[name])
        assert changed == (part_of(name) != "vision_tower"), name
    ckpt = LlavaOnevisionForConditionalGeneration.from_pretrained(run / "checkpoint-2")
    assert all(torch.equal(p, trained[n]) for n, p in ckpt.named_parameters())
    assert _logged_groups(run)["language_model"] == 1e-4 and _logged_groups(run)["projector"] == 1e-3


def test_resume_after_interruption_matches_uninterrupted_run(tiny_model_dir, synth_dir, tmp_path):
    from transformers import TrainerCallback

    from lora_manip.train.workflow import build_trainer, run_training

    def recipe(out):
        return recipe_from_dict(tiny_recipe_dict(tiny_model_dir, synth_dir, out, train__max_steps=4,
                                                 train__save_steps=2, train__save_total_limit=None))

    straight = run_training(recipe(tmp_path / "straight"))

    class Crash(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                raise KeyboardInterrupt  # killed after checkpoint-2 was saved

    trainer = build_trainer(recipe(tmp_path / "resumed"))
    trainer.add_callback(Crash())
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert (tmp_path / "resumed" / "checkpoint-2" / "checkpoint_complete").is_file()
    # a save killed half-way: the folder exists, its marker does not; resume must ignore it
    half = tmp_path / "resumed" / "checkpoint-3"
    half.mkdir()
    (half / "adapter_model.safetensors").write_bytes(b"\0" * 10)
    resumed = run_training(recipe(tmp_path / "resumed"), resume=True)
    a = load_file(straight / "adapter_model.safetensors")
    b = load_file(resumed / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    # Same batches, optimizer, scheduler and RNG state: bit-identical results, image_newline included
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert "base_model.model.model.image_newline" in a
    base = load_file(tmp_path / "resumed" / "checkpoint-2" / "adapter_model.safetensors")
    assert any(not torch.equal(base[k], b[k]) for k in a)  # steps 3-4 really ran after the resume


def test_mezo_lowers_the_loss_without_backward(tiny_model_dir, synth_dir, tmp_path, monkeypatch):
    from lora_manip.train.workflow import build_trainer

    recipe = recipe_from_dict(tiny_recipe_dict(
        tiny_model_dir, synth_dir, tmp_path / "run", train__optimizer="mezo", train__max_steps=40,
        train__lr_scheduler="constant", train__per_device_batch_size=8, parts={"language_model": {"lr": 2e-3},
                                                                              "projector": {"lr": 2e-3}}))
    trainer = build_trainer(recipe)
    monkeypatch.setattr(torch.Tensor, "backward", lambda *a, **k: pytest.fail("MeZO must not call backward"))
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    with torch.no_grad():
        before = trainer.compute_loss(trainer.model, dict(batch)).item()
    trainer.train()
    with torch.no_grad():
        after = trainer.compute_loss(trainer.model, dict(batch)).item()
    print("mezo loss", before, after)
    assert after < before - 0.05, (before, after)


def test_sample_loss_reduction_counts_samples_across_accumulation(tiny_model_dir, synth_dir, tmp_path):
    from lora_manip.train.loss import loss_at_positions, positions_to_keep
    from lora_manip.train.workflow import build_trainer

    labels = torch.full((2, 5), -100)
    labels[0, 2:] = 3  # 3 supervised tokens
    other = torch.full((3, 5), -100)
    other[1, 4] = 3  # one supervised token in one of three samples
    batches = [{"labels": labels}, {"labels": other}]
    counted = {}
    for reduction in ("token", "sample"):
        recipe = recipe_from_dict(tiny_recipe_dict(tiny_model_dir, synth_dir, tmp_path / reduction,
                                                   train__loss_reduction=reduction, train__max_steps=2))
        trainer = build_trainer(recipe)
        counted[reduction] = int(trainer._get_num_items_in_batch(batches, torch.device("cpu")))
        # compute_loss reduces as the recipe says: the same forward, reduced by hand each way
        batch = next(iter(trainer.get_train_dataloader()))
        with torch.no_grad():
            got = trainer.compute_loss(trainer.model, dict(batch))
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            keep = positions_to_keep(batch["labels"])
            logits = trainer.model(**inputs, logits_to_keep=keep).logits
        for per_sample in (True, False):
            want = loss_at_positions(logits, batch["labels"], keep, per_sample=per_sample)
            if per_sample == (reduction == "sample"):
                torch.testing.assert_close(got, want)
            else:
                assert abs(got - want) > 1e-4  # the two reductions differ on this batch
        if reduction == "sample":
            trainer.train()  # and a real run trains with it
            assert trainer.state.global_step == 2
    assert counted == {"token": 4, "sample": 2}
