"""The recipe's datasets -> a torch Dataset of token ids + labels + images (collate.py batches them).

Lazy: the dataset holds, per record it trains on, a position in its file's `RecordIndex` (byte offsets), its exact
length and whether it has images (numpy arrays), never decoded records or pixels. A record is decoded and
tokenised in `__getitem__`; images are decoded by the collator in the DataLoader workers.

At start every record used is read once (scan.py: the same checks as `lora-manip data check`, cached by
scan_cache.py) and measured exactly (encode.token_lengths: image tokens included, from the image header). A sample
longer than `model_max_length` is dropped (`on_too_long: drop`), never cut, and counted with its reason.
Broken records stop the run (all listed) unless the recipe sets `skip_bad_records: true`, which drops them and logs
a count per reason. Sampling (`sample`, `name%NN`) and validation splits (`val_fraction`) are seeded.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import UserError
from .encode import Chat, encode, token_lengths
from .images import image_size
from .processor import image_tiles
from .records import PROBLEM_KINDS, Problem, RecordIndex, Sample, problem_summary, to_sample
from .scan_cache import cached_scan

log = logging.getLogger(__name__)


def too_long_reason(max_length: int) -> str:
    return f"longer than model_max_length {max_length}"


# -------------------------------------------------------------------------------------- sampling and splits


def seeded_rng(seed: int, *parts) -> np.random.Generator:
    """A generator that depends only on the seed and the given labels (e.g. the annotation file and purpose), so a
    dataset's sample / split does not change when other datasets are added or reordered."""
    digest = hashlib.sha256(repr((seed,) + tuple(str(p) for p in parts)).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def subset_size(n: int, sample: float | None) -> int:
    if sample is None:
        return n
    return min(n, round(n * sample)) if sample <= 1 else min(int(sample), n)


def choose_subset(positions: np.ndarray, sample: float | None, rng: np.random.Generator) -> np.ndarray:
    """Upstream's `name%NN`: a seeded random fraction (<= 1) or count (> 1) of the positions, file order kept."""
    k = subset_size(len(positions), sample)
    if k == len(positions):
        return positions
    return np.sort(positions[rng.choice(len(positions), size=k, replace=False)])


def split_validation(positions: np.ndarray, fraction: float, rng: np.random.Generator
                     ) -> tuple[np.ndarray, np.ndarray]:
    """(val, train): a seeded `fraction` of the positions (at least one when there are two or more) and the rest."""
    n = len(positions)
    k = min(max(round(n * fraction), 1 if n >= 2 else 0), max(n - 1, 0))
    mask = np.zeros(n, dtype=bool)
    mask[rng.choice(n, size=k, replace=False)] = True
    return positions[mask], positions[~mask]


# ------------------------------------------------------------------------------------------ lazy sequences


class IndexedSamples(Sequence):
    """The samples of one annotation file at the given index positions, decoded on access."""

    def __init__(self, index: RecordIndex, data_root: str, positions: np.ndarray, name: str | None = None):
        self.index, self.data_root, self.name = index, str(data_root), name
        self.positions = np.asarray(positions, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i: int) -> Sample:
        pos = int(self.positions[i])
        s = to_sample(self.index.read(pos), str(self.index.path), self.index.where(pos), self.data_root)
        if isinstance(s, Problem):
            raise UserError(f"{s} (the record changed since training started)")
        if self.name:
            s.extra["dataset"] = self.name
        return s


class ConcatSamples(Sequence):
    def __init__(self, parts: list[Sequence]):
        self.parts = parts
        self.ends = np.cumsum([len(p) for p in parts], dtype=np.int64)

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def __getitem__(self, i: int) -> Sample:
        if not 0 <= i < len(self):
            raise IndexError(i)
        k = int(np.searchsorted(self.ends, i, side="right"))
        return self.parts[k][i - (int(self.ends[k - 1]) if k else 0)]


# --------------------------------------------------------------------------------------------------- dataset


class ManipDataset(torch.utils.data.Dataset):
    """Samples -> {"input_ids", "labels", "images", "id"}.

    `samples` is any sequence of Samples: a list (tests, small sets) or the lazy per-file views build_datasets
    makes. Without `lengths`, every sample is measured here and the ones over `max_length` are dropped (counted
    in `dropped`). `lengths` (int32) and `has_images` (bool) are what the length-grouped sampler reads.
    """

    def __init__(self, samples: Sequence[Sample], chat: Chat, max_length: int,
                 lengths=None, has_images=None, dropped: Counter | None = None, tiles=None):
        self.chat = chat
        self.max_length = max_length
        self.dropped = Counter(dropped or {})
        if lengths is None:
            items = [(s, [image_size(p, s) for p in s.images]) for s in samples]
            measured = []
            for lo in range(0, len(items), 256):
                measured += token_lengths(chat, items[lo:lo + 256])
            keep = [i for i, n in enumerate(measured) if n <= max_length]
            if len(keep) < len(items):
                # Never cut: a cut sample loses its answer or splits an image's tokens.
                self.dropped[too_long_reason(max_length)] += len(items) - len(keep)
            samples = [samples[i] for i in keep]
            lengths = [measured[i] for i in keep]
            has_images = [bool(samples[i].images) for i in range(len(samples))]
            tiles = [image_tiles(chat.processor, items[i][1]) for i in keep]
        self.samples = samples
        self.lengths = np.asarray(lengths, dtype=np.int32)
        self.has_images = np.asarray(has_images, dtype=bool)
        # vision-tower tiles per sample, for token-budget batches (data/sampler.py)
        self.tiles = np.asarray(tiles if tiles is not None else self.has_images, dtype=np.int32)
        if len(self.samples) != len(self.lengths) or len(self.lengths) != len(self.has_images):
            raise ValueError("samples, lengths and has_images differ in size")
        if not len(self.samples):
            raise UserError(f"no sample fits model_max_length {max_length}: dropped {dict(self.dropped)}")

    def _encode(self, s: Sample) -> dict:
        sizes = [image_size(p, s) for p in s.images]
        return encode(s, self.chat, sizes) | {"images": s.images, "id": s.id}

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        s = self.samples[i]
        enc = self._encode(s)
        # The sampler and the length filter trusted the measured length: an encoding that differs from it means
        # the record, its images or the template changed under the run (or a measuring bug), never a silent pass.
        if len(enc["input_ids"]) != self.lengths[i]:
            raise UserError(f"{s.source} id={s.id!r}: encoded to {len(enc['input_ids'])} tokens, measured "
                            f"{int(self.lengths[i])} before training (the record or its images changed since "
                            "training started?)")
        return enc


@dataclass
class _Part:
    """One dataset's contribution to a split: which records of which file."""

    label: str  # "data.train[0] rh20t_vla_current_box_train" for messages
    name: str | None
    index: RecordIndex
    data_root: str
    positions: np.ndarray
    note: str  # how the positions were chosen, for the log


def _parts_of(datasets: list, seed: int, role: str) -> tuple[list[_Part], list[_Part]]:
    """(parts for this role, validation parts split off train entries by val_fraction)."""
    parts, held_out = [], []
    for i, d in enumerate(datasets):
        label = f"data.{role}[{i}]" + (f" {d.name}" if d.name else "")
        try:
            index = RecordIndex(d.annotation_path)
        except UserError as e:
            raise UserError(f"{label}: {e}") from None
        positions = np.arange(len(index), dtype=np.int64)
        note = f"{len(index)} in file"
        fraction = getattr(d, "val_fraction", None)
        if role == "train" and fraction:
            val, positions = split_validation(positions, fraction, seeded_rng(seed, d.annotation_path, "val"))
            held_out.append(_Part(f"{label} (val_fraction {fraction})", d.name, index, d.data_path, val,
                                  f"{len(val)} held out of {len(index)}"))
            note += f", {len(val)} held out for validation"
        sample = getattr(d, "sample", None)
        if sample is not None:
            positions = choose_subset(positions, sample, seeded_rng(seed, d.annotation_path, "sample"))
            note += f", {len(positions)} sampled ({sample:g})"
        parts.append(_Part(label, d.name, index, d.data_path, positions, note))
    return parts, held_out


def _assemble(parts: list[_Part], chat: Chat, max_length: int, skip_bad_records: bool, min_traj_points: int,
              workers: int | None, split: str) -> ManipDataset:
    fatal = [p for part in parts for p in part.index.problems]
    if fatal:
        raise UserError(f"{split} data cannot be read:\n" + "\n".join(f"  - {p}" for p in fatal[:20]))
    problems: list[Problem] = []
    views, lengths, has_images, tiles, dropped = [], [], [], [], Counter()
    for part in parts:
        r = cached_scan(part.index, part.data_root, part.positions, chat, min_traj_points, workers)
        problems += r.problems
        for w in r.warnings[:5]:
            log.warning("%s: %s", split, w)
        if len(r.warnings) > 5:
            log.warning("%s: ... and %d more images reached through symlinks leading out of %s", split,
                        len(r.warnings) - 5, part.data_root)
        fits = r.lengths <= max_length
        n_long = int((~fits).sum())
        if n_long:
            dropped[too_long_reason(max_length)] += n_long
        bad_kinds: Counter = Counter()  # per record, by its first problem's kind (a record may have several)
        seen = set()
        for p in r.problems:
            key = (p.where, p.record_id)
            if key not in seen:
                seen.add(key)
                bad_kinds[p.kind] += 1
        views.append(IndexedSamples(part.index, part.data_root, r.positions[fits], part.name))
        lengths.append(r.lengths[fits])
        has_images.append(r.n_images[fits] > 0)
        tiles.append(r.tiles[fits] if r.tiles is not None else r.n_images[fits])
        kept = int(fits.sum())
        log.info("%s %s: %s; %d used%s%s", split, part.label, part.note, kept,
                 f", {n_long} dropped as {too_long_reason(max_length)}" if n_long else "",
                 f", {r.bad_records} bad" if r.bad_records else "")
        for kind, n in bad_kinds.items():
            dropped[f"bad record: {PROBLEM_KINDS.get(kind, kind)}"] += n
    if problems and not skip_bad_records:
        raise UserError(
            f"{len(problems)} problem(s) in the {split} data; {problem_summary(problems)}\n"
            "Run `lora-manip data check RECIPE` for the full report, fix the records, or set "
            "data.skip_bad_records: true to train without them (each skipped record is counted in the log).")
    if problems:
        for reason, n in dropped.items():
            if reason.startswith("bad record"):
                log.warning("%s: skipped %d %s (data.skip_bad_records is true)", split, n, reason)
        for p in problems[:20]:  # which records: the counts alone do not say what to fix
            log.warning("%s: skipped %s", split, p)
        if len(problems) > 20:
            log.warning("%s: ... and %d more (`lora-manip data check RECIPE` lists all)", split, len(problems) - 20)
    for reason, n in dropped.items():
        if not reason.startswith("bad record"):
            log.warning("%s: dropped %d sample(s): %s", split, n, reason)
    return ManipDataset(ConcatSamples(views), chat, max_length,
                        lengths=np.concatenate(lengths) if lengths else [],
                        has_images=np.concatenate(has_images) if has_images else [], dropped=dropped,
                        tiles=np.concatenate(tiles) if tiles else [])


def build_datasets(data, processor, seed: int, workers: int | None = None
                   ) -> tuple[ManipDataset, ManipDataset | None]:
    """(train, val or None) from a recipe's `data` section: registry names already resolved by the recipe,
    `val_fraction` hold-outs plus `data.val` entries form the validation set. `data.seed` (default: `seed`, the
    training seed) drives sampling and splits."""
    if data.on_too_long != "drop":  # the only policy; the recipe states it explicitly
        raise UserError(f"data.on_too_long: {data.on_too_long!r} is not supported (drop)")
    seed = seed if data.seed is None else data.seed
    train_parts, held_out = _parts_of(data.train, seed, "train")
    val_parts, _ = _parts_of(data.val, seed, "val")
    common = (Chat(processor, data.system_prompt), data.model_max_length, data.skip_bad_records,
              data.min_traj_points, workers)
    train = _assemble(train_parts, *common, "train")
    val = _assemble(held_out + val_parts, *common, "val") if held_out or val_parts else None
    return train, val
