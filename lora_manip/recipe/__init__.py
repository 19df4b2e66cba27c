"""The recipe: the schema of a training run (schema.py, cross-checks in checks.py), the names it accepts for what
training computes (names.py), the dataset registry its data entries resolve through (registry.py), and loading from
YAML with `--set` overrides (load.py). It imports nothing from the kit but `errors`: every later stage reads it."""

from .load import apply_overrides, dump_recipe, load_recipe, parse_override, recipe_from_dict, safe_load_unique
from .names import (METRICS, POINT_THRESHOLD, REWARD_KINDS, check_metric_name, check_reward_table,
                    higher_is_better)
from .registry import ENV_VAR, load_registry, resolve_data_section, split_percent
from .schema import (DataCfg, DatasetCfg, DistributedCfg, GrpoCfg, LoraCfg, ModelCfg, PartCfg, PartMode, PartsCfg,
                     QuantCfg, Recipe, SynthCfg, TrainCfg)

__all__ = [
    "apply_overrides", "dump_recipe", "load_recipe", "parse_override", "recipe_from_dict", "safe_load_unique",
    "METRICS", "POINT_THRESHOLD", "REWARD_KINDS", "check_metric_name", "check_reward_table", "higher_is_better",
    "ENV_VAR", "load_registry", "resolve_data_section", "split_percent",
    "DataCfg", "DatasetCfg", "DistributedCfg", "GrpoCfg", "LoraCfg", "ModelCfg", "PartCfg", "PartMode", "PartsCfg",
    "QuantCfg", "Recipe", "SynthCfg", "TrainCfg",
]
