"""Length-grouped batching: batches of samples of similar length, never mixing samples with and without images
(as long as each kind fills whole batches), so little of each batch is padding.

Samples are shuffled within their kind (image / text-only), cut into mega-batches of `batch_size * mega` samples,
each sorted by length and cut into batches; batch order is then shuffled, with the batch holding the longest
sample first (an out-of-memory shows at step 1, not hours in). The sampler yields a flat index stream in which
every consecutive `batch_size` indices are one such batch, which is what the Trainer's DataLoader (and
accelerate's per-process sharding of whole batches) consumes. The order depends only on (seed, epoch);
`set_epoch` is called by the Trainer/accelerate each epoch (without it, each new iteration is the next epoch).
The only incomplete batches (one per kind at most) come last.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch

log = logging.getLogger(__name__)


def padding_efficiency(lengths: Sequence[int] | np.ndarray, batches: Sequence[Sequence[int]]) -> float:
    """Real tokens / all tokens when each batch is padded to its own longest sample."""
    lengths = np.asarray(lengths)
    real = padded = 0
    for b in batches:
        b = np.asarray(b, dtype=np.int64)
        if len(b) == 0:
            continue
        ls = lengths[b]
        real += int(ls.sum())
        padded += int(ls.max()) * len(b)
    return real / padded if padded else 1.0


def random_batches(n: int, batch_size: int, seed: int = 0) -> list[np.ndarray]:
    """Batches of a plain shuffled order (what a RandomSampler gives), for comparison."""
    order = np.random.default_rng(seed).permutation(n)
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


class GroupedSampler(torch.utils.data.Sampler):
    def __init__(self, lengths, has_images, batch_size: int, seed: int = 0, mega: int = 64):
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.has_images = np.asarray(has_images, dtype=bool)
        if self.lengths.shape != self.has_images.shape:
            raise ValueError("lengths and has_images differ in size")
        self.batch_size, self.seed, self.mega = batch_size, seed, mega
        self.epoch = 0
        self._explicit_epoch = False

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self._explicit_epoch = epoch, True

    def __len__(self) -> int:
        return len(self.lengths)

    def batches(self, epoch: int) -> list[np.ndarray]:
        rng = np.random.default_rng([self.seed, epoch])
        full, partial = [], []
        size = self.batch_size * self.mega
        for kind in (True, False):  # with images, text-only
            idx = np.flatnonzero(self.has_images == kind)
            idx = idx[rng.permutation(len(idx))]
            for lo in range(0, len(idx), size):
                mb = idx[lo:lo + size]
                mb = mb[np.argsort(-self.lengths[mb], kind="stable")]
                for b in range(0, len(mb), self.batch_size):
                    chunk = mb[b:b + self.batch_size]
                    (full if len(chunk) == self.batch_size else partial).append(chunk)
        order = rng.permutation(len(full))
        full = [full[i] for i in order]
        if full:
            longest = max(range(len(full)), key=lambda i: int(self.lengths[full[i]].max()))
            full.insert(0, full.pop(longest))
        return full + partial

    def __iter__(self) -> Iterator[int]:
        epoch = self.epoch
        if not self._explicit_epoch:
            self.epoch += 1  # nobody calls set_epoch: the next iteration is the next epoch
        for b in self.batches(epoch):
            yield from (int(i) for i in b)


def grouped_sampler(dataset, batch_size: int, seed: int = 0) -> GroupedSampler:
    """The Trainer's train sampler for a ManipDataset (uses `dataset.lengths` / `dataset.has_images`); logs the
    padding efficiency it achieves against random order."""
    sampler = GroupedSampler(dataset.lengths, dataset.has_images, batch_size, seed)
    if len(sampler):
        grouped = padding_efficiency(sampler.lengths, sampler.batches(0))
        rand = padding_efficiency(sampler.lengths, random_batches(len(sampler), batch_size, seed))
        log.info("padding efficiency (real / all tokens) at batch size %d: %.1f%% length-grouped, %.1f%% in random "
                 "order", batch_size, 100 * grouped, 100 * rand)
    return sampler


# ------------------------------------------------------------------------------------------ token budgets


def batch_cost(lengths: np.ndarray, tiles: np.ndarray, tile_tokens: int, packing: bool) -> int:
    """What one micro-batch costs, in tokens: the LM's (each row padded to the longest, or the packed total) plus
    the vision tower's (each tile is `tile_tokens` patches through every SigLIP layer)."""
    lm = int(lengths.sum()) if packing else int(lengths.max()) * len(lengths)
    return lm + int(tiles.sum()) * tile_tokens


class TokenBudgetBatchSampler(torch.utils.data.Sampler):
    """Micro-batches filled up to `budget` tokens (`batch_cost`) instead of a fixed number of samples, so a step's
    memory is bounded by the budget, not by the worst images a fixed-size batch can draw.

    Samples are shuffled within their kind (image / text-only), cut into mega-chunks, each sorted by length and
    filled greedily, so batches hold samples of similar length (little padding). A sample that alone exceeds the
    budget is a batch of its own (it fits model_max_length, so it must train; `over_budget` counts them).
    Batch order is shuffled, the costliest batch first (an out-of-memory shows at step 1). Seeded by (seed,
    epoch): a resumed run skips exactly the batches it already trained on. The number of batches is made a
    multiple of `world_size` by splitting the largest multi-sample batches, so every process runs the same number
    of micro-batches per step (no process waits at a collective for a batch that never comes)."""

    def __init__(self, lengths, has_images, tiles, budget: int, tile_tokens: int, seed: int = 0,
                 packing: bool = False, world_size: int = 1, mega: int = 4096):
        if budget < 1:
            raise ValueError("budget must be >= 1")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.has_images = np.asarray(has_images, dtype=bool)
        self.tiles = np.asarray(tiles, dtype=np.int64)
        self.budget, self.tile_tokens, self.seed, self.packing = budget, tile_tokens, seed, packing
        self.world_size, self.mega = max(1, world_size), mega
        self.epoch = 0
        self._explicit_epoch = False
        self.over_budget = int(sum(batch_cost(self.lengths[i:i + 1], self.tiles[i:i + 1], tile_tokens, packing)
                                   > budget for i in range(len(self.lengths))))

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self._explicit_epoch = epoch, True

    def _fill(self, order: np.ndarray) -> list[np.ndarray]:
        out, cur, longest, lm_sum, tiles = [], [], 0, 0, 0
        for i in order:
            n, t = int(self.lengths[i]), int(self.tiles[i])
            lm = (lm_sum + n) if self.packing else max(longest, n) * (len(cur) + 1)
            if cur and lm + (tiles + t) * self.tile_tokens > self.budget:
                out.append(np.asarray(cur, dtype=np.int64))
                cur, longest, lm_sum, tiles = [], 0, 0, 0
            cur.append(int(i))
            longest, lm_sum, tiles = max(longest, n), lm_sum + n, tiles + t
        if cur:
            out.append(np.asarray(cur, dtype=np.int64))
        return out

    def batches(self, epoch: int) -> list[np.ndarray]:
        rng = np.random.default_rng([self.seed, epoch])
        out: list[np.ndarray] = []
        for kind in (True, False):
            idx = np.flatnonzero(self.has_images == kind)
            idx = idx[rng.permutation(len(idx))]
            for lo in range(0, len(idx), self.mega):
                chunk = idx[lo:lo + self.mega]
                out += self._fill(chunk[np.argsort(-self.lengths[chunk], kind="stable")])
        while len(out) % self.world_size and any(len(b) > 1 for b in out):
            k = max((i for i in range(len(out)) if len(out[i]) > 1), key=lambda i: len(out[i]))
            b = out.pop(k)
            out += [b[: len(b) // 2], b[len(b) // 2:]]
        out = [out[i] for i in rng.permutation(len(out))]
        if out:
            cost = [batch_cost(self.lengths[b], self.tiles[b], self.tile_tokens, self.packing) for b in out]
            out.insert(0, out.pop(int(np.argmax(cost))))
        return out

    def __len__(self) -> int:
        return len(self.batches(self.epoch))

    def __iter__(self) -> Iterator[list[int]]:
        epoch = self.epoch
        if not self._explicit_epoch:
            self.epoch += 1
        for b in self.batches(epoch):
            yield [int(i) for i in b]


def token_budget_sampler(dataset, budget: int, tile_tokens: int, seed: int = 0, packing: bool = False,
                         world_size: int = 1, accumulation: int = 1) -> TokenBudgetBatchSampler:
    sampler = TokenBudgetBatchSampler(dataset.lengths, dataset.has_images, dataset.tiles, budget, tile_tokens, seed,
                                      packing, world_size)
    batches = sampler.batches(0)
    if batches:
        sizes = np.asarray([len(b) for b in batches])
        log.info("token budget %d (%s): %d micro-batches per epoch, %.1f samples each (min %d, max %d)%s; %s", budget,
                 "packed rows" if packing else "padded rows", len(batches), sizes.mean(), sizes.min(), sizes.max(),
                 f"; {sampler.over_budget} sample(s) exceed the budget alone and train on their own"
                 if sampler.over_budget else "",
                 step_stats(batches, sampler.lengths, accumulation, world_size).describe())
    return sampler


# ------------------------------------------------------------------------------- what an optimizer step holds


@dataclass(frozen=True)
class StepStats:
    """Samples and tokens (the LM's, image tokens included, padding not) per optimizer step over one epoch's
    batches, and the optimizer steps of that epoch. Under a token budget a step holds as many samples as fit, so
    the recipe's per_device_batch_size x accumulation x processes says nothing about it; this is what it is."""

    steps: int
    samples: tuple[float, int, int]  # mean, min, max per optimizer step
    tokens: tuple[float, int, int]

    def describe(self) -> str:
        (sm, s0, s1), (tm, t0, t1) = self.samples, self.tokens
        return (f"per optimizer step {sm:.1f} samples (min {s0}, max {s1}), {tm:,.0f} tokens (min {t0:,}, max "
                f"{t1:,}); {self.steps} optimizer steps per epoch")


def step_stats(batches: Sequence[Sequence[int]], lengths, accumulation: int, world_size: int) -> StepStats:
    """What each optimizer step holds when `batches` (in order) are trained with `accumulation` micro-batches per
    process and `world_size` processes. accelerate hands process p the batches p, p + W, ...; the Trainer steps
    after every `accumulation` of a process's batches and once more for a remainder (ceil), so step k is the
    global batches [k*A*W, (k+1)*A*W)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    per_step = max(1, accumulation) * max(1, world_size)
    groups = [batches[i:i + per_step] for i in range(0, len(batches), per_step)]
    if not groups:
        return StepStats(0, (0.0, 0, 0), (0.0, 0, 0))
    samples = np.asarray([sum(len(b) for b in g) for g in groups])
    tokens = np.asarray([sum(int(lengths[np.asarray(b, dtype=np.int64)].sum()) for b in g) for g in groups])
    return StepStats(len(groups), (float(samples.mean()), int(samples.min()), int(samples.max())),
                     (float(tokens.mean()), int(tokens.min()), int(tokens.max())))
