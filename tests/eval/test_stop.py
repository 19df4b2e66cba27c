"""A stop signal during `eval` (SIGTERM from a scheduler or `kill`, SIGHUP from a closed ssh session, SLURM's SIGUSR1)
ends it as Ctrl-C does: the answers made are kept, one line says how many and to continue with --resume, and the
exit code is training's for a preempted run with something to resume; before the first answer nothing is left
behind. The signals are real ones, sent to this process; a handler set here first turns one that eval would not
handle into a failed assertion instead of killing the test run."""

from __future__ import annotations

import json
import os
import signal

import pytest
from typer.testing import CliRunner

import lora_manip.eval.run as run_mod
from lora_manip.cli import app
from lora_manip.eval import resume
from lora_manip.train.run_folder import PREEMPTED_EXIT

runner = CliRunner()
FAST = ["--max-new-tokens", "3", "--limit", "4", "--batch-size", "2"]


class NotHandled(Exception):
    pass


@pytest.fixture()
def unhandled():
    """Before eval sets its own: a signal eval leaves unhandled raises NotHandled (the default would end pytest)."""
    def fail(signum, frame):
        raise NotHandled(signal.Signals(signum).name)

    previous = {s: signal.signal(s, fail) for s in run_mod.STOP_SIGNALS}
    yield
    for s, h in previous.items():
        signal.signal(s, h)


def _eval(model, data, out, *extra):
    res = runner.invoke(app, ["eval", str(model), "--data", str(data), "--out", str(out), *FAST, *extra])
    return res.exit_code, res.output + (f"\n{res.exception!r}" if res.exception and res.exit_code == 1 else "")


def test_eval_stops_on_the_signals_training_stops_on():
    from lora_manip.train.callbacks import PreemptionCallback

    assert set(PreemptionCallback.SIGNALS) <= set(run_mod.STOP_SIGNALS)  # a scheduler's stop reaches both alike
    assert {s.name for s in run_mod.STOP_SIGNALS} == {"SIGTERM", "SIGHUP", "SIGUSR1"}


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP", "SIGUSR1"])
def test_a_stop_signal_keeps_the_answers_made_and_says_how_to_resume(tiny_model_dir, synth_dir, tmp_path,
                                                                     monkeypatch, unhandled, sig):
    append = resume.PredictionLog.append

    def append_then_stop(self, batch):
        append(self, batch)
        os.kill(os.getpid(), getattr(signal, sig))  # after the first batch is on disk

    monkeypatch.setattr(resume.PredictionLog, "append", append_then_stop)
    out = tmp_path / "ev"
    code, text = _eval(tiny_model_dir, synth_dir / "val.json", out)
    assert code == PREEMPTED_EXIT, text
    assert f"stopped by {sig}; 2 of 4 answers are kept in {out}/predictions.jsonl" in text and "--resume" in text
    assert "Traceback" not in text and len((out / "predictions.jsonl").read_text().splitlines()) == 2
    monkeypatch.setattr(resume.PredictionLog, "append", append)
    code, text = _eval(tiny_model_dir, synth_dir / "val.json", out, "--resume")
    assert code in (0, 1), text  # 1: some record could not be scored (a tiny random model's answers)
    assert len([json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]) == 4
    assert signal.getsignal(signal.SIGTERM).__name__ == "fail"  # eval put back the handler it found


def test_a_stop_before_the_first_answer_leaves_nothing(tiny_model_dir, synth_dir, tmp_path, monkeypatch, unhandled):
    load = run_mod.load_for_inference

    def load_then_stop(*a, **k):
        model = load(*a, **k)
        os.kill(os.getpid(), signal.SIGTERM)
        return model

    monkeypatch.setattr(run_mod, "load_for_inference", load_then_stop)
    made = tmp_path / "new" / "ev"  # folders the kit makes are taken back, its parent too
    code, text = _eval(tiny_model_dir, synth_dir / "val.json", made)
    assert code == 128 + signal.SIGTERM, text
    assert "stopped by SIGTERM before the first answer" in text and "Traceback" not in text
    assert not (tmp_path / "new").exists()
    mine = tmp_path / "mine"  # made by the user: left as it was, empty
    mine.mkdir()
    code, text = _eval(tiny_model_dir, synth_dir / "val.json", mine)
    assert code == 128 + signal.SIGTERM and list(mine.iterdir()) == [], text


def test_a_signal_ignored_when_eval_starts_stays_ignored():
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as `nohup lora-manip eval ...` starts it
    try:
        with run_mod._stop_on_signals():
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, previous)
