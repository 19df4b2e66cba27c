"""Issue 24: one `eval` over every val file of the RoboInter-VQA release (the stand-in of
tests/fixtures/robointer_release.py, through recipes/registry/datasets.example.yaml with only `root` set): several
--data files or a registry split in one model load and one progress
bar, one row per file, the image size carried into the predictions (pixel DTW), missing images refused before the
model loads, a failed run that leaves nothing in the way of the next, and a resume across files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

import lora_manip.eval.generate as gen
import lora_manip.eval.run as run_mod
from lora_manip.cli import app
from lora_manip.errors import UserError
from lora_manip.eval.sources import resolve_data
from tests.fixtures.robointer_release import val_annotation_files, write_release

runner = CliRunner()
EXAMPLE = Path(__file__).parents[2] / "recipes" / "registry" / "datasets.example.yaml"


def _example_with_root(root: Path, where: Path) -> Path:
    """The example registry with nothing changed but `root`, as its header tells a user to do."""
    text = EXAMPLE.read_text()
    assert text.count("root: /path/to/RoboInter-VQA\n") == 1
    where.write_text(text.replace("root: /path/to/RoboInter-VQA\n", f"root: {root}\n"))
    return where


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """(release root, its 16 val files, the example registry with only `root` set): the release's val layout (the
    dataset card: Generation/meta/val/llava_format/, Understanding/meta/val/, Task_planning/meta/val/{planning,
    choice,decide}/task_planning.json), the registry naming them *_val beside the training sets."""
    root = write_release(tmp_path_factory.mktemp("release") / "RoboInter-VQA")
    return root, val_annotation_files(root), _example_with_root(root, root / "datasets.yaml")


def test_the_example_registry_names_every_val_file_once_with_distinct_names(release, tmp_path):
    root, files, registry = release
    sources = resolve_data(None, split="val", registry=str(registry))
    assert sorted(Path(s.path) for s in sources) == files and len(files) == 16  # each file exactly once
    names = [s.name for s in sources]
    assert len(set(names)) == 16 and all(n.endswith("_val") for n in names)
    assert {"manipvqa_planning_val", "manipvqa_choice_val", "manipvqa_decide_val"} <= set(names)  # 3 task_planning.json
    assert {s.root for s in sources} == {str(root)}
    gone = root / "Generation/meta/val/llava_format/full_single_multi_contact_obj_final_box_qa.json"
    moved = gone.with_name("elsewhere.json")
    gone.rename(moved)
    try:  # a pattern that matches nothing: one line naming the registry, the dataset and the pattern
        with pytest.raises(UserError) as e:
            resolve_data(None, split="val", registry=str(registry))
    finally:
        moved.rename(gone)
    msg = str(e.value)
    assert "\n" not in msg and str(registry) in msg and "vla_final_box_val" in msg and "*_final_box_qa.json" in msg
    assert "elsewhere.json" in msg and "set annotation_path to one of them" in msg
    plain = next(f for f in files if "Understanding" in f.parts)  # a file named as is, not by a pattern
    plain.rename(moved)
    try:  # a missing file named as is: the registry's root as written, the first thing to check
        with pytest.raises(UserError) as e:
            resolve_data(None, split="val", registry=str(registry))
    finally:
        moved.rename(plain)
    assert str(plain) in str(e.value) and f"root = {root}" in str(e.value)


def _answers(model, processor, prompts, images, max_new_tokens):
    """A trajectory for trajectory questions, a box for box questions, a letter otherwise: answers that parse."""
    out = []
    for p in prompts:
        if "future_traj" in p:
            out.append('{"future_traj": [[0.2, 0.3], [0.4, 0.5], [0.6, 0.7]]}')
        elif "bbox" in p or "contact_point" in p:
            out.append("[[0.1, 0.2], [0.5, 0.6]]")
        else:
            out.append("A")
    return out


@pytest.fixture()
def counted(monkeypatch):
    """Counts model loads and generation passes (progress bars), and answers without the model's randomness."""
    calls = {"load": 0, "passes": 0, "prompts": 0}
    load, predict = run_mod.load_for_inference, run_mod.predict_samples

    def loading(*a, **k):
        calls["load"] += 1
        return load(*a, **k)

    def predicting(model, chat, samples, *a, **k):
        calls["passes"] += 1
        return predict(model, chat, samples, *a, **k)

    def answering(model, processor, prompts, *a):
        calls["prompts"] += len(prompts)
        return _answers(model, processor, prompts, *a)

    monkeypatch.setattr(run_mod, "load_for_inference", loading)
    monkeypatch.setattr(run_mod, "predict_samples", predicting)
    monkeypatch.setattr(gen, "generate", answering)
    return calls


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def test_every_val_file_in_one_model_load_with_one_row_each(tiny_model_dir, release, counted, tmp_path):
    root, files, registry = release
    out = tmp_path / "ev"
    res = runner.invoke(app, ["eval", str(tiny_model_dir), "--split", "val", "--registry", str(registry),
                              "--out", str(out), "--max-new-tokens", "4", "--table", "robointer"])
    assert res.exit_code == 0, res.output
    total = sum(len(json.loads(f.read_text())) for f in files)
    assert counted == {"load": 1, "passes": 1, "prompts": total}  # one model load, one progress bar
    metrics = json.loads((out / "metrics.json").read_text())
    names = list(metrics["datasets"])
    assert len(names) == len(files) == 16 and set(metrics["by_dataset"]) == set(names)
    assert {"manipvqa_planning_val", "manipvqa_choice_val", "contact_choice_qa_val"} <= set(names)
    assert sum(d["records"] for d in metrics["datasets"].values()) == metrics["count"] == total
    for name, d in metrics["datasets"].items():  # each file's numbers are its own, in metrics.json
        assert sum(s["count"] for s in metrics["by_dataset"][name].values()) == d["records"]
    preds = _lines(out / "predictions.jsonl")
    assert len({(p["dataset"], p["id"]) for p in preds}) == len(preds) == total
    traj = [p for p in preds if p.get("task") == "traj"]
    assert traj and all((p["w"], p["h"]) in ((64, 48), (32, 18)) for p in traj)  # RoboInter's h / w carried
    stats = metrics["by_dataset"]["vla_traj_init_point_qa_val"]["trajectory"]
    assert stats["dtw_px"] > 0 and stats["n_scored_px"] == len(traj)  # DTW in pixels, as the paper reports
    report = res.output[:res.output.index("robointer table")]
    assert all(name in report for name in names)  # one row per file in the printed report
    table = metrics["table"]
    by_row = {r["key"]: r for r in table["rows"]}
    assert by_row["traj"]["count"] == len(traj) and by_row["grasppose_choice"]["count"] == 2  # RH20T's only
    # the three Task_planning files reach their lines by upstream's type names in their ids
    assert [by_row[k]["upstream"]["count"] for k in ("planning", "plan_choice", "plan_decide")] == [2, 2, 2]
    # and strict scores each as what its answers are: plans by BLEU, A-D as a choice, Yes/No as yes/no
    assert [by_row[k]["count"] for k in ("planning", "plan_choice", "plan_decide")] == [2, 2, 2]
    assert [set(metrics["by_dataset"][f"manipvqa_{x}_val"]) for x in ("planning", "choice", "decide")] == [
        {"planning"}, {"choice"}, {"yesno"}]
    assert {o["dataset"] for o in table["others"]} >= {"vla_contact_point_val", "vla_traj_qa_wo_init_pos_val"}
    assert "upstream-compatible" in res.output


def test_several_data_options_and_their_names(tiny_model_dir, release, counted, tmp_path):
    root, files, registry = release
    plans = [f for f in files if f.name == "task_planning.json"]
    copy = tmp_path / "copy" / "task_planning.json"  # the same records (and ids) in another file
    copy.parent.mkdir()
    shutil.copy(plans[0], copy)
    res = runner.invoke(app, ["eval", str(tiny_model_dir), *[a for f in [*plans, copy] for a in ("--data", str(f))],
                              "--data", "contact_choice_qa_val", "--registry", str(registry), "--data-root", str(root),
                              "--out", str(tmp_path / "ev"), "--max-new-tokens", "4", "--limit", "1"])
    assert res.exit_code == 0, res.output
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert list(metrics["datasets"]) == ["choice/task_planning", "decide/task_planning", "planning/task_planning",
                                         "copy/task_planning", "contact_choice_qa_val"]  # a stem told by its folder
    assert all(d["records"] == 1 for d in metrics["datasets"].values())  # --limit counts per file
    preds = _lines(tmp_path / "ev" / "predictions.jsonl")
    assert len({p["id"] for p in preds}) < len({(p["dataset"], p["id"]) for p in preds}) == len(preds) == 5
    # (the copy shares its ids with the file it copies: an answer is matched by its file and id)
    twice = runner.invoke(app, ["eval", str(tiny_model_dir), "--data", str(plans[0]), "--data", str(plans[0])])
    assert twice.exit_code == 2 and "given twice" in twice.output
    typo = runner.invoke(app, ["eval", str(tiny_model_dir), "--data", "contact_choise_qa_val", "--registry",
                               str(registry)])
    assert typo.exit_code == 2 and "did you mean contact_choice_qa_val" in typo.output
    none = runner.invoke(app, ["eval", str(tiny_model_dir), "--split", "test", "--registry", str(registry)])
    assert none.exit_code == 2 and "*_test" in none.output and "_val" in none.output
    unset = runner.invoke(app, ["eval", str(tiny_model_dir), "--split", "val"], env={"LORA_MANIP_REGISTRY": ""})
    assert unset.exit_code == 2 and "--registry" in unset.output
    assert counted["load"] == 1 and "Traceback" not in twice.output + typo.output + none.output + unset.output


def test_missing_images_are_reported_before_the_model_loads(tiny_model_dir, release, counted, tmp_path):
    root, files, registry = release
    out = tmp_path / "ev"
    out.mkdir()  # made by the user beforehand
    res = runner.invoke(app, ["eval", str(tiny_model_dir), "--split", "val", "--registry", str(registry),
                              "--data-root", str(root / "Generation"), "--out", str(out)])
    assert res.exit_code == 2 and "image(s) not found" in res.output and "--data-root" in res.output, res.output
    assert str(root / "Generation") in res.output and "Traceback" not in res.output
    assert counted["load"] == 0 and not list(out.iterdir())


def test_a_few_missing_images_are_named_plainly_a_wrong_root_gets_the_hint(release, tmp_path):
    """Issue 24 QA: one image of many missing under the right root is named (file, record, `images[0]`, path), with
    no advice to change a root that is right; every image missing (a wrong root) still gets the --data-root hint."""
    from lora_manip.data.records import load_samples
    from lora_manip.eval.sources import missing_images

    root, files, registry = release
    sources = resolve_data(["vla_current_box_val", "traj_choice_qa_val"], registry=str(registry))
    samples = [load_samples(src.path, src.root)[0] for src in sources]
    gone = Path(samples[1][-1].images[0])
    assert sum(len(s.images) for group in samples for s in group) > 4 and missing_images(sources, samples) is None
    moved = gone.with_name("moved.jpg")
    gone.rename(moved)
    try:
        msg = missing_images(sources, samples)
    finally:
        moved.rename(gone)
    assert msg.startswith("1 image(s) not found, in traj_choice_qa_val (1)") and "\n" not in msg
    assert f"id={samples[1][-1].id!r} field `images[0]`: {gone}" in msg and "--data-root" not in msg
    wrong = resolve_data(["vla_current_box_val"], registry=str(registry), data_root=str(tmp_path))
    msg = missing_images(wrong, [load_samples(wrong[0].path, wrong[0].root)[0]])
    assert "field `images[0]`" in msg and f"looked up under {tmp_path}" in msg and "pass --data-root" in msg


def test_a_failed_run_leaves_nothing_in_the_way_and_an_interrupted_one_resumes(tiny_model_dir, release, counted,
                                                                               tmp_path, monkeypatch):
    root, files, registry = release
    out = tmp_path / "ev"
    out.mkdir()
    args = ["eval", str(tiny_model_dir), "--split", "val", "--registry", str(registry), "--out", str(out),
            "--max-new-tokens", "4", "--batch-size", "4"]

    def broken(*a, **k):
        raise UserError("the model does not load")

    monkeypatch.setattr(run_mod, "load_for_inference", broken)
    assert runner.invoke(app, args).exit_code == 2
    assert not [p for p in out.iterdir() if not p.name.startswith(".")]  # no answer made: nothing left behind
    monkeypatch.undo()
    answered = []

    def interrupted(model, processor, prompts, *a):
        if len(answered) >= 3:
            raise KeyboardInterrupt
        answered.append(len(prompts))
        return _answers(model, processor, prompts, *a)

    monkeypatch.setattr(gen, "generate", interrupted)
    assert runner.invoke(app, args).exit_code == 130  # Ctrl-C (128 + SIGINT)
    kept = _lines(out / "predictions.jsonl")
    assert len(kept) == sum(answered) > 0  # the answers made so far stay for --resume
    again = runner.invoke(app, args)
    assert again.exit_code == 2 and "--resume" in again.output
    monkeypatch.setattr(gen, "generate", _answers)
    done = runner.invoke(app, [*args, "--resume"])
    assert done.exit_code == 0, done.output
    final = _lines(out / "predictions.jsonl")
    assert all(k in final for k in kept) and len(final) == sum(len(json.loads(f.read_text())) for f in files)
    assert [r["id"] for r in final] == [r["id"] for src in resolve_data(None, split="val", registry=str(registry))
                                          for r in json.loads(Path(src.path).read_text())]  # the data's order
    moved = tmp_path / "moved.yaml"  # the same files named in another order: the same run
    reg = yaml.safe_load(registry.read_text())
    reg["datasets"] = dict(reversed(list(reg["datasets"].items())))
    moved.write_text(yaml.safe_dump(reg, sort_keys=False))
    assert runner.invoke(app, [*args[:5], str(moved), *args[6:], "--resume"]).exit_code == 0
    fewer = runner.invoke(app, ["eval", str(tiny_model_dir), "--data", str(files[0]), "--data-root", str(root),
                                "--out", str(out),
                                "--max-new-tokens", "4", "--batch-size", "4", "--resume"])
    assert fewer.exit_code == 2 and "never mixed" in fewer.output and "data" in fewer.output


def test_eval_record_carries_either_spelling_of_the_image_size():
    from lora_manip.data.records import to_sample

    conv = [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "A"}]
    for raw, size in (({"w": 320, "h": 180}, (320, 180)), ({"width": 64, "height": 48}, (64, 48)), ({}, None)):
        s = to_sample({"id": "x", "images": "a.jpg", "conversations": conv, **raw}, "f.json", "index 0", "/data")
        rec = gen.eval_record(s, "A", "d")
        assert ((rec["w"], rec["h"]) if "w" in rec else None) == size


def test_max_new_tokens_matches_upstream_and_training_keeps_its_own():
    from lora_manip.eval.run import EvalSettings
    from lora_manip.recipe.names import MAX_NEW_TOKENS, TRAIN_EVAL_MAX_NEW_TOKENS
    from lora_manip.recipe.schema import TrainCfg

    assert MAX_NEW_TOKENS == EvalSettings().max_new_tokens == 512  # RoboInter's eval scripts: --max_new_tokens 512
    assert TrainCfg.model_fields["eval_max_new_tokens"].default == TRAIN_EVAL_MAX_NEW_TOKENS == 256
    help_text = runner.invoke(app, ["eval", "--help"]).output
    assert "512" in help_text


def test_a_registry_dataset_reads_its_images_under_its_data_path(tiny_model_dir, release, counted, tmp_path):
    root, files, registry = release
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    shutil.copy(registry, elsewhere / "datasets.yaml")
    res = runner.invoke(app, ["eval", str(tiny_model_dir), "--data", "contact_choice_qa_val", "--registry",
                              str(elsewhere / "datasets.yaml"), "--max-new-tokens", "4"])
    assert res.exit_code == 0, res.output  # no --data-root: the registry's data_path (the release folder)


def test_a_val_file_is_known_by_its_registry_name_and_file_name_before_its_records_task(tiny_model_dir, release,
                                                                                         counted, tmp_path):
    """Issue 24 QA: the release's Generation val file names are not published (`val_traj_qa_wo_init_pos.json` here)
    and neither is its records' `task`: the file without a start position, whose records say task "traj", is never
    Trace, whether it is named by the registry or given as a file."""
    root, files, _ = release
    val = tmp_path / "val"
    val.mkdir()
    for stem in ("traj_qa", "traj_qa_wo_init_pos"):
        records = json.loads(next(f for f in files if f.name.endswith(f"obj_{stem}.json")).read_text())
        (val / f"val_{stem}.json").write_text(json.dumps([{**r, "task": "traj"} for r in records]))
    registry = tmp_path / "r.yaml"
    registry.write_text(yaml.safe_dump({"root": str(root), "datasets": {
        "vla_traj_init_point_qa_val": {"annotation_path": str(val / "val_traj_qa.json"), "data_path": "."},
        "vla_traj_qa_wo_init_pos_val": {"annotation_path": str(val / "val_traj_qa_wo_init_pos.json"),
                                        "data_path": "."}}}))
    n = len(json.loads((val / "val_traj_qa.json").read_text()))
    by_name = ["--data", "vla_traj_init_point_qa_val", "--data", "vla_traj_qa_wo_init_pos_val", "--registry",
               str(registry)]
    by_file = ["--data", str(val / "val_traj_qa.json"), "--data", str(val / "val_traj_qa_wo_init_pos.json"),
               "--data-root", str(root)]
    for i, given in enumerate((by_name, by_file)):
        out = tmp_path / f"ev{i}"
        res = runner.invoke(app, ["eval", str(tiny_model_dir), *given, "--out", str(out), "--max-new-tokens", "4",
                                  "--table", "robointer-files", "--upstream-compatible"])
        assert res.exit_code == 0, res.output
        metrics = json.loads((out / "metrics.json").read_text())
        rows = {r["key"]: r for r in metrics["table"]["rows"]}
        assert rows["traj"]["count"] == rows["traj_wo_init_pos"]["count"] == n  # not pooled into Trace (2n)
        assert {k: e["count"] for k, e in metrics["upstream"]["files"].items()} == {"traj": n, "traj_wo_init_pos": n}
