"""Length-grouped sampling: deterministic, complete, modality-pure batches, less padding than random order."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lora_manip.data.collate import Collator
from lora_manip.data.dataset import build_datasets
from lora_manip.data.sampler import GroupedSampler, grouped_sampler, padding_efficiency, random_batches
from lora_manip.recipe import recipe_from_dict


def test_padding_efficiency_is_real_over_padded():
    lengths = [10, 5, 8, 8]
    assert padding_efficiency(lengths, [[0, 1], [2, 3]]) == pytest.approx(31 / (20 + 16))
    assert padding_efficiency(lengths, [[0], [1], [2], [3]]) == 1.0


def _batches(sampler, epoch):
    sampler.set_epoch(epoch)
    order = list(sampler)
    return [order[i:i + sampler.batch_size] for i in range(0, len(order), sampler.batch_size)]


def test_grouped_sampler_order():
    rng = np.random.default_rng(0)
    lengths = rng.integers(20, 3000, size=203)
    images = rng.random(203) < 0.6
    s = GroupedSampler(lengths, images, batch_size=8, seed=3, mega=4)
    b0 = _batches(s, 0)
    assert sorted(i for b in b0 for i in b) == list(range(203))  # every sample once
    full = [b for b in b0 if len(b) == 8]
    assert len(full) >= 203 // 8 - 1 and all(len(set(images[b].tolist())) == 1 for b in full)  # never mixed
    assert max(lengths[b0[0]]) == lengths.max()  # the longest batch first
    assert _batches(GroupedSampler(lengths, images, 8, seed=3, mega=4), 0) == b0  # same seed and epoch
    assert _batches(s, 1) != b0 and _batches(s, 0) == b0
    assert _batches(GroupedSampler(lengths, images, 8, seed=4, mega=4), 0) != b0


def test_without_set_epoch_each_pass_is_the_next_epoch():
    s = GroupedSampler(np.arange(40), np.zeros(40, bool), batch_size=4)
    first, second = list(s), list(s)
    assert first != second and second == [int(i) for b in s.batches(1) for i in b]


@pytest.fixture(scope="module")
def mixture(synth_dir, processor, tmp_path_factory):
    """The synthetic set (three image sizes) mixed with text-only planning questions of varied length."""
    folder = tmp_path_factory.mktemp("text")
    words = "grasp the cup then lift it and place it on the plate".split()
    recs = [{"id": f"t{i}", "conversations": [
        {"from": "human", "value": "Plan the task: " + " ".join(words[: 3 + i % 9])},
        {"from": "gpt", "value": " ".join(words * (1 + i % 5))}]} for i in range(30)]
    (folder / "plan.jsonl").write_text("\n".join(json.dumps(r) for r in recs))
    r = recipe_from_dict({"model": {"path": "m"}, "method": "lora", "train": {"output_dir": "o"}, "data": {
        "train": [{"annotation_path": str(synth_dir / "train.json"), "data_path": str(synth_dir)},
                  {"annotation_path": str(folder / "plan.jsonl"), "data_path": str(folder)}]}})
    train, _ = build_datasets(r.data, processor, seed=0)
    return train


def test_grouped_beats_random_order_on_the_synthetic_mixture(mixture, caplog):
    assert mixture.has_images.any() and not mixture.has_images.all()
    with caplog.at_level("INFO"):
        sampler = grouped_sampler(mixture, batch_size=4, seed=0)
    assert "padding efficiency" in caplog.text
    grouped = np.mean([padding_efficiency(mixture.lengths, sampler.batches(e)) for e in range(3)])
    rand = np.mean([padding_efficiency(mixture.lengths, random_batches(len(mixture), 4, e)) for e in range(3)])
    assert grouped > rand + 0.1, (grouped, rand)


def test_dataloader_batches_are_padded_to_their_own_longest(mixture, processor):
    sampler = GroupedSampler(mixture.lengths, mixture.has_images, 4, seed=0)
    loader = torch.utils.data.DataLoader(mixture, batch_size=4, sampler=sampler, collate_fn=Collator(processor))
    order = [int(i) for b in sampler.batches(0) for i in b]
    for k, batch in zip(range(3), loader):
        idx = order[4 * k: 4 * k + 4]
        assert batch["input_ids"].shape[1] == max(mixture.lengths[idx])
        assert batch["attention_mask"].sum().item() == sum(mixture.lengths[idx])
