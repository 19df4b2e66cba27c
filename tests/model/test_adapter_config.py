"""adapter_config.json is read once, typed (model.adapters.read_adapter_config), with PEFT's defaults for the keys a
file leaves out stated in one place; merge planning, eval's rank check and the merged model's card read it."""

from __future__ import annotations

import dataclasses
import json

import pytest

from lora_manip.errors import UserError
from lora_manip.model.adapters import AdapterConfig, read_adapter_config


def test_defaults_are_peft_own():
    import peft

    theirs = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
              for f in dataclasses.fields(peft.LoraConfig)}
    ours = [f for f in dataclasses.fields(AdapterConfig) if f.name not in ("path", "raw")]
    assert ours
    for f in ours:
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if f.name == "peft_type":  # PEFT sets it in __post_init__
            assert default == peft.LoraConfig().peft_type.value
        else:
            assert default == theirs[f.name], f.name


def test_read_fills_what_the_file_leaves_out(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"lora_alpha": 32, "fan_in_fan_out": True,
                                                             "base_model_name_or_path": "org/base"}))
    cfg = read_adapter_config(tmp_path)
    assert (cfg.r, cfg.lora_alpha, cfg.use_dora, cfg.rank_pattern) == (8, 32, False, {})
    assert cfg.base_model_name_or_path == "org/base" and cfg.raw["fan_in_fan_out"] is True
    assert cfg.path == tmp_path / "adapter_config.json"


@pytest.mark.parametrize("text", ["{not json", "[1]"])
def test_not_an_object_is_an_error_naming_the_file(tmp_path, text):
    (tmp_path / "adapter_config.json").write_text(text)
    with pytest.raises(UserError, match="adapter_config.json"):
        read_adapter_config(tmp_path)
