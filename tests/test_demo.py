"""The demo as users run it (`lora-manip demo`, recipes/tiny_cpu.yaml), in a temporary folder: the fine-tuned tiny
model must beat the same model before fine-tuning on boxes and on choice questions, and the run prints the kit's
own progress and results, no library deprecation warnings."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]

# What the libraries print when the kit calls a deprecated API (or leaves DeepSpeed to guess its accelerator).
LIBRARY_NOISE = ("FutureWarning", "DeprecationWarning", "Setting accelerator to CPU")


@pytest.mark.slow
def test_demo_fine_tuning_beats_the_base_model(tmp_path):
    data = tmp_path / "synth"
    overrides = [f"model.path={tmp_path / 'tiny'}", f"train.output_dir={tmp_path / 'run'}",
                 f"data.train.0.annotation_path={data / 'train.json'}", f"data.train.0.data_path={data}",
                 f"data.val.0.annotation_path={data / 'val.json'}", f"data.val.0.data_path={data}"]
    # Through the CLI in its own process: train + merge + eval with the warning filters a user has, so a warning
    # any of them prints shows here (in-process, pytest would collect it instead).
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONWARNINGS", "DS_ACCELERATOR")}
    cmd = [sys.executable, "-m", "lora_manip.cli", "demo", "--recipe", str(ROOT / "recipes" / "tiny_cpu.yaml"),
           "--limit", "80", *[a for o in overrides for a in ("--set", o)]]
    r = subprocess.run(cmd,
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1500)
    output = r.stdout + r.stderr
    print(r.stdout)
    assert r.returncode == 0, output[-4000:]
    noise = [line for line in output.splitlines() if any(n in line for n in LIBRARY_NOISE)]
    assert not noise, "\n".join(noise)
    assert "before vs after fine-tuning" in r.stdout
    before, after = (json.loads((tmp_path / "run" / f"eval-{when}" / "metrics.json").read_text())["all"]
                     for when in ("before", "after"))
    assert after["box"]["parse_failure_rate"] < 0.1 < before["box"]["parse_failure_rate"]
    assert after["box"]["mean_iou"] > before["box"]["mean_iou"]
    assert after["box"]["acc@0.1"] > before["box"]["acc@0.1"]
    # Choice: the letter must follow the image (which container), not just parse: at least twice the ~0.25 a
    # constant letter scores, and well above the base model. 80 records hold 38 choice questions.
    assert after["choice"]["parse_failure_rate"] == 0.0 < before["choice"]["parse_failure_rate"]
    assert after["choice"]["accuracy"] >= max(0.5, before["choice"]["accuracy"] + 0.3)
    assert (tmp_path / "run-merged" / "config.json").is_file()
    assert (tmp_path / "run" / "loss.png").is_file()
