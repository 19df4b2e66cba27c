"""GRPO (objective: grpo): reward values on hand-made answers, recipe validation, a short TRL run on the tiny model
with its outputs, logs, resume and merge (the learning proof, GRPO on the demo's model, is in test_demo.py)."""

from __future__ import annotations

import json
import math

import pytest

from lora_manip.errors import UserError
from lora_manip.recipe import recipe_from_dict
from lora_manip.train import rewards as R

from tests.conftest import tiny_recipe_dict

BOX = '{"current_bbox": [[0.1, 0.1], [0.5, 0.5]]}'
TRAJ = '{"future_traj": [[0.1, 0.1], [0.2, 0.2], [0.3, 0.3], [0.4, 0.4]]}'

# --------------------------------------------------------------------------------------------- reward values


def test_iou_and_bonus():
    assert R.iou_reward(BOX, BOX) == pytest.approx(1.0)
    assert R.iou_reward('{"current_bbox": [[0.1, 0.1], [0.3, 0.5]]}', BOX) == pytest.approx(0.5)
    assert R.iou_reward("[[0.6, 0.6], [0.9, 0.9]]", BOX) == 0.0  # disjoint
    assert R.iou_bonus_reward(BOX, BOX) == 1.0
    assert R.iou_bonus_reward('{"current_bbox": [[0.1, 0.1], [0.3, 0.5]]}', BOX) == 0.0  # IoU 0.5 is not > 0.5
    assert R.iou_bonus_reward('{"current_bbox": [[0.1, 0.1], [0.45, 0.5]]}', BOX) == 1.0


def test_point_distance_maps_to_unit_interval():
    gt = "[[0.5, 0.5]]"
    assert R.distance_reward("[[0.5, 0.5]]", gt) == pytest.approx(1.0)
    assert R.distance_reward("[[0.6, 0.5]]", gt, scale=0.1) == pytest.approx(math.exp(-1))
    assert 0 < R.distance_reward("[[1.0, 1.0]]", gt) < R.distance_reward("[[0.6, 0.5]]", gt)


def test_trajectory_dtw_and_frechet():
    assert R.dtw_reward(TRAJ, TRAJ) == pytest.approx(1.0)
    assert R.frechet_reward(TRAJ, TRAJ) == pytest.approx(1.0)
    shifted = '{"future_traj": [[0.2, 0.1], [0.3, 0.2], [0.4, 0.3], [0.5, 0.4]]}'
    # every point 0.1 off: DTW 0.4 over 4 ground-truth points -> exp(-0.1 / 0.1); Fréchet 0.1 -> exp(-1)
    assert R.dtw_reward(shifted, TRAJ, scale=0.1) == pytest.approx(math.exp(-1))
    assert R.frechet_reward(shifted, TRAJ, scale=0.1) == pytest.approx(math.exp(-1))


def test_choice_yesno_format_bleu():
    assert R.accuracy_reward("B", "B", kind="choice") == 1.0
    assert R.accuracy_reward("The answer is (B).", "B", kind="choice") == 1.0
    assert R.accuracy_reward("C", "B", kind="choice") == 0.0
    assert R.accuracy_reward("A or B", "B", kind="choice") == 0.0  # ambiguous: a parse failure
    assert R.accuracy_reward("Yes, it is.", "Yes", kind="yesno") == 1.0
    assert R.accuracy_reward("no", "Yes", kind="yesno") == 0.0
    assert R.format_reward("C", kind="choice") == 1.0
    assert R.format_reward("blue", kind="choice") == 0.0
    assert R.format_reward(BOX, kind="box") == 1.0
    assert R.format_reward("[[0.1, 0.1]", kind="box") == 0.0
    assert R.bleu_reward("pick up the red cube", "pick up the red cube") == pytest.approx(1.0)


def test_in_mask(tmp_path):
    from PIL import Image

    mask = Image.new("L", (10, 10), 0)
    mask.paste(255, (0, 0, 5, 10))  # left half
    mask.save(tmp_path / "m.png")
    assert R.in_mask_reward("[[0.2, 0.5]]", mask=str(tmp_path / "m.png")) == 1.0
    assert R.in_mask_reward("[[0.2, 0.5], [0.8, 0.5]]", mask=str(tmp_path / "m.png")) == 0.5
    assert R.in_mask_reward("[[0.2, 0.5]]", mask=None) == 0.0


@pytest.mark.parametrize("bad", ["", "   ", "garbage", None, 42, "[[nan, 0.1], [0.2, 0.2]]", "{" * 500])
def test_parse_failures_score_lowest_and_never_raise(bad):
    for name, (fn, kinds) in R.REWARDS.items():
        for kind in kinds:
            if kind == "planning" and isinstance(bad, str) and bad.strip():
                continue  # any text is a plan
            gt = {"box": BOX, "point": "[[0.5, 0.5]]", "trajectory": TRAJ, "choice": "B", "yesno": "Yes",
                  "planning": "pick it", "pointing": None}[kind]
            assert fn(bad, gt, kind=kind) == 0.0, (name, kind, bad)


def test_reward_funcs_apply_per_kind_with_weights():
    table = {"box": {"iou": 1.0, "format": 0.2}, "choice": {"accuracy": 2.0}}
    funcs = {f.__name__: f for f in R.make_reward_funcs(table)}
    assert set(funcs) == {"iou", "accuracy", "format"}
    completions = [[{"role": "assistant", "content": BOX}], "B", "nonsense"]
    gts, kinds = [BOX, "B", BOX], ["box", "choice", "box"]
    assert funcs["iou"](completions=completions, gt=gts, kind=kinds) == [pytest.approx(1.0), None, 0.0]
    assert funcs["accuracy"](completions=completions, gt=gts, kind=kinds) == [None, 2.0, None]
    assert funcs["format"](completions=completions, gt=gts, kind=kinds) == [pytest.approx(0.2), None, 0.0]


def test_mean_rewards_of_eval_predictions():
    recs = [{"pred": "B", "gt": "B", "task": "choice"}, {"pred": "x", "gt": "C", "task": "choice"},
            {"pred": BOX, "gt": BOX, "task": "current_bbox"}]
    out = R.mean_rewards(recs, {"choice": {"accuracy": 1.0, "format": 0.1}})
    assert out == {"choice": pytest.approx(0.55), "all": pytest.approx(0.55)}


# --------------------------------------------------------------------------------------------- recipe


def _grpo_dict(model_dir, data_dir, out_dir, **over):
    raw = tiny_recipe_dict(model_dir, data_dir, out_dir, **over)
    raw["objective"] = "grpo"
    raw.setdefault("grpo", {}).update(num_generations=4, max_completion_length=8)
    return raw


def test_recipe_validation(tmp_path):
    raw = tiny_recipe_dict(tmp_path, tmp_path, tmp_path / "o")
    assert recipe_from_dict(raw).objective == "sft" and recipe_from_dict(raw).grpo is None
    with pytest.raises(UserError, match="grpo: set, but objective is sft"):
        recipe_from_dict({**raw, "grpo": {"beta": 0.1}})
    with pytest.raises(UserError, match="model.adapter: only used with objective: grpo"):
        recipe_from_dict({**raw, "model": {**raw["model"], "adapter": str(tmp_path)}})
    g = _grpo_dict(tmp_path, tmp_path, tmp_path / "o")
    assert recipe_from_dict(g).grpo.beta == 0.04
    from lora_manip.train.grpo import grpo_arguments

    sampling = recipe_from_dict({**g, "grpo": {**g["grpo"], "top_k": 3, "min_p": 0.1}})
    args = grpo_arguments(sampling)
    assert (args.top_k, args.min_p, args.temperature) == (3, 0.1, 1.0)  # what TRL's sampler reads
    with pytest.raises(UserError, match="grpo.top_k"):
        recipe_from_dict({**g, "grpo": {**g["grpo"], "top_k": -1}})
    with pytest.raises(UserError, match="create_synthetic_if_missing.tasks"):
        recipe_from_dict({**g, "data": {**g["data"], "create_synthetic_if_missing": {"tasks": ["gripper"]}}})
    with pytest.raises(UserError, match="grpo.loss_type"):
        recipe_from_dict({**g, "grpo": {**g["grpo"], "loss_type": "ppo"}})
    g["grpo"].update(num_generations=3, rewards={"box": {"accuracy": 1.0}, "cats": {"iou": 1}})
    with pytest.raises(UserError) as e:
        recipe_from_dict(g)
    msg = str(e.value)
    for want in ("grpo.rewards.box.accuracy: does not apply to box answers", "grpo.rewards.cats: unknown task kind",
                 "grpo.num_generations: 3 must divide"):
        assert want in msg


def test_cli_refuses_bad_grpo_recipe(tmp_path):
    import subprocess
    import sys

    import yaml

    g = _grpo_dict(tmp_path, tmp_path, tmp_path / "o")
    g["grpo"]["temperature"] = -1
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(g))
    p = subprocess.run([sys.executable, "-m", "lora_manip.cli", "train", str(tmp_path / "r.yaml")],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 2 and "grpo.temperature" in p.stderr and "Traceback" not in p.stderr


def test_missing_adapter_and_string_template_refused(tmp_path, tiny_model_dir, chatml_model_dir, synth_dir):
    from lora_manip.train.workflow import run_training

    g = _grpo_dict(tiny_model_dir, synth_dir, tmp_path / "o1")
    g["model"]["adapter"] = str(tmp_path / "nope")
    g.pop("lora")  # the adapter's own settings are used: a lora block would be refused (below)
    with pytest.raises(UserError, match="model.adapter: .* is not an adapter folder"):
        run_training(recipe_from_dict(g))
    with pytest.raises(UserError, match="typed content parts"):
        run_training(recipe_from_dict(_grpo_dict(chatml_model_dir, synth_dir, tmp_path / "o2")))


# --------------------------------------------------------------------------------------------- a short run


def _log(out):
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def test_grpo_run_outputs_logs_resume_merge(tmp_path, tiny_model_dir, synth_dir):
    from lora_manip.checkpoints.merge import merge_adapter
    from lora_manip.train.workflow import run_training

    out = tmp_path / "run"
    g = _grpo_dict(tiny_model_dir, synth_dir, out, train__max_steps=2, train__save_steps=1)
    g["grpo"]["max_completion_length"] = 4  # an untrained model fills every completion: keep them short
    g["data"]["val"] = [{"annotation_path": str(synth_dir / "val.json"), "data_path": str(synth_dir)}]
    run_training(recipe_from_dict(g))
    for f in ("adapter_config.json", "adapter_model.safetensors", "processor_config.json",
              "chat_template.json", "recipe.yaml", "loss.png", "reward.png", "grpo_eval.json", "run_complete.json",
              "checkpoint-2/checkpoint_complete"):
        assert (out / f).is_file(), f
    assert not (out / "ref").exists()  # TRL's frozen reference copy is not part of the result
    steps = [r for r in _log(out) if "reward" in r]
    keys = set().union(*steps)
    for k in ("reward", "rewards/format/mean", "frac_reward_zero_std", "completions/mean_length", "kl",
              "lr/language_model", "generation/tokens_per_s", "peak_mem_gb"):
        assert k in keys, k
    assert any(k.startswith("reward_by_kind/") for k in keys)
    assert all(r["generation/tokens_per_s"] > 0 and r["peak_mem_gb"] > 0.1 for r in steps)
    evals = json.loads((out / "grpo_eval.json").read_text())
    assert "eval_reward" in evals["start"] and "eval_reward" in evals["end"]

    run_training(recipe_from_dict({**g, "train": {**g["train"], "max_steps": 3}}), resume=True)
    assert max(r["step"] for r in _log(out)) == 3
    merged, diff = merge_adapter(str(out))
    assert (merged / "config.json").is_file() and diff is not None and diff < 1e-3


def test_grpo_continues_sft_adapter(tmp_path, tiny_model_dir, synth_dir):
    """model.adapter: the SFT adapter trains further and the result is an adapter on the same base."""
    from lora_manip.model.adapters import adapter_base
    from lora_manip.train.workflow import run_training

    sft = tmp_path / "sft"
    run_training(recipe_from_dict(tiny_recipe_dict(tiny_model_dir, synth_dir, sft, train__max_steps=2)))
    g = _grpo_dict(tiny_model_dir, synth_dir, tmp_path / "grpo", train__max_steps=1)
    g["model"]["adapter"] = str(sft)
    g["grpo"]["rewards"] = {"choice": {"accuracy": 1.0, "format": 0.1}}
    g["lora"] = {"r": 64}
    with pytest.raises(UserError, match="lora: not read with model.adapter"):  # it would not change the rank
        recipe_from_dict(g)
    g.pop("lora")
    out = run_training(recipe_from_dict(g))
    assert adapter_base(out) == adapter_base(sft)
    assert not (out / "ref").exists()
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 8


# --------------------------------------------------------------------------------------------- one skeleton


def test_sft_and_grpo_build_the_same_capped_processor_model_and_trainable_parts(tmp_path, tiny_model_dir,
                                                                               synth_dir):
    """The same recipe under both objectives goes through one build: the processor capped by data.max_image_tiles
    (the one TRL tiles GRPO's prompts with too), the model given that grid, the same parts and the same trainable
    parameters. A capped GRPO run that trained uncapped would be evaluated on another grid than it trained on."""
    from lora_manip.data.processor import load_processor
    from lora_manip.model.layouts import part_of, unwrap_peft
    from lora_manip.train.workflow import build_trainer

    capped = load_processor(tiny_model_dir, 4).image_processor.image_grid_pinpoints
    assert capped != load_processor(tiny_model_dir).image_processor.image_grid_pinpoints  # the cap drops grids
    over = dict(data__max_image_tiles=4, train__max_steps=1, parts={"vision_tower": {"train": "full"}})
    sft = build_trainer(recipe_from_dict(tiny_recipe_dict(tiny_model_dir, synth_dir, tmp_path / "sft", **over)))
    g = _grpo_dict(tiny_model_dir, synth_dir, tmp_path / "grpo", **over)
    g["grpo"]["max_completion_length"] = 4
    grpo = build_trainer(recipe_from_dict(g))
    assert grpo.processing_class is grpo.processor  # what TRL makes pixel values with
    for t in (sft, grpo):
        assert [list(p) for p in t.processor.image_processor.image_grid_pinpoints] == [list(p) for p in capped]
        assert t.model.config.image_grid_pinpoints == [list(p) for p in capped]
    assert sft.processor.image_processor.to_dict() == grpo.processor.image_processor.to_dict()
    assert (sft.processor.chat_template, sft.processor.num_image_tokens) == \
        (grpo.processor.chat_template, grpo.processor.num_image_tokens)

    def params(t):  # TRL's frozen reference copy of the adapter ("ref") is GRPO's own and left out
        return {n: (p.requires_grad, p.dtype, tuple(p.shape)) for n, p in t.model.named_parameters()
                if ".ref." not in n}

    assert params(sft) == params(grpo)
    assert {part_of(unwrap_peft(n)) for n, (trained, *_) in params(grpo).items() if trained} == \
        {"language_model", "projector", "vision_tower"}
    grpo.train()  # TRL's capped pixel values fit the policy's grid
    assert grpo.state.global_step == 1
