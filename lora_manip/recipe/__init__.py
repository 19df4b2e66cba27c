"""The recipe: the schema of a training run (schema.py, cross-checks in checks.py), the names and shared defaults it
accepts for what training computes (names.py), the dataset registry its data entries resolve through (registry.py),
and loading from YAML with `--set` overrides, and a run folder's saved copy back (load.py). It imports nothing from
the kit but `errors` and `dtypes`: every later stage reads it.

The names below are imported on first use (PEP 562): `lora_manip.recipe.names` alone stays free of pydantic, so the
CLI reads its choices and defaults from there without paying for the schema's models at `--help`."""

from __future__ import annotations

import importlib

_HOME = {
    "load": ("apply_overrides", "dump_recipe", "load_recipe", "parse_override", "read_run_recipe", "recipe_from_dict",
             "safe_load_unique"),
    "names": ("METRICS", "POINT_THRESHOLD", "REWARD_KINDS", "check_metric_name", "check_reward_table",
              "higher_is_better"),
    "registry": ("ENV_VAR", "load_registry", "resolve_data_section", "split_percent"),
    "schema": ("DataCfg", "DatasetCfg", "DistributedCfg", "GrpoCfg", "LoraCfg", "ModelCfg", "PartCfg", "PartMode",
               "PartsCfg", "QuantCfg", "Recipe", "SynthCfg", "TrainCfg"),
}
_MODULE_OF = {name: module for module, names in _HOME.items() for name in names}

__all__ = list(_MODULE_OF)


def __getattr__(name: str):
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
