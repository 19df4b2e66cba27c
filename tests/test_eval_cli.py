"""eval / score / predict through the CLI on the tiny model and synthetic records."""

import json

from PIL import Image
from typer.testing import CliRunner

from lora_manip.cli import app

runner = CliRunner()


def test_eval_writes_metrics_predictions_and_overlays(tiny_model_dir, synth_dir, tmp_path):
    out = tmp_path / "eval"
    result = runner.invoke(app, ["eval", str(tiny_model_dir), "--data", str(synth_dir / "val.json"),
                                 "--out", str(out), "--max-new-tokens", "24", "--batch-size", "4"])
    assert result.exit_code == 0, result.output
    assert "parse-fail" in result.output  # the table
    metrics = json.loads((out / "metrics.json").read_text())
    rows = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    val = json.loads((synth_dir / "val.json").read_text())
    assert metrics["count"] == len(rows) == len(val)
    assert {r["id"] for r in rows} == {r["id"] for r in val}
    assert all({"prompt", "pred_text", "gt", "kind"} <= r.keys() for r in rows)
    assert metrics["mode"] == "strict"
    # a random model's answers do not parse as boxes: strict mode counts them as failures, not skips
    if "box" in metrics["all"]:
        assert metrics["all"]["box"]["count"] == sum(r["kind"] == "box" for r in rows)
    if any(r["kind"] in ("box", "point", "trajectory") for r in rows):
        assert (out / "overlays" / "contact_sheet.png").is_file()


def test_score_cli_strict_vs_upstream(tmp_path):
    preds = tmp_path / "preds.jsonl"
    preds.write_text("\n".join(json.dumps(r) for r in [
        {"id": 1, "pred": "", "gt": "B"},
        {"id": 2, "pred": "C", "gt": "C"},
        {"id": 3, "pred": '{"current_bbox": [[0.1, 0.1], [0.5, 0.5]]}',
         "gt": '{"current_bbox": [[0.1, 0.1], [0.5, 0.5]]}', "w": 640, "h": 480},
    ]) + "\n")
    strict = runner.invoke(app, ["score", str(preds), "--out", str(tmp_path / "s")])
    assert strict.exit_code == 0, strict.output
    m = json.loads((tmp_path / "s" / "metrics.json").read_text())
    assert m["all"]["choice"]["accuracy"] == 0.5 and m["all"]["box"]["mean_iou"] == 1.0
    upstream = runner.invoke(app, ["score", str(preds), "--upstream-compatible", "--out", str(tmp_path / "u")])
    assert upstream.exit_code == 0 and "upstream-compatible" in upstream.output
    m = json.loads((tmp_path / "u" / "metrics.json").read_text())
    assert m["all"]["choice"]["accuracy"] == 1.0  # upstream counts the empty answer as correct


def test_score_cli_bad_input_is_one_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1, "pred": "A", "gt": "A"}\n{"id": 2, "pred": \n')
    result = runner.invoke(app, ["score", str(bad)])
    assert result.exit_code == 2 and "line 2" in result.output and "Traceback" not in result.output


def test_predict_answers_and_draws(tiny_model_dir, tmp_path):
    img = tmp_path / "scene.png"
    Image.new("RGB", (320, 180), (90, 60, 30)).save(img)
    result = runner.invoke(app, ["predict", str(tiny_model_dir), str(img), "Where is the red cube?",
                                 "--max-new-tokens", "8"])
    assert result.exit_code == 0, result.output
    missing = runner.invoke(app, ["predict", str(tiny_model_dir), str(tmp_path / "none.png"), "q"])
    assert missing.exit_code == 2 and "cannot read image" in missing.output
