"""Eval during training (train/evaluate.py): recipe checks, metric names and directions, logged metrics at the
right steps, the best checkpoint (its step's weights, surviving rotation), resume, and 2 processes under ZeRO-3."""

import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from lora_manip.errors import UserError
from lora_manip.recipe import recipe_from_dict
from lora_manip.recipe import METRICS, check_metric_name, higher_is_better

from tests.conftest import tiny_recipe_dict


def _raw(model_dir, data_dir, out, val=True, **over):
    raw = tiny_recipe_dict(model_dir, data_dir, out, **over)
    if val:
        raw["data"]["val"] = [{"name": "synth_val", "annotation_path": str(data_dir / "val.json"),
                               "data_path": str(data_dir)}]
    return raw


# ------------------------------------------------------------------------------------------------ no model


def test_metric_direction_by_name():
    assert higher_is_better("box.acc@0.1") and higher_is_better("choice.accuracy")
    assert higher_is_better("box.mean_iou") and higher_is_better("planning.bleu")
    for lower in ("trajectory.dtw", "trajectory.frechet_px", "trajectory.trace_rmse", "point.mean_distance",
                  "box.parse_failure_rate"):
        assert not higher_is_better(lower), lower
    assert check_metric_name("point.acc@0.05") is None
    assert "box has no metric 'acc'" in check_metric_name("box.acc")
    assert "is not kind.metric" in check_metric_name("boxes.acc@0.1")


@pytest.mark.parametrize("over, val, message", [
    ({"train__eval_steps": 2}, False, "train.eval_steps: needs validation data"),
    ({"train__eval_steps": 0}, True, "train.eval_steps: Input should be greater than 0"),
    ({"train__eval_steps": 2, "train__best_metric": "box.acc"}, True,
     "train.best_metric: 'box.acc': box has no metric 'acc'; choose one of mean_iou, acc@0.1"),
    ({"train__eval_steps": 2, "train__best_metric": "accuracy"}, True, "train.best_metric: 'accuracy' is not kind"),
    ({"train__best_metric": "choice.accuracy"}, True, "train.best_metric: needs train.eval_steps"),
    ({"train__eval_steps": 2, "train__eval_limit": 0}, True, "train.eval_limit: Input should be greater than 0"),
])
def test_recipe_refuses_bad_eval_settings(tiny_model_dir, synth_dir, tmp_path, over, val, message):
    with pytest.raises(UserError, match="recipe is invalid") as e:
        recipe_from_dict(_raw(tiny_model_dir, synth_dir, tmp_path / "run", val=val, **over))
    assert message in str(e.value)


def test_val_fraction_is_validation_data(tiny_model_dir, synth_dir, tmp_path):
    raw = _raw(tiny_model_dir, synth_dir, tmp_path / "run", val=False, train__eval_steps=2,
               train__best_metric="trajectory.dtw")
    raw["data"]["train"][0]["val_fraction"] = 0.2
    assert recipe_from_dict(raw).train.best_metric == "trajectory.dtw"


def test_cli_exits_2_before_loading_anything(tiny_model_dir, synth_dir, tmp_path):
    import yaml

    from lora_manip.cli import app

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(_raw(tiny_model_dir, synth_dir, tmp_path / "run", train__eval_steps=2,
                                        train__best_metric="box.iou")))
    result = CliRunner().invoke(app, ["train", str(path)])
    assert result.exit_code == 2 and "train.best_metric: 'box.iou': box has no metric 'iou'" in result.output
    assert not (tmp_path / "run").exists()


def test_metric_table_matches_the_scorer(synth_dir):
    """Every metric the scorer reports for these kinds is named in best_metric.METRICS and the other way round:
    a renamed scorer metric fails here, not as a best_metric nobody can choose."""
    from lora_manip.data.records import load_samples
    from lora_manip.answers.kinds import KINDS
    from lora_manip.train.evaluate import flat_metrics, score_answers

    samples, _ = load_samples(str(synth_dir / "train.json"), str(synth_dir))
    metrics = flat_metrics(score_answers(samples, [s.messages[-1]["content"] for s in samples]))
    assert set(METRICS) == set(KINDS)
    counts = ("count", "parse_failures", "n_scored", "n_scored_px")
    produced = {k for k in metrics if k.split(".", 1)[1] not in counts}
    kinds = {k.split(".")[0] for k in produced}
    assert kinds == {"box", "point", "trajectory", "choice", "yesno"}
    assert produced == {f"{kind}.{m}" for kind in kinds for m in METRICS[kind]}
    assert metrics["box.acc@0.1"] == 1.0 and metrics["trajectory.dtw"] == 0.0  # answers == ground truths


def test_batches_dealt_so_every_round_holds_one_kind():
    from lora_manip.train.evaluate import deal_batches

    n_images = [0, 0, 0, 1, 1, 1, 1, 2]
    batches = [[0], [1], [2], [3], [4], [5], [6], [7]]
    shares = [deal_batches(batches, n_images, 3, r) for r in range(3)]
    assert len({len(s) for s in shares}) == 1
    for rnd in zip(*shares):
        assert len({n_images[b[0]] for b in rnd}) == 1, rnd
    assert sorted({i for s in shares for b in s for i in b}) == list(range(8))
    assert deal_batches(batches, n_images, 1, 0) == batches


def test_resume_keeps_the_best_so_far_and_recovers_an_interrupted_swap(tiny_model_dir, synth_dir, tmp_path):
    from types import SimpleNamespace

    from lora_manip.train.evaluate import GenerationEval

    out = tmp_path / "run"
    recipe = recipe_from_dict(_raw(tiny_model_dir, synth_dir, out, train__eval_steps=1,
                                   train__best_metric="trajectory.dtw"))
    old = out / ".best_checkpoint.old"  # killed between the two renames of a swap
    old.mkdir(parents=True)
    (old / "best.json").write_text(json.dumps({"metric": "trajectory.dtw", "value": 0.25, "step": 7}))
    (out / ".best_checkpoint.staging").mkdir()
    ev = GenerationEval(recipe, [])
    ev.on_train_begin(SimpleNamespace(output_dir=str(out), should_save=True), None, None)
    assert ev.best == 0.25 and (out / "best_checkpoint" / "best.json").is_file()
    assert not old.exists() and not (out / ".best_checkpoint.staging").exists()
    other = GenerationEval(recipe.model_copy(update={"train": recipe.train.model_copy(
        update={"best_metric": "choice.accuracy"})}), [])
    other.on_train_begin(SimpleNamespace(output_dir=str(out), should_save=True), None, None)
    assert other.best is None  # another metric's best is no bar for this one


# ------------------------------------------------------------------------------------------------ training


def _eval_lines(run):
    lines = [json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in lines if "eval_generated" in r}


def test_eval_during_training_logs_metrics_and_keeps_the_best_step(tiny_model_dir, synth_dir, tmp_path,
                                                                   monkeypatch):
    """Evals at every step, real generation and scoring; trajectory.dtw (lower is better) is scripted so the best
    step is known: 0.5, not computable, 0.1, 0.1 (a tie is no improvement), 0.3 -> step 3. Checkpoints rotate
    with save_total_limit 1 at every step; best_checkpoint must survive and hold step 3's weights."""
    from peft import get_peft_model_state_dict
    from transformers import TrainerCallback

    from lora_manip.train import evaluate
    from lora_manip.train.workflow import build_trainer

    run = tmp_path / "run"
    recipe = recipe_from_dict(_raw(tiny_model_dir, synth_dir, run, train__max_steps=5, train__eval_steps=1,
                                   train__eval_limit=5, train__eval_max_new_tokens=8, train__save_steps=1,
                                   train__save_total_limit=1, train__best_metric="trajectory.dtw"))
    trainer = build_trainer(recipe)
    gen_eval = next(c for c in trainer.callback_handler.callbacks if isinstance(c, evaluate.GenerationEval))
    scripted = iter([0.5, None, 0.1, 0.1, 0.3])
    real_flat = evaluate.flat_metrics

    def flat(summary):
        out = real_flat(summary)
        out.pop("trajectory.dtw", None)
        value = next(scripted)
        return out if value is None else {**out, "trajectory.dtw": value}

    monkeypatch.setattr(evaluate, "flat_metrics", flat)
    snaps, modes, seen_logs = {}, [], []

    class Watch(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kw):
            modes.append(model.training)  # eval must hand the model back in train mode

        def on_step_end(self, args, state, control, model=None, **kw):
            snaps[state.global_step] = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}

        def on_log(self, args, state, control, logs=None, **kw):  # what wandb / tensorboard receive
            seen_logs.append(dict(logs))

    trainer.add_callback(Watch())
    trainer.train()

    evals = _eval_lines(run)
    assert sorted(evals) == [1, 2, 3, 4, 5]
    assert [evals[s].get("eval_trajectory.dtw") for s in range(1, 6)] == [0.5, None, 0.1, 0.1, 0.3]
    for line in evals.values():
        assert line["eval_generated"] == 5 and line["eval_unscorable"] == 0
        # synth val: a box, a contact point, a trajectory, two choice questions
        assert [line[f"eval_{k}.count"] for k in ("box", "point", "trajectory", "choice")] == [1, 1, 1, 2]
        for key in ("eval_choice.accuracy", "eval_box.acc@0.1", "eval_point.acc@0.05",
                    "eval_trajectory.parse_failure_rate"):
            assert 0.0 <= line[key] <= 1.0, key
    assert any("eval_choice.accuracy" in logs for logs in seen_logs)
    assert all(modes) and len(modes) == 5

    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-5"]  # rotation ran
    best = run / "best_checkpoint"
    info = json.loads((best / "best.json").read_text())
    assert (info["metric"], info["value"], info["step"], info["higher_is_better"]) == ("trajectory.dtw", 0.1, 3,
                                                                                       False)
    saved = load_file(best / "adapter_model.safetensors")
    newline = saved.pop("base_model.model.model.image_newline")  # beside PEFT's own keys (adapters.save_extras)
    assert saved.keys() == snaps[3].keys()
    assert all(torch.equal(saved[k], snaps[3][k]) for k in saved)
    assert not all(torch.equal(saved[k], snaps[5][k]) for k in saved)
    assert (best / "recipe.yaml").is_file() and newline.numel() > 0

    # The answers logged at step 3 are what `lora-manip eval`'s loader and generation give for best_checkpoint (it
    # is the model that answered at step 3), and the logged metrics are those answers' scores.
    _assert_same_answers(run, best, 3, gen_eval.samples, recipe.data.system_prompt)
    records = [json.loads(x) for x in (run / "eval_predictions" / "step-3.jsonl").read_text().splitlines()]
    again = real_flat(evaluate.score_answers(gen_eval.samples, [r["pred"] for r in records]))
    for key, value in again.items():
        if key != "trajectory.dtw":
            assert evals[3][f"eval_{key}"] == pytest.approx(value), key


def _assert_same_answers(run, model_dir, step, samples, system_prompt):
    from lora_manip.data.encode import Chat
    from lora_manip.eval.generate import load_for_inference, predict_samples

    logged = [json.loads(x) for x in (run / "eval_predictions" / f"step-{step}.jsonl").read_text().splitlines()]
    assert [r["id"] for r in logged] == [s.id for s in samples]
    assert all(r["gt"] == s.messages[-1]["content"] for r, s in zip(logged, samples))
    model, processor = load_for_inference(str(model_dir))
    answers = predict_samples(model, Chat(processor, system_prompt), samples, 5, 8, progress=False)
    assert [r["pred"] for r in logged] == answers


def test_best_metric_the_eval_samples_cannot_produce_is_refused_before_the_model_loads(
        tiny_model_dir, synth_dir, tmp_path, monkeypatch):
    from lora_manip.train import workflow

    monkeypatch.setattr(workflow, "build_model", lambda r: pytest.fail("the model was loaded"))
    recipe = recipe_from_dict(_raw(tiny_model_dir, synth_dir, tmp_path / "run", train__eval_steps=1,
                                   train__best_metric="yesno.accuracy"))  # synth val.json: no yes/no question
    with pytest.raises(UserError, match=r"train.best_metric: yesno.accuracy is not produced by the 5 eval samples "
                                        r"\(their kinds: box, choice, point, trajectory;"):
        workflow.build_trainer(recipe)


@pytest.mark.slow
def test_zero3_two_processes_eval_and_best(zero3_lora_run, synth_dir):
    """Both processes generate their share under ZeRO-3 (every forward collective) and gather: every sample
    scored at every eval, the best saved collectively."""
    run = zero3_lora_run  # 4 steps, eval_steps 2, eval_limit 5, eval_max_new_tokens 8, best_metric choice.accuracy
    evals = _eval_lines(run)
    assert sorted(evals) == [2, 4]
    for line in evals.values():
        assert line["eval_generated"] == 5 and line["eval_unscorable"] == 0
        assert sum(v for k, v in line.items() if k.endswith(".count")) == 5  # every process's answers gathered
    info = json.loads((run / "best_checkpoint" / "best.json").read_text())
    assert info["step"] == 2 or info["value"] > evals[2]["eval_choice.accuracy"]
    weights = load_file(run / "best_checkpoint" / "adapter_model.safetensors")
    assert weights and all(t.numel() > 0 for t in weights.values())
    # Each answer lands at its own sample: the gathered answers equal one process generating them all.
    from lora_manip.train.evaluate import pick_samples
    from lora_manip.data.records import load_samples

    samples, _ = load_samples(str(synth_dir / "val.json"), str(synth_dir))
    _assert_same_answers(run, run / "best_checkpoint", info["step"], pick_samples(samples, 5, 0),
                         "You are a helpful assistant.")
