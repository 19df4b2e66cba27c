"""`~` in a path the shell left alone (in quotes, after `--opt=`, in YAML) means the home folder in every command:
before, `data check '~/x.json'` said "not found" and `tiny-model --opt=~/m`-style outputs became a folder named `~`
in the working directory."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from lora_manip.cli import app

runner = CliRunner()


def test_every_path_argument_and_option_reads_a_tilde_as_home(tmp_path, monkeypatch):
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir(), work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)

    def run(*args):
        r = runner.invoke(app, list(args))
        assert r.exit_code == 0, r.output
        return r.output

    run("data", "synth", "~/synth", "--n", "6")
    assert (home / "synth" / "train.json").is_file()
    run("data", "check", "~/synth/train.json", "--data-root=~/synth")
    (home / "px.json").write_text(json.dumps([{**json.loads((home / "synth/train.json").read_text())[0]}]))
    run("data", "normalize", "~/px.json", "~/out.json", "--from", "thousand", "--data-root=~/synth")
    assert (home / "out.json").is_file()
    run("tiny-model", "~/tiny")
    assert (home / "tiny" / "config.json").is_file()
    assert list(work.iterdir()) == []  # nothing named `~` (or anything else) beside the command
