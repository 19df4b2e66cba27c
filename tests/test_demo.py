"""The demo as users run it (recipes/tiny_cpu.yaml through `run_demo`), in a temporary folder: the fine-tuned
tiny model must beat the same model before fine-tuning on boxes and on choice questions."""

from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


@pytest.mark.slow
def test_demo_fine_tuning_beats_the_base_model(tmp_path, monkeypatch):
    from lora_manip import demo

    captured = {}
    real_compare = demo.compare
    monkeypatch.setattr(demo, "compare", lambda b, a: captured.update(before=b, after=a) or real_compare(b, a))
    data = tmp_path / "synth"
    report = demo.run_demo(ROOT / "recipes" / "tiny_cpu.yaml", [
        f"model.path={tmp_path / 'tiny'}", f"train.output_dir={tmp_path / 'run'}",
        f"data.train.0.annotation_path={data / 'train.json'}", f"data.train.0.data_path={data}",
        f"data.val.0.annotation_path={data / 'val.json'}", f"data.val.0.data_path={data}"], limit=80)
    print(report)
    before, after = captured["before"]["all"], captured["after"]["all"]
    assert "before vs after fine-tuning" in report
    assert after["box"]["parse_failure_rate"] < 0.1 < before["box"]["parse_failure_rate"]
    assert after["box"]["mean_iou"] > before["box"]["mean_iou"]
    assert after["box"]["acc@0.1"] > before["box"]["acc@0.1"]
    # Choice: the letter must follow the image (which container), not just parse: at least twice the ~0.25 a
    # constant letter scores, and well above the base model. 80 records hold 38 choice questions.
    assert after["choice"]["parse_failure_rate"] == 0.0 < before["choice"]["parse_failure_rate"]
    assert after["choice"]["accuracy"] >= max(0.5, before["choice"]["accuracy"] + 0.3)
    assert (tmp_path / "run-merged" / "config.json").is_file()
    assert (tmp_path / "run" / "loss.png").is_file()
