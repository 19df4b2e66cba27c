"""The whole job through the CLI: tiny model -> synthetic data -> LoRA train -> merge -> reload -> compare."""

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from lora_manip.cli import app

from tests.conftest import tiny_recipe_dict

runner = CliRunner()


def cli(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    code, out = cli("tiny-model", root / "base")
    assert code == 0, out
    code, out = cli("data", "synth", root / "data", "--n", 24, "--seed", 3)
    assert code == 0, out
    recipe = root / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe_dict(root / "base", root / "data", root / "run")))
    code, out = cli("train", recipe, "--set", "train.max_steps=4", "--set", "lora.r=4")
    assert code == 0, out
    return root


def assert_same_processor_files(base, out):
    """An output loads with AutoProcessor exactly as its base: the base's processor files, byte for byte, and no
    others (no second template file, no processor_class of the kit's own)."""
    from lora_manip.data.processor import PROCESSOR_FILES

    have = lambda d: {n for n in PROCESSOR_FILES if (d / n).is_file()}  # noqa: E731
    assert have(out) == have(base)
    for name in have(base):
        assert (out / name).read_bytes() == (base / name).read_bytes(), name
    assert json.loads((out / "processor_config.json").read_text())["processor_class"] == "LlavaOnevisionProcessor"


def safetensors_names(folder):
    from safetensors import safe_open

    names = set()
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            names |= set(st.keys())
    return names


def test_train_writes_a_peft_adapter_folder(trained):
    run = trained / "run"
    cfg = json.loads((run / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(trained / "base")
    assert cfg["r"] == 4  # the --set override reached the run
    assert cfg["modules_to_save"] == ["multi_modal_projector"]
    weights = load_file(run / "adapter_model.safetensors")
    assert any("lora_A" in k for k in weights) and not any("vision_tower" in k for k in weights)
    assert any("multi_modal_projector" in k for k in weights)
    assert all(t.numel() > 0 for t in weights.values())
    assert "base_model.model.model.image_newline" in weights  # where stock PEFT loads it too
    assert_same_processor_files(trained / "base", run)
    resolved = yaml.safe_load((run / "recipe.yaml").read_text())
    assert resolved["lora"]["r"] == 4 and resolved["parts"]["vision_tower"]["train"] == "frozen"
    losses = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in losses if "loss" in r] == [1, 2, 3, 4]


def test_training_changed_the_trained_parts(trained):
    from transformers import LlavaOnevisionForConditionalGeneration

    from lora_manip.model.adapters import load_with_adapter

    base = dict(LlavaOnevisionForConditionalGeneration.from_pretrained(trained / "base").named_parameters())
    model, _ = load_with_adapter(trained / "run")
    state = {k: v for k, v in model.named_parameters()}
    newline = [v for k, v in state.items() if k.endswith("model.image_newline")][0]
    assert not torch.equal(newline, base["model.image_newline"])
    proj = [v for k, v in state.items() if "modules_to_save" in k and k.endswith("linear_1.weight")][0]
    assert not torch.equal(proj, base["model.multi_modal_projector.linear_1.weight"])
    lora_b = [v for k, v in state.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)


def test_merge_reloads_with_transformers_and_matches(trained):
    from transformers import LlavaOnevisionForConditionalGeneration

    from lora_manip.checkpoints.verify import logits_of, probe_inputs
    from lora_manip.model.adapters import load_with_adapter
    from lora_manip.data.processor import load_processor

    code, out = cli("merge", trained / "run")
    assert code == 0, out
    merged_dir = trained / "run-merged"
    assert "max |logit diff|" in out
    assert {"config.json", "model.safetensors", "generation_config.json", "README.md"} <= {
        p.name for p in merged_dir.iterdir()}
    assert_same_processor_files(trained / "base", merged_dir)
    assert safetensors_names(merged_dir) == safetensors_names(trained / "base")
    processor = load_processor(merged_dir)
    merged = LlavaOnevisionForConditionalGeneration.from_pretrained(merged_dir)
    reference, _ = load_with_adapter(trained / "run")
    inputs = probe_inputs(processor)
    torch.testing.assert_close(logits_of(merged, inputs), logits_of(reference, inputs), atol=1e-4, rtol=1e-4)
    base = LlavaOnevisionForConditionalGeneration.from_pretrained(trained / "base")
    assert (logits_of(base, inputs) - logits_of(merged, inputs)).abs().max() > 1e-3
    assert "quantization_config" not in json.loads((merged_dir / "config.json").read_text())
    # never replaced without --force, never written into the adapter folder
    code, out = cli("merge", trained / "run")
    assert code == 2 and "already exists" in out
    code, out = cli("merge", trained / "run", "--out", trained / "run")
    assert code == 2


def test_bad_inputs_are_one_line_errors(trained, tmp_path):
    code, out = cli("train", tmp_path / "nope.yaml")
    assert code == 2 and "not found" in out and "Traceback" not in out
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {path: x\n")
    code, out = cli("train", bad)
    assert code == 2 and "not valid YAML" in out
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe_dict(tmp_path / "no-model", trained / "data", tmp_path / "o")))
    code, out = cli("train", recipe)
    assert code == 2 and "does not exist" in out
    recipe.write_text(yaml.safe_dump(tiny_recipe_dict(trained / "base", trained / "data", trained / "run")))
    code, out = cli("train", recipe)
    assert code == 2 and "already holds a run" in out
    code, out = cli("merge", trained / "base")
    assert code == 2 and "not an adapter folder" in out
    code, out = cli("data", "synth", trained / "data", "--n", 4)
    assert code == 2 and "already holds a dataset" in out


def test_overwrite_replaces_the_previous_run(trained, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained / "run", run)
    (run / "checkpoint-99").mkdir()  # a stale checkpoint the new run would otherwise rotate or resume
    (run / "notes.txt").write_text("mine")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe_dict(trained / "base", trained / "data", run)))
    code, out = cli("train", recipe, "--set", "train.max_steps=1", "--overwrite")
    assert code == 0, out
    # the whole previous run goes before anything new is written (issue 13: nothing mixes)
    assert not (run / "checkpoint-99").exists() and not (run / "notes.txt").exists()
    steps = [json.loads(x)["step"] for x in (run / "train_log.jsonl").read_text().splitlines()]
    assert max(steps) == 1  # the old run's log lines are gone
    code, out = cli("train", recipe, "--resume", "--overwrite")
    assert code == 2 and "contradict" in out


def test_the_launcher_checks_and_prepares_once_for_the_processes_it_starts(tmp_path, monkeypatch):
    """`train` with 2 processes: the launcher runs the checks and prepares the folder, then starts torchrun with
    the overrides as arguments and a token it also wrote into the run folder; the processes it started prove it with
    that token and skip the checks (a torchrun started by hand does not, and an inherited token proves nothing)."""
    from lora_manip.errors import UserError
    from lora_manip.recipe import load_recipe
    from lora_manip.train import launch, preflight, run_folder

    for var in ("LOCAL_RANK", "WORLD_SIZE", "RANK", run_folder.LAUNCH_ENV):
        monkeypatch.delenv(var, raising=False)
    checked, started = [], []
    monkeypatch.setattr(preflight, "check_run", checked.append)

    class FakeTorchrun:  # records what the processes would find while they run
        def __init__(self, cmd, env, **_):
            started.append((cmd, env, run_folder.read_launch(tmp_path / "run")))

        def wait(self):
            return 0

        def poll(self):  # the launcher asks, on leaving, whether torchrun still runs
            return 0

    monkeypatch.setattr(launch.subprocess, "Popen", FakeTorchrun)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe_dict(tmp_path / "m", tmp_path / "d", tmp_path / "run")))
    code, out = cli("train", recipe, "--set", "distributed.nproc_per_node=2", "--set", "lora.r=4")
    assert code == 0 and len(checked) == 1 and len(started) == 1, out
    cmd, env, proof = started[0]
    assert cmd[-4:] == ["train", str(recipe), "--set=distributed.nproc_per_node=2", "--set=lora.r=4"]
    assert "--nproc_per_node=2" in cmd and env[run_folder.LAUNCH_ENV] == proof["token"]
    assert proof["run_id"] == json.loads((tmp_path / "run" / "run.json").read_text())["run_id"]
    assert run_folder.read_launch(tmp_path / "run") is None  # the proof ends with the launch

    recipe_obj = load_recipe(recipe)
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    preflight.preflight(recipe_obj)  # torchrun started by hand: nobody checked yet
    assert len(checked) == 2
    monkeypatch.setenv(run_folder.LAUNCH_ENV, proof["token"])  # the launch that token belonged to is over
    with pytest.raises(UserError, match="matches no launch"):
        preflight.preflight(recipe_obj)
    run_folder.write_launch(tmp_path / "run", "run-id", proof["token"])  # a launch in progress, this process's
    preflight.preflight(recipe_obj)  # started by the launcher, which checked
    assert len(checked) == 2
