"""`lora-manip --help` is instant: importing the CLI, and asking it or any command for help, imports no torch (nor
transformers / PEFT, which pull torch in: seconds of import each). Each check runs in a fresh interpreter, as this
test process has torch loaded already."""

from __future__ import annotations

import re
import subprocess
import sys

HEAVY = ("torch", "transformers", "peft")


def _python(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300)


def test_importing_the_cli_imports_no_torch():
    r = _python("-c", "import lora_manip.cli, sys; assert 'torch' not in sys.modules; "
                f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "[]", r.stdout


def test_lora_manip_help_imports_no_torch():
    # the command as a user runs it, with Python's import log: no heavy package may appear in it
    r = _python("-X", "importtime", "-m", "lora_manip.cli", "--help")
    assert r.returncode == 0 and "Usage:" in r.stdout, r.stdout + r.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in r.stderr.splitlines() if line.startswith("import time:")}
    assert imported and not {m for m in imported if m.split(".")[0] in HEAVY}


def test_every_commands_help_imports_no_torch():
    # one interpreter asks every command for --help in turn and names those whose help imported a heavy package
    code = f"""
import sys
from lora_manip.cli import app, data_app
commands = [[]] + [[c.name or c.callback.__name__] for c in app.registered_commands] + [["data"]] \\
    + [["data", c.name] for c in data_app.registered_commands]
for args in commands:
    sys.argv = ["lora-manip", *args, "--help"]
    try:
        app()
    except SystemExit as e:
        assert e.code in (0, None), (args, e.code)
    heavy = [m for m in {HEAVY!r} if m in sys.modules]
    print("RESULT", " ".join(args) or "lora-manip", heavy)
"""
    r = _python("-c", code)
    assert r.returncode == 0, r.stderr[-2000:]
    results = re.findall(r"^RESULT (.+) (\[.*\])$", r.stdout, re.M)
    assert len(results) >= 10, r.stdout[-2000:]  # every command, data's sub-commands included
    assert [name for name, heavy in results if heavy != "[]"] == []


def test_option_choices_come_from_their_tables():
    """What an option's help lists is the table the command checks against, not a copy."""
    from typer.testing import CliRunner

    from lora_manip.answers.geometry import COORDS
    from lora_manip.answers.kinds import KINDS
    from lora_manip.cli import app
    from lora_manip.dtypes import WEIGHT_NAMES, WEIGHT_SHORT_NAMES
    from lora_manip.recipe.names import EVAL_BACKENDS

    def help_of(*args) -> str:
        r = CliRunner().invoke(app, [*args, "--help"], env={"COLUMNS": "400", "TERMINAL_WIDTH": "400"})
        assert r.exit_code == 0, r.output
        return " ".join(r.output.split())

    assert " | ".join(WEIGHT_NAMES) in help_of("tiny-model")
    assert " | ".join(WEIGHT_SHORT_NAMES) in help_of("merge")
    for command in ("eval", "score", "predict"):
        assert " | ".join(COORDS) in help_of(command), command
    assert ", ".join(KINDS) in help_of("eval") and ", ".join(KINDS) in help_of("score")
    assert " | ".join(EVAL_BACKENDS) in help_of("eval")
    # tables in modules too heavy for the CLI to import: the help explains each choice, and names every one
    from lora_manip.checkpoints.convert import FORMATS
    from lora_manip.data.normalize import MODES

    assert all(f in help_of("convert") for f in FORMATS)
    assert all(m in help_of("data", "normalize") for m in MODES)
