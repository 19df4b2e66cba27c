"""Reading a recipe: YAML (a key given twice is an error), `--set a.b=c` overrides, validation into the schema with
every problem listed by key path, and the resolved recipe written back as YAML for the run folder. A run folder's
copy (`recipe.yaml` in a run, a checkpoint or a merged model) is read back here too, once and typed, by every command
that needs it (eval's system prompt and anyres cap, merge's quantisation)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from ..errors import UserError
from .checks import dump_exclude
from .schema import SAVED_RUN, Recipe

RUN_RECIPE = "recipe.yaml"  # the resolved recipe `lora-manip train` saves with a run (merge copies it along)


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"])
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] == "missing":
            msg = "required key is missing"
        elif msg.startswith("Value error, "):
            # Cross-checks raise one ValueError listing every failure, each already prefixed by its key path.
            lines += msg[len("Value error, "):].splitlines()
            continue
        lines.append(f"{loc}: {msg}" if loc else msg)
    return "\n".join(f"  - {line}" for line in lines)


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b=c` -> (['a', 'b'], c), the value parsed as YAML so numbers, booleans, lists and null work."""
    if "=" not in item:
        raise UserError(f"--set {item!r}: expected KEY.PATH=VALUE, e.g. --set lora.r=8")
    key, raw = item.split("=", 1)
    path = [k for k in key.strip().split(".") if k]
    if not path:
        raise UserError(f"--set {item!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise UserError(f"--set {item!r}: value is not valid YAML ({e.problem})") from None
    return path, value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for item in overrides:
        path, value = parse_override(item)
        node = raw
        for i, k in enumerate(path[:-1]):
            if isinstance(node, list):
                node = node[_list_index(item, path[:i], node, k)]
                continue
            if not isinstance(node, dict):
                raise UserError(f"--set {item!r}: {'.'.join(path[:i])} is a value ({node!r}), not a mapping")
            node = node.setdefault(k, {})
        last = path[-1]
        if isinstance(node, list):
            node[_list_index(item, path[:-1], node, last)] = value
        elif isinstance(node, dict):
            node[last] = value
        else:
            raise UserError(f"--set {item!r}: {'.'.join(path[:-1])} is a value ({node!r}), not a mapping")
    return raw


def _list_index(item: str, at: list[str], node: list, k: str) -> int:
    where = ".".join(at)
    if not k.isdigit():
        raise UserError(f"--set {item!r}: {where} is a list; address an entry by its index ({where}.0)")
    if int(k) >= len(node):
        raise UserError(f"--set {item!r}: {where} has {len(node)} entr{'y' if len(node) == 1 else 'ies'} "
                        f"(indices 0..{len(node) - 1}); index {k} is out of range")
    return int(k)


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load, except that a key given twice in one mapping is an error (PyYAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: construct_mapping reports it
                continue
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first at line {first + 1})", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _UniqueKeyLoader.construct_mapping)


def safe_load_unique(text: str):
    return yaml.load(text, Loader=_UniqueKeyLoader)


def _resolve_paths(raw: dict, base: Path) -> None:
    """Relative paths are relative to the directory the command runs in, like any CLI's. The DeepSpeed config is
    also looked up beside the recipe, because the shipped ones live there."""
    ds = raw.get("distributed", {}).get("deepspeed") if isinstance(raw.get("distributed"), dict) else None
    if isinstance(ds, str) and not os.path.isabs(ds) and not os.path.exists(ds) and (base / ds).exists():
        raw["distributed"]["deepspeed"] = str(base / ds)


def _read_mapping(path: Path) -> dict:
    try:
        raw = safe_load_unique(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise UserError(f"recipe {path}: not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from None
    except OSError as e:
        raise UserError(f"recipe {path}: cannot read it ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise UserError(f"recipe {path}{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(raw, dict):
        raise UserError(f"recipe {path}: expected a mapping of sections (model, method, data, train, ...)")
    return raw


def load_recipe(path: str | os.PathLike, overrides: list[str] | None = None) -> Recipe:
    path = Path(path)
    if path.is_dir():
        raise UserError(f"recipe {path} is a folder, not a recipe file; pass a .yaml file (e.g. "
                        "recipes/tiny_cpu.yaml)")
    if not path.is_file():
        raise UserError(f"recipe {path} not found; shipped recipes are in recipes/ (e.g. recipes/tiny_cpu.yaml)")
    raw = apply_overrides(_read_mapping(path), overrides or [])
    _resolve_paths(raw, path.parent)
    return recipe_from_dict(raw, source=str(path))


def recipe_from_dict(raw: dict, source: str = "recipe", *, saved_run: bool = False) -> Recipe:
    """`saved_run`: a run folder's copy (see read_run_recipe): fields and types are checked, the cross-checks are
    not."""
    try:
        return Recipe.model_validate(raw, context={SAVED_RUN: True} if saved_run else None)
    except ValidationError as e:
        listed = _format_errors(e)
        if saved_run and "\n" not in listed:  # one problem: one line, "file: key.path: what is wrong"
            raise UserError(f"{source}: {listed.removeprefix('  - ')}") from None
        raise UserError(f"{source} is invalid:\n{listed}") from None


def read_run_recipe(folder: str | os.PathLike) -> Recipe | None:
    """The recipe a training run saved in `folder` (the run's output folder, a checkpoint, a merged model), typed as
    the schema's Recipe, with `model_fields_set` telling what the file spells out; None when the folder has none.
    The cross-checks are not run again: they guard a run about to start (a DeepSpeed config on this machine,
    settings the method would not read), and this one has run."""
    path = Path(folder) / RUN_RECIPE
    if not path.is_file():
        return None
    return recipe_from_dict(_read_mapping(path), source=str(path), saved_run=True)


def dump_recipe(recipe: Recipe) -> str:
    """The fully resolved recipe as YAML (every default spelt out), written into the run folder. Settings the recipe
    does not read (checks.unread_settings) are left out, as the schema refuses them when the file is loaded again."""
    return yaml.safe_dump(json.loads(recipe.model_dump_json(exclude=dump_exclude(recipe))), sort_keys=False)
