"""A run whose `train.report_to` names a logger that is not installed fails at start, before anything is written."""

from __future__ import annotations

import importlib.util

import pytest
import yaml
from typer.testing import CliRunner

from lora_manip.cli import app
from tests.conftest import tiny_recipe_dict


@pytest.mark.parametrize("logger", ["wandb", "tensorboard"])
def test_missing_logger_is_refused_before_anything_is_written(logger, tiny_model_dir, synth_dir, tmp_path,
                                                              monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.split(".")[0] in ("wandb", "tensorboard", "tensorboardX")
                        else real(name, *a))
    raw = tiny_recipe_dict(tiny_model_dir, synth_dir, tmp_path / "run", train__report_to=[logger])
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    r = CliRunner().invoke(app, ["train", str(recipe)])
    assert r.exit_code == 2, r.output
    assert f"train.report_to: {logger} is not installed" in r.output and f"lora-manip[{logger}]" in r.output
    assert not (tmp_path / "run").exists()
