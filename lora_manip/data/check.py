"""`lora-manip data check`: a recipe (every train and val dataset, whole files) or one annotation file, checked
and measured as training would (scan.py) and reported (report.py). Settings not given on the command line come
from the recipe, or for a single file from the recipe schema's defaults.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import UserError
from ..recipe import DataCfg, load_recipe
from ..recipe.registry import ENV_VAR, Registry, load_registry
from .encode import Chat
from .report import MAX_LENGTH, MIN_TRAJ_POINTS, Entry, check_entries, length_distribution

SYSTEM_PROMPT = DataCfg.model_fields["system_prompt"].default


def recipe_registry(data) -> Registry | None:
    """The registry the recipe's dataset names were filled from (data.registry, else the environment variable), or
    None: read again only to say where a missing file's path came from."""
    where = data.registry or os.environ.get(ENV_VAR)
    try:
        return load_registry(where) if where else None
    except ValueError:  # the recipe loaded, so it read; a registry changed since is the recipe's to report
        return None


def path_hint(registry: Registry | None, d, key: str) -> str:
    """What to check when dataset `d`'s `key` (annotation_path / data_path) is missing: the registry's root when
    the path came from the registry, else "" (the recipe's own path: the problem names its field)."""
    if registry is None or d.name not in registry or getattr(d, key) != registry.unmatched(d.name, key):
        return ""
    return f"dataset {d.name!r} takes its {key} from the registry; {registry.root_hint()}"


def entries_from_recipe(recipe) -> list[Entry]:
    out = []
    registry = recipe_registry(recipe.data)
    for split, items in (("train", recipe.data.train), ("val", recipe.data.val)):
        for i, d in enumerate(items):
            hints = {key: path_hint(registry, d, key) for key in ("annotation_path", "data_path")}
            out.append(Entry(d.name or f"{split}[{i}] {Path(d.annotation_path).stem}", d.annotation_path,
                             d.data_path, split, hints))
    return out


def training_batching(recipe) -> str:
    """How the recipe's training orders its batches (report.BATCHINGS), which decides what padding applies."""
    if recipe.objective == "grpo":
        return "grpo"
    if recipe.train.max_tokens_per_batch:
        return "token-budget"
    return "length-grouped" if recipe.data.group_by_length else "random"


def run_check(target: str, model: str | None = None, data_root: str | None = None, max_length: int | None = None,
              batch_size: int | None = None, system_prompt: str | None = None, min_traj_points: int | None = None,
              overrides: list[str] | None = None, workers: int | None = None) -> dict:
    """`data check` on a recipe (.yaml/.yml: every train and val dataset, whole files) or one annotation file."""
    path = Path(target)
    note = None
    if path.suffix in (".yaml", ".yml"):
        recipe = load_recipe(path, overrides or [])
        entries = entries_from_recipe(recipe)
        d = recipe.data
        max_length = max_length or d.model_max_length
        batch_size = batch_size or recipe.train.per_device_batch_size
        system_prompt = system_prompt if system_prompt is not None else d.system_prompt
        min_traj_points = min_traj_points or d.min_traj_points
        seed = recipe.train.seed if d.seed is None else d.seed
        model = model or recipe.model.path
        cap = d.max_image_tiles
        batching = training_batching(recipe)
    else:
        if overrides:
            raise UserError("--set applies to recipes; checking a single annotation file takes no overrides")
        if not path.is_file():
            raise UserError(f"{path} not found (expected a recipe .yaml or an annotation .json/.jsonl)")
        entries = [Entry(path.stem, str(path), str(data_root or path.parent))]
        max_length, batch_size = max_length or MAX_LENGTH, batch_size or 8
        system_prompt = system_prompt if system_prompt is not None else SYSTEM_PROMPT
        min_traj_points, seed = min_traj_points or MIN_TRAJ_POINTS, 0
        cap, batching = None, None
    processor = None
    if model and not Path(model).is_dir():
        # A hub id would mean network look-ups (and minutes of retries offline); lengths need a local checkpoint.
        note = f"model {model} is not a local folder; pass --model with a local checkpoint for token lengths"
    elif model:
        try:
            from .processor import load_processor  # torch and transformers: only when there is a model

            processor = load_processor(model, cap)
        except (UserError, OSError, ValueError) as e:
            note = f"cannot load a processor from {model} ({str(e).splitlines()[0]})"
    report = check_entries(entries, Chat(processor, system_prompt), max_length, batch_size, min_traj_points, seed,
                           workers, batching)
    after = report.pop("_lengths", None)
    if cap and processor is not None and after is not None:
        # data.max_image_tiles: measure again without the cap; only image tokens differ, so a record whose length
        # changed had an image capped
        before = check_entries(entries, Chat(load_processor(model), system_prompt), max_length, batch_size,
                               min_traj_points, seed, workers).pop("_lengths")
        report["image_cap"] = {"max_image_tiles": cap, "capped_records": int((before != after).sum()),
                               "records": int(len(after)), "tokens_before": length_distribution(before),
                               "tokens_after": length_distribution(after)}
    if note:
        report["tokens_note"] = note
    report["target"] = str(target)
    return report
