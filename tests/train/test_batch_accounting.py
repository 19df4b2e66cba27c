"""Honest batch accounting: under a token budget the log and --dry-run report the samples and tokens each optimizer
step really holds (as the trainer's dataloader yields them) and the real number of steps; the per-part learning
rates on a log line are those of the step transformers' `learning_rate` on the same line belongs to."""

import math

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from lora_manip.cli import app
from lora_manip.data.sampler import TokenBudgetBatchSampler, step_stats
from lora_manip.recipe import recipe_from_dict
from lora_manip.train.callbacks import part_lrs_and_memory
from lora_manip.train.plan import batch_accounting

from tests.conftest import tiny_recipe_dict


def _simulated_steps(batches, accumulation, world):
    """What accelerate + the Trainer do, written out: process p takes batches p, p + W, ...; each process steps
    after `accumulation` of its own batches, and once more for a remainder."""
    per_process = [batches[p::world] for p in range(world)]
    n_steps = math.ceil(len(per_process[0]) / accumulation)
    return [[b for p in per_process for b in p[k * accumulation:(k + 1) * accumulation]] for k in range(n_steps)]


@pytest.mark.parametrize("accumulation,world", [(1, 1), (2, 1), (3, 2), (2, 8)])
def test_step_stats_follow_how_the_trainer_consumes_batches(accumulation, world):
    rng = np.random.default_rng(0)
    has_images = rng.random(500) > 0.1
    tiles = np.where(has_images, rng.choice([3, 5], 500), 0)
    lengths = np.where(has_images, tiles * 600, 0) + rng.integers(30, 120, 500)
    batches = TokenBudgetBatchSampler(lengths, has_images, tiles, 16_384, 729, seed=1, world_size=world).batches(0)
    steps = _simulated_steps(batches, accumulation, world)
    stats = step_stats(batches, lengths, accumulation, world)
    samples = [sum(len(b) for b in s) for s in steps]
    tokens = [int(sum(lengths[b].sum() for b in s)) for s in steps]
    assert stats.steps == len(steps)
    assert stats.samples == (pytest.approx(np.mean(samples)), min(samples), max(samples))
    assert stats.tokens == (pytest.approx(np.mean(tokens)), min(tokens), max(tokens))
    assert sum(samples) == len(lengths)  # every sample in exactly one step


def _budget_recipe(tiny_model_dir, synth_dir, tmp_path, **over):
    return tiny_recipe_dict(tiny_model_dir, synth_dir, tmp_path / "run", train__max_tokens_per_batch=900,
                            train__gradient_accumulation_steps=2, train__max_steps=-1, train__epochs=2, **over)


def test_log_line_is_what_the_dataloader_yields(tiny_model_dir, synth_dir, tmp_path, caplog):
    """The run log's accounting line: samples per step and step count of the trainer's own dataloader, not
    per_device_batch_size x accumulation (4 x 2 = 8 in this recipe)."""
    import logging

    from lora_manip.train.workflow import build_trainer

    recipe = recipe_from_dict(_budget_recipe(tiny_model_dir, synth_dir, tmp_path))
    with caplog.at_level(logging.INFO, logger="lora_manip"):
        trainer = build_trainer(recipe)
    sizes = [len(b["labels"]) for b in trainer.get_train_dataloader()]  # padded rows: one per sample
    per_step = [sum(sizes[i:i + 2]) for i in range(0, len(sizes), 2)]
    line = batch_accounting(recipe, trainer.train_dataset, trainer.processor.num_image_tokens)
    assert f"per optimizer step {np.mean(per_step):.1f} samples (min {min(per_step)}, max {max(per_step)})" in line
    assert f"{len(per_step)} optimizer steps per epoch, {2 * len(per_step)} optimizer steps in all" in line
    assert max(per_step) != recipe.effective_batch_size or min(per_step) != recipe.effective_batch_size
    assert line in caplog.text and "effective batch size" not in caplog.text  # what the run logs


def test_dry_run_reports_samples_tokens_and_steps_under_a_budget(tiny_model_dir, synth_dir, tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(_budget_recipe(tiny_model_dir, synth_dir, tmp_path)))
    result = CliRunner().invoke(app, ["train", str(path), "--dry-run"])
    assert result.exit_code == 0, result.output
    line = next(x for x in result.output.splitlines() if x.startswith("batches: token budget 900"))
    assert "samples (min" in line and "tokens (min" in line and "optimizer steps in all (2 epoch(s))" in line
    assert "effective batch size" not in result.output  # the seed's fixed-batch figure would be wrong here
    assert not (tmp_path / "run").exists()


def test_dry_run_without_the_data_says_what_it_cannot_measure(tiny_model_dir, tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(_budget_recipe(tiny_model_dir, tmp_path / "nodata", tmp_path)))
    result = CliRunner().invoke(app, ["train", str(path), "--dry-run"])
    assert result.exit_code == 2, result.output  # the plan, then why the run would stop (tests/train/test_dry_run.py)
    assert "measured from the data, not here: the data cannot be read (last line)" in result.output
    assert result.output.splitlines()[-1].startswith("error: the run would stop on its data: annotation file not "
                                                     "found for 1 dataset(s) (train: train.json)")


# ------------------------------------------------------------------------------------------ learning rates


def _two_group_optimizer():
    from transformers import get_scheduler

    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([{"params": [a], "lr": 1e-3, "group_name": "language_model"},
                           {"params": [b], "lr": 1e-4, "group_name": "projector"}])
    return opt, get_scheduler("cosine", opt, num_warmup_steps=2, num_training_steps=10)


def test_part_rates_belong_to_the_step_of_learning_rate():
    """The Trainer's order: optimizer.step(), learning_rate read, scheduler.step(), then the log line. Each part's
    logged rate must be the one its group had during that optimizer.step()."""
    opt, sched = _two_group_optimizer()
    for _ in range(6):
        used = {g["group_name"]: g["lr"] for g in opt.param_groups}
        opt.step()
        learning_rate = sched.get_last_lr()[0]
        sched.step()
        logged = part_lrs_and_memory(opt, learning_rate)
        assert logged["lr/language_model"] == pytest.approx(learning_rate, rel=1e-12)
        for name, lr in used.items():
            assert logged[f"lr/{name}"] == pytest.approx(lr, rel=1e-12, abs=1e-15)


def test_trained_run_logs_part_rates_of_the_same_step(tiny_model_dir, synth_dir, tmp_path):
    import json

    from lora_manip.train.workflow import build_trainer

    recipe = recipe_from_dict(tiny_recipe_dict(tiny_model_dir, synth_dir, tmp_path / "run", train__max_steps=4,
                                               train__lr_scheduler="linear",
                                               parts__projector={"lr": 1e-3}))
    trainer = build_trainer(recipe)
    trainer.train()
    rows = [json.loads(x) for x in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r and "learning_rate" in r]
    assert len(rows) == 4 and rows[0]["learning_rate"] == pytest.approx(5e-3)  # step 1 trains at the full rate
    for r in rows:
        assert r["lr/language_model"] == pytest.approx(r["learning_rate"])
        assert r["lr/projector"] == pytest.approx(r["learning_rate"] * 1e-3 / 5e-3)
