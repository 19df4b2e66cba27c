"""eval / score / predict through the CLI and run_eval on the tiny model: outputs, batching, resume, system
prompts, the vLLM backend's error path, and the rules about overwriting."""

import json
import re
import shutil
import sys

import pytest
from PIL import Image
from typer.testing import CliRunner

import lora_manip.eval.generate as gen
from lora_manip.cli import app
from lora_manip.eval.generate import resolve_system_prompt
from lora_manip.eval.run import EvalSettings, run_eval
from tests.conftest import saved_run_recipe

runner = CliRunner()


def _table(output):
    """The metrics table of a command's output (progress bars on stderr may share its first line)."""
    return output[output.index("dataset  kind"):output.index("coordinates:")]


def _lines(path):
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def test_eval_writes_predictions_metrics_scores_and_overlays(tiny_model_dir, synth_dir, tmp_path):
    out = tmp_path / "eval"
    result = runner.invoke(app, ["eval", str(tiny_model_dir), "--data", str(synth_dir / "val.json"),
                                 "--out", str(out), "--max-new-tokens", "24", "--batch-size", "4"])
    assert result.exit_code == 0, result.output
    assert "parse-fail" in result.output and "system prompt (default)" in result.output
    metrics = json.loads((out / "metrics.json").read_text())
    preds, rows = _lines(out / "predictions.jsonl"), _lines(out / "scores.jsonl")
    val = json.loads((synth_dir / "val.json").read_text())
    assert metrics["count"] == len(rows) == len(preds) == len(val)
    assert {r["id"] for r in rows} == {r["id"] for r in preds} == {r["id"] for r in val}
    assert all({"id", "pred", "gt", "prompt", "dataset"} <= r.keys() for r in preds)  # what `score` reads
    assert all({"prompt", "pred_text", "gt", "kind"} <= r.keys() for r in rows)
    assert metrics["mode"] == "strict" and metrics["system_prompt"] == "You are a helpful assistant."
    meta = json.loads((out / "predictions.meta.json").read_text())
    assert meta["model"] == str(tiny_model_dir.resolve()) and meta["max_new_tokens"] == 24
    assert sum(r["kind"] == "box" for r in rows) == metrics["all"]["box"]["count"]
    grounding = [r for r in rows if r["kind"] in ("box", "point", "trajectory")]
    assert grounding and metrics["all"]["box"]["count"] > 0
    overlays = sorted(p.name for p in (out / "overlays").iterdir())
    assert len(overlays) == min(16, len(grounding)) + 1 and "contact_sheet.png" in overlays
    with Image.open(out / "overlays" / "contact_sheet.png") as sheet:
        assert sheet.format == "PNG" and sheet.width > 0
    # the predictions file of an eval scores the same way on its own
    again = runner.invoke(app, ["score", str(out / "predictions.jsonl"), "--out", str(tmp_path / "rescored")])
    assert again.exit_code == 0 and _table(again.output) == _table(result.output)
    # to the last bit: the finished file is in the data's order (generation runs longest first), as eval scored it
    assert [p["id"] for p in preds] == [r["id"] for r in val]
    rescored = json.loads((tmp_path / "rescored" / "metrics.json").read_text())
    assert rescored["all"] == metrics["all"] and rescored["by_dataset"] == metrics["by_dataset"]


def test_batched_answers_equal_one_at_a_time(tiny_model_dir, synth_dir):
    one, _ = run_eval(str(tiny_model_dir), str(synth_dir / "val.json"),
                      settings=EvalSettings(max_new_tokens=12, batch_size=1, progress=False))
    many, _ = run_eval(str(tiny_model_dir), str(synth_dir / "val.json"),
                       settings=EvalSettings(max_new_tokens=12, batch_size=5, progress=False))
    assert [r["id"] for r in one] == [r["id"] for r in many]
    assert [r["pred_text"] for r in one] == [r["pred_text"] for r in many]


def test_batches_group_by_length(processor, synth_dir):
    from lora_manip.data.encode import Chat, prompt_text
    from lora_manip.data.records import load_samples

    samples, _ = load_samples(synth_dir / "train.json", synth_dir)
    samples = samples[:12]
    prompts = [prompt_text(Chat(processor, None), s.messages) for s in samples]
    batches = gen.plan_batches(processor, samples, prompts, 4)
    assert sorted(i for b in batches for i in b) == list(range(12)) and all(len(b) <= 4 for b in batches)
    lengths = [len(processor.tokenizer(p)["input_ids"]) for p in prompts]
    firsts = [max(lengths[i] for i in b) for b in batches if len({len(samples[i].images) for i in b}) == 1]
    assert firsts == sorted(firsts)  # batches come shortest first, so each pads to a similar length


def test_resume_after_interruption_redoes_nothing(tiny_model_dir, synth_dir, tmp_path, monkeypatch):
    out, data, n = tmp_path / "ev", str(synth_dir / "val.json"), len(json.loads((synth_dir / "val.json").read_text()))
    real, calls = gen.generate, []

    def interrupted(model, processor, prompts, images, max_new_tokens):
        if len(calls) == 1:
            raise KeyboardInterrupt  # the run is killed during its second batch
        calls.append(len(prompts))
        return real(model, processor, prompts, images, max_new_tokens)

    monkeypatch.setattr(gen, "generate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_eval(str(tiny_model_dir), data, out_dir=str(out),
                 settings=EvalSettings(max_new_tokens=8, batch_size=2, progress=False))
    first = _lines(out / "predictions.jsonl")
    assert len(first) == 2 and not (out / "metrics.json").exists()
    with open(out / "predictions.jsonl", "a") as f:
        f.write('{"id": "half-written", "pred": "[0.1, ')  # killed in the middle of a line

    def counting(model, processor, prompts, images, max_new_tokens):
        calls.append(len(prompts))
        return real(model, processor, prompts, images, max_new_tokens)

    calls.clear()
    monkeypatch.setattr(gen, "generate", counting)
    res = runner.invoke(app, ["eval", str(tiny_model_dir), "--data", data, "--out", str(out),
                              "--max-new-tokens", "8", "--batch-size", "2", "--resume"])
    assert res.exit_code == 0, res.output
    assert sum(calls) == n - 2  # only the missing answers were generated
    final = _lines(out / "predictions.jsonl")
    assert all(r in final for r in first) and len(final) == n and len({r["id"] for r in final}) == n
    assert json.loads((out / "metrics.json").read_text())["count"] == n
    calls.clear()  # resuming a finished run generates nothing and scores again
    assert runner.invoke(app, ["eval", str(tiny_model_dir), "--data", data, "--out", str(out),
                               "--max-new-tokens", "8", "--resume"]).exit_code == 0
    assert calls == []


def _interrupt(*args, **kwargs):
    raise KeyboardInterrupt


def test_eval_refuses_to_mix_or_overwrite(tiny_model_dir, synth_dir, tmp_path, monkeypatch):
    out, data = tmp_path / "ev", str(synth_dir / "val.json")
    base = ["eval", "--data", data, "--out", str(out), "--max-new-tokens", "4", "--limit", "3"]
    assert runner.invoke(app, [base[0], str(tiny_model_dir), *base[1:]]).exit_code == 0
    again = runner.invoke(app, [base[0], str(tiny_model_dir), *base[1:]])
    assert again.exit_code == 2 and "already holds an eval" in again.output and "--resume" in again.output
    other = tmp_path / "other-model"
    shutil.copytree(tiny_model_dir, other)
    mixed = runner.invoke(app, [base[0], str(other), *base[1:], "--resume"])
    assert mixed.exit_code == 2 and "never mixed" in mixed.output and "model=" in mixed.output
    longer = runner.invoke(app, [base[0], str(tiny_model_dir), *base[1:-4], "--max-new-tokens", "9", "--limit", "3",
                                 "--resume"])
    assert longer.exit_code == 2 and "max_new_tokens" in longer.output
    old = {n: (out / n).read_bytes() for n in ("predictions.jsonl", "predictions.meta.json", "metrics.json")}
    monkeypatch.setattr(gen, "generate", _interrupt)
    with pytest.raises(KeyboardInterrupt):  # --force replaces the old eval only once it has an answer to put there
        run_eval(str(other), data, out_dir=str(out),
                 settings=EvalSettings(max_new_tokens=4, limit=3, force=True, progress=False))
    assert {n: (out / n).read_bytes() for n in old} == old  # the first model's eval, whole
    calls = []
    monkeypatch.setattr(gen, "generate", lambda m, p, prompts, *a: calls.append(1) or (
        ["B"] * len(prompts) if len(calls) == 1 else _interrupt()))
    with pytest.raises(KeyboardInterrupt):  # one batch made: no metrics of the old run stay beside the new answers
        run_eval(str(other), data, out_dir=str(out),
                 settings=EvalSettings(max_new_tokens=4, limit=3, batch_size=2, force=True, progress=False))
    assert not (out / "metrics.json").exists() and _lines(out / "predictions.jsonl")[0]["pred"] == "B"
    assert json.loads((out / "predictions.meta.json").read_text())["model"] == str(other.resolve())
    monkeypatch.undo()
    assert runner.invoke(app, [base[0], str(other), *base[1:], "--force"]).exit_code == 0
    assert json.loads((out / "predictions.meta.json").read_text())["model"] == str(other.resolve())
    assert "Traceback" not in again.output + mixed.output + longer.output


def test_system_prompt_from_the_runs_recipe(tiny_model_dir, synth_dir, tmp_path, monkeypatch):
    assert resolve_system_prompt(str(tmp_path)) == ("You are a helpful assistant.", "default")
    (tmp_path / "recipe.yaml").write_text(saved_run_recipe(data__system_prompt="You control a robot arm."))
    assert resolve_system_prompt(str(tmp_path)) == ("You control a robot arm.", str(tmp_path / "recipe.yaml"))
    assert resolve_system_prompt(str(tmp_path), "Other.") == ("Other.", "--system-prompt")
    (tmp_path / "recipe.yaml").write_text(saved_run_recipe(data__system_prompt=None))
    assert resolve_system_prompt(str(tmp_path))[0] is None  # trained without a system turn: evaluated without
    (tmp_path / "recipe.yaml").write_text(saved_run_recipe())  # data.system_prompt not spelt out
    assert resolve_system_prompt(str(tmp_path))[0] == "You are a helpful assistant."  # the recipe default

    model = tmp_path / "run"
    shutil.copytree(tiny_model_dir, model)
    (model / "recipe.yaml").write_text(saved_run_recipe(data__system_prompt="You control a robot arm."))
    seen, real = [], gen.generate
    monkeypatch.setattr(gen, "generate", lambda m, p, prompts, *a: seen.extend(prompts) or real(m, p, prompts, *a))
    args = ["eval", str(model), "--data", str(synth_dir / "val.json"), "--limit", "2", "--max-new-tokens", "2"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0 and "recipe.yaml" in res.output
    assert seen and all("You control a robot arm." in p for p in seen)
    seen.clear()
    res = runner.invoke(app, args + ["--system-prompt", "Be brief."])
    assert res.exit_code == 0 and "(--system-prompt)" in res.output
    assert seen and all("Be brief." in p and "robot arm" not in p for p in seen)


def test_vllm_backend_without_vllm_is_one_line(tiny_model_dir, synth_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # find_spec("vllm") is None: as on a machine without it
    res = runner.invoke(app, ["eval", str(tiny_model_dir), "--data", str(synth_dir / "val.json"), "--backend", "vllm"])
    assert res.exit_code == 2 and "needs vLLM" in res.output and "GPU" in res.output
    assert len(res.output.strip().splitlines()) == 1 and "Traceback" not in res.output
    bad = runner.invoke(app, ["eval", str(tiny_model_dir), "--data", str(synth_dir / "val.json"), "--backend", "tgi"])
    assert bad.exit_code == 2 and "choose one of hf, vllm" in bad.output


@pytest.mark.gpu
def test_vllm_backend_writes_the_same_predictions(tiny_model_dir, synth_dir, tmp_path):
    pytest.importorskip("vllm", reason="vLLM is a GPU extra")
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    out = tmp_path / "v"
    res = runner.invoke(app, ["eval", str(tiny_model_dir), "--data", str(synth_dir / "val.json"), "--out", str(out),
                              "--backend", "vllm", "--max-new-tokens", "8"])
    assert res.exit_code == 0, res.output
    assert {r["id"] for r in _lines(out / "predictions.jsonl")} == {
        r["id"] for r in json.loads((synth_dir / "val.json").read_text())}


# ----------------------------------------------------------------------------------------------------------- score
def _preds(tmp_path):
    preds = tmp_path / "preds.jsonl"
    preds.write_text("\n".join(json.dumps(r) for r in [
        {"id": 1, "pred": "", "gt": "B"},
        {"id": 2, "pred": "C", "gt": "C"},
        {"id": 3, "pred": '{"current_bbox": [[0.1, 0.1], [0.5, 0.5]]}',
         "gt": '{"current_bbox": [[0.1, 0.1], [0.5, 0.5]]}', "w": 640, "h": 480},
    ]) + "\n")
    return preds


def test_score_cli_strict_vs_upstream(tmp_path):
    preds = _preds(tmp_path)
    strict = runner.invoke(app, ["score", str(preds), "--out", str(tmp_path / "s")])
    assert strict.exit_code == 0, strict.output
    m = json.loads((tmp_path / "s" / "metrics.json").read_text())
    assert m["all"]["choice"]["accuracy"] == 0.5 and m["all"]["box"]["mean_iou"] == 1.0
    assert len(_lines(tmp_path / "s" / "scores.jsonl")) == 3
    upstream = runner.invoke(app, ["score", str(preds), "--upstream-compatible", "--out", str(tmp_path / "u")])
    assert upstream.exit_code == 0 and "upstream-compatible" in upstream.output and "Average Score" in upstream.output
    m = json.loads((tmp_path / "u" / "metrics.json").read_text())
    assert m["all"]["choice"]["accuracy"] == 1.0  # upstream counts the empty answer as correct


def test_score_cli_never_overwrites(tmp_path):
    preds = _preds(tmp_path)
    out = tmp_path / "o"
    assert runner.invoke(app, ["score", str(preds), "--out", str(out)]).exit_code == 0
    before = (out / "metrics.json").read_text()
    again = runner.invoke(app, ["score", str(preds), "--out", str(out), "--upstream-compatible"])
    assert again.exit_code == 2 and "already exists" in again.output and "--force" in again.output
    assert (out / "metrics.json").read_text() == before
    assert runner.invoke(app, ["score", str(preds), "--out", str(out), "--force", "--upstream-compatible"]).exit_code == 0
    assert (out / "metrics.json").read_text() != before
    own = tmp_path / "scores.jsonl"  # an input named like an output, in the output folder: refused even with --force
    own.write_text(preds.read_text())
    res = runner.invoke(app, ["score", str(own), "--out", str(tmp_path), "--force"])
    assert res.exit_code == 2 and "is an input" in res.output and own.read_text() == preds.read_text()


def test_score_cli_data_errors_exit_1_and_task_map(tmp_path):
    preds = tmp_path / "p.jsonl"
    preds.write_text("\n".join(json.dumps(r) for r in [
        {"id": "a", "task": "traj_choice", "pred": "B", "gt": "B"},
        {"id": "b", "task": "current_box", "pred": "[0, 0, 1, 1]", "gt": "no box"},
        {"id": "c", "task": "mine", "pred": "[0, 0, 1, 1]", "gt": "[0, 0, 1, 1]"},
    ]) + "\n")
    res = runner.invoke(app, ["score", str(preds), "--task-map", "mine=box"])
    assert res.exit_code == 1 and "1 of 3 record(s) could not be scored" in res.output
    assert "id='b' field `gt`" in res.output and "Traceback" not in res.output
    assert re.search(r"all +box +1 ", res.output) and re.search(r"all +choice +1 ", res.output)
    bad = runner.invoke(app, ["score", str(preds), "--task-map", "mine"])
    assert bad.exit_code == 2 and "NAME=KIND" in bad.output
    bad = runner.invoke(app, ["score", str(preds), "--coords", "inches"])
    assert bad.exit_code == 2 and "coords" in bad.output


def test_score_cli_bad_input_is_one_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1, "pred": "A", "gt": "A"}\n{"id": 2, "pred": \n')
    result = runner.invoke(app, ["score", str(bad)])
    assert result.exit_code == 2 and "line 2" in result.output and "Traceback" not in result.output


# --------------------------------------------------------------------------------------------------------- predict
def test_predict_answers_and_draws(tiny_model_dir, tmp_path, monkeypatch):
    from lora_manip.eval.draw import PRED_COLOR

    img = tmp_path / "scene.png"
    Image.new("RGB", (320, 180), (90, 60, 30)).save(img)
    result = runner.invoke(app, ["predict", str(tiny_model_dir), str(img), "Where is the red cube?",
                                 "--max-new-tokens", "8", "--system-prompt", "Be brief."])
    assert result.exit_code == 0, result.output
    missing = runner.invoke(app, ["predict", str(tiny_model_dir), str(tmp_path / "none.png"), "q"])
    assert missing.exit_code == 2 and "cannot read image" in missing.output

    # the random tiny model rarely answers a box, so the answer is fixed: x 160..288, y 90..162 in pixels
    monkeypatch.setattr(gen, "generate", lambda *a, **k: ["[0.5, 0.5, 0.9, 0.9]"])
    drawn = tmp_path / "drawn.png"
    ask = ["predict", str(tiny_model_dir), str(img), "Where is the red cube?", "--draw", str(drawn)]
    res = runner.invoke(app, ask)
    assert res.exit_code == 0 and "[0.5, 0.5, 0.9, 0.9]" in res.output, res.output
    with Image.open(drawn) as im, Image.open(img) as original:
        assert im.format == "PNG" and im.size == original.size
        picture = im.convert("RGB")
        assert picture.getpixel((288, 126)) == PRED_COLOR  # the box's right edge, in the prediction's colour
        assert picture.getpixel((220, 126)) == original.getpixel((220, 126))  # inside the box: the input's pixels

    # an existing file is kept unless --force (and replaced only when lora-manip drew it: tests/core/test_hostile.py)
    before = drawn.read_bytes()
    again = runner.invoke(app, ask)
    assert again.exit_code == 2 and "already exists" in again.output and "--force" in again.output
    assert drawn.read_bytes() == before
    assert runner.invoke(app, ask + ["--force"]).exit_code == 0
    with Image.open(drawn) as im:
        assert im.size == (320, 180)


@pytest.mark.parametrize("flags, message", [
    (["--point-threshold", "-1"], "--point-threshold must be a non-negative number"),
    (["--coords", "inches"], "--coords inches: choose one of"),
    (["--coords", "pixels", "--upstream-compatible"], "--coords applies to the strict scorer"),
])
def test_bad_scoring_flags_are_refused_before_a_model_loads(tmp_path, flags, message):
    # the model does not exist: the scoring settings must be refused first, not after a generation run
    data = tmp_path / "d.json"
    data.write_text("[]")
    r = runner.invoke(app, ["eval", str(tmp_path / "no-model"), "--data", str(data), *flags])
    assert r.exit_code == 2 and message in r.output, r.output
