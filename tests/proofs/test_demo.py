"""The demo as users run it (`lora-manip demo`, recipes/tiny_cpu.yaml), in a temporary folder: the fine-tuned tiny
model must beat the same model before fine-tuning on boxes and on choice questions, and the run prints the kit's
own progress and results, no library deprecation warnings. Then GRPO on the demo's merged model
(recipes/grpo_tiny_cpu.yaml) must raise held-out reward and box IoU above that SFT start (issue 16, item 5)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).parents[2]

# What the libraries print when the kit calls a deprecated API (or leaves DeepSpeed to guess its accelerator).
LIBRARY_NOISE = ("FutureWarning", "DeprecationWarning", "Setting accelerator to CPU")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """(folder, completed process) of one `lora-manip demo` run, shared by the demo and GRPO tests."""
    tmp_path = tmp_path_factory.mktemp("demo")
    data = tmp_path / "synth"
    overrides = [f"model.path={tmp_path / 'tiny'}", f"train.output_dir={tmp_path / 'run'}",
                 f"data.train.0.annotation_path={data / 'train.json'}", f"data.train.0.data_path={data}",
                 f"data.val.0.annotation_path={data / 'val.json'}", f"data.val.0.data_path={data}"]
    # Through the CLI in its own process: train + merge + eval with the warning filters a user has, so a warning
    # any of them prints shows here (in-process, pytest would collect it instead).
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONWARNINGS", "DS_ACCELERATOR")}
    cmd = [sys.executable, "-m", "lora_manip.cli", "demo", "--recipe", str(ROOT / "recipes" / "tiny_cpu.yaml"),
           "--limit", "80", *[a for o in overrides for a in ("--set", o)]]
    return tmp_path, subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1500)


@pytest.mark.slow
def test_demo_fine_tuning_beats_the_base_model(demo):
    tmp_path, r = demo
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


# Set before the first run of this test (issue 16, item 5), from the recipe's own measurements: greedy held-out mean
# IoU 0.080 -> 0.246 on its 40 questions, 0.082 -> 0.231-0.267 on 100 of another seed.
MIN_IOU_RISE = 0.05


@pytest.mark.slow
def test_grpo_recipe_raises_heldout_reward_over_the_demo_model(demo, tmp_path):
    """`lora-manip train recipes/grpo_tiny_cpu.yaml` as shipped, on the demo's merged SFT model: it renders its own
    gripper-box prompt set, and the held-out reward (sampled, GRPO's own validation) and the greedy box IoU and mean
    reward `lora-manip eval` measures must rise above the SFT start."""
    from lora_manip.eval.run import EvalSettings, run_eval
    from lora_manip.train import rewards as R

    folder, r = demo
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    sft, data, run = folder / "run-merged", tmp_path / "gripper", tmp_path / "grpo"
    overrides = [f"model.path={sft}", f"train.output_dir={run}",
                 f"data.train.0.annotation_path={data / 'train.json'}", f"data.train.0.data_path={data}",
                 f"data.val.0.annotation_path={data / 'val.json'}", f"data.val.0.data_path={data}"]
    g = subprocess.run([sys.executable, "-m", "lora_manip.cli", "train", str(ROOT / "recipes" / "grpo_tiny_cpu.yaml"),
                        *[a for o in overrides for a in ("--set", o)]],
                       cwd=tmp_path, capture_output=True, text=True, timeout=1200)
    assert g.returncode == 0, (g.stdout + g.stderr)[-4000:]
    prompts = [x for f in ("train.json", "val.json") for x in json.loads((data / f).read_text())]
    assert len(prompts) == 400 and {x["task"] for x in prompts} == {"gripper_bbox"}  # the recipe's own prompt set
    table = yaml.safe_load((ROOT / "recipes" / "grpo_tiny_cpu.yaml").read_text())["grpo"]["rewards"]

    def heldout(model, name):
        _, summary = run_eval(str(model), data=str(data / "val.json"), out_dir=str(tmp_path / name),
                              settings=EvalSettings(max_new_tokens=40, progress=False))
        preds = [json.loads(x) for x in (tmp_path / name / "predictions.jsonl").read_text().splitlines()]
        return summary["all"]["box"], R.mean_rewards(preds, table)["all"]

    (box0, reward0), (box1, reward1) = heldout(sft, "eval-sft"), heldout(run, "eval-grpo")
    sampled = json.loads((run / "grpo_eval.json").read_text())
    print(f"held-out box IoU {box0['mean_iou']:.3f} -> {box1['mean_iou']:.3f}, greedy reward {reward0:.3f} -> "
          f"{reward1:.3f}, sampled reward {sampled['start']['eval_reward']:.3f} -> {sampled['end']['eval_reward']:.3f}")
    assert box1["parse_failure_rate"] == 0.0
    assert box1["mean_iou"] >= box0["mean_iou"] + MIN_IOU_RISE
    assert reward1 >= reward0 + MIN_IOU_RISE
    assert sampled["end"]["eval_reward"] > sampled["start"]["eval_reward"]
