"""The documentation says only what the kit does: every `lora-manip ...` command line in README.md and docs/ names a
sub-command and options the CLI has, every file a page points at exists, and every module docs/architecture.md names
is in the package. Commands are checked against the typer app's click tree, never run."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import typer.main

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "lora_manip"
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

_FENCE = re.compile(r"^\s*(```|~~~)")
# An inline code span may wrap onto the next line, never across a blank line (markdown's rule).
_INLINE = re.compile(r"(`+)((?:(?!\n\s*\n)[^`])+?)\1")
_OPTION = re.compile(r"(?<![\w-])--[A-Za-z][\w-]*")
# Shell separators between commands on one line; a lone `|` (without spaces) stays: tables write alternatives as
# `a\|b` inside a command.
_SEPARATORS = re.compile(r"&&|\|\||;| \| ")


def _split(text: str) -> tuple[list[tuple[int, str]], str]:
    """(line number, line) of every fenced code line (continuation lines joined), and the text with those blocks
    blanked (newlines kept, so positions still give line numbers)."""
    fenced_lines, prose, fenced, pending = [], [], False, ""
    for no, line in enumerate(text.splitlines(), 1):
        if _FENCE.match(line):
            fenced = not fenced
            prose.append("")
            continue
        prose.append("" if fenced else line)
        if fenced:
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            fenced_lines.append((no, pending + line))
            pending = ""
    return fenced_lines, "\n".join(prose)


def _spans(prose: str) -> list[tuple[int, int, str]]:
    """(line number, position, code) of every inline code span, a wrapped one joined onto one line."""
    return [(prose.count("\n", 0, m.start()) + 1, m.start(), " ".join(m.group(2).split()))
            for m in _INLINE.finditer(prose)]


def _code(text: str) -> list[tuple[int, str]]:
    """(line number, code) for every line of a fenced block and every inline code span outside them."""
    fenced_lines, prose = _split(text)
    return fenced_lines + [(no, code.replace("\\|", "|")) for no, _, code in _spans(prose)]


def _commands(text: str) -> list[tuple[int, str]]:
    """Every `lora-manip ...` command written in the page's code: shell comments cut, `a && b` split."""
    found = []
    for no, code in _code(text):
        code = re.sub(r"(^|\s)#.*$", "", code)
        for part in _SEPARATORS.split(code):
            part = part.strip()
            if part == "lora-manip" or part.startswith("lora-manip "):
                found.append((no, part))
    return found


def _options(cmd) -> set[str]:
    names = {"--help"}
    for p in cmd.params:
        names |= {o for o in [*p.opts, *getattr(p, "secondary_opts", [])] if o.startswith("--")}
    return names


def command_problems(line: str) -> list[str]:
    """What the CLI lacks of one `lora-manip ...` line: a sub-command, or options the command it names has not."""
    from lora_manip.cli import app

    cmd = typer.main.get_command(app)
    words = line.split()[1:]
    path = ["lora-manip"]
    # typer vendors its own click: a group is whatever has sub-commands.
    while words and hasattr(cmd, "commands") and not words[0].startswith("-"):
        sub = cmd.commands.get(words[0])
        if sub is None:
            return [f"`{' '.join(path)}` has no sub-command {words[0]!r} (it has: {', '.join(sorted(cmd.commands))})"]
        cmd, path = sub, path + [words.pop(0)]
    known = _options(cmd)
    return [f"`{' '.join(path)}` has no option {o}" for o in _OPTION.findall(" ".join(words)) if o not in known]


def _all_commands() -> list[tuple[str, int, str]]:
    return [(page.relative_to(ROOT).as_posix(), no, cmd) for page in PAGES for no, cmd in _commands(page.read_text())]


def test_pages_show_commands():
    # The collector finds what it must: the README's card and its CLI table are commands.
    found = {cmd.split()[1] for page, _, cmd in _all_commands() if page == "README.md" and len(cmd.split()) > 1}
    assert {"train", "merge", "eval", "score", "predict", "convert", "data", "demo", "tiny-model"} <= found


@pytest.mark.parametrize("page", [p.relative_to(ROOT).as_posix() for p in PAGES])
def test_every_command_line_exists_in_the_cli(page):
    problems = [f"{page}:{no}: {msg}   [{cmd}]" for p, no, cmd in _all_commands() if p == page
                for msg in command_problems(cmd)]
    assert not problems, "\n".join(problems)


def test_a_wrong_option_or_sub_command_is_caught():
    assert command_problems("lora-manip merge runs/x --out y --no-verify --base-as-trained") == []
    assert command_problems("lora-manip data check r.yaml --json") == []
    assert command_problems("lora-manip merge runs/x --outdir y") == ["`lora-manip merge` has no option --outdir"]
    assert command_problems("lora-manip data chek r.yaml")[0].startswith("`lora-manip data` has no sub-command 'chek'")
    text = "```bash\nlora-manip demo && lora-manip train r.yaml --dryrun   # --not-an-option in a comment\n```\n"
    assert [command_problems(c) for _, c in _commands(text)] == [[], ["`lora-manip train` has no option --dryrun"]]
    table_row = "| `lora-manip eval M [--resume\\|--force]` | x |"
    assert _commands(table_row) == [(1, "lora-manip eval M [--resume|--force]")]
    assert _commands("run `lora-manip train r.yaml\n--dryrun` now") == [(1, "lora-manip train r.yaml --dryrun")]


# ---------------------------------------------------------------------------------------------- files and modules

_ROOTS = ("lora_manip", "tests", "benchmarks", "recipes", "docs", ".ci")
_FILE = re.compile(r"^(?:lora_manip|tests|benchmarks|recipes|docs|\.ci)/[\w./*-]*(?:::[\w*]+)?$"
                   r"|^[\w/]+\.py(?:::[\w*]+)?$")
_DOTTED = re.compile(r"^lora_manip(?:\.\w+)+$")
_PACKAGE_HEADING = re.compile(r"\*\*(\w+)/\*\*|\*\*(core)\*\*")


def _top_level_names(path: Path) -> set[str]:
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {t.id for t in targets if isinstance(t, ast.Name)}
        elif isinstance(node, ast.ImportFrom):
            names |= {a.asname or a.name for a in node.names}
    return names


def file_problem(ref: str, package: str | None = None) -> str | None:
    """Why a file reference (`tests/x/test_y.py::test_z`, `train/grpo.py`, a bare `encode.py` under a package's
    heading, `recipes/*.yaml`) points at nothing, or None."""
    path, _, test = ref.partition("::")
    if "/" in path:
        candidates = [ROOT / path, PACKAGE / path]
    else:
        candidates = [PACKAGE / package / path] if package else [PACKAGE / path]
    hits = [c for p in candidates for c in (sorted(p.parent.glob(p.name)) if "*" in p.name else [p]) if c.exists()]
    if not hits:
        return f"{ref}: no such file"
    if test:
        pattern = re.compile("^" + re.escape(test).replace(r"\*", r"\w*") + "$")
        if not any(pattern.match(n) for h in hits if h.suffix == ".py" for n in _top_level_names(h)):
            return f"{ref}: no {test} in {hits[0].relative_to(ROOT)}"
    return None


def dotted_problem(name: str) -> str | None:
    """Why `lora_manip.a.b` (a module, or a name defined at a module's top level) names nothing, or None."""
    parts = name.split(".")[1:]
    for cut in range(len(parts), -1, -1):
        base = PACKAGE.joinpath(*parts[:cut])
        module = base.with_suffix(".py") if cut and base.with_suffix(".py").exists() else base / "__init__.py"
        if module.exists():
            rest = parts[cut:]
            if not rest:
                return None
            if len(rest) == 1 and rest[0] in _top_level_names(module):
                return None
            if len(rest) > 1:
                return f"{name}: no module lora_manip.{'.'.join(parts[:cut + 1])}"
            return f"{name}: {module.relative_to(ROOT)} has no {rest[0]}"
    return f"{name}: no such module"


def _ours(ref: str) -> bool:
    # A path of this repository or of the package (`train/grpo.py`); not an upstream file such as RoboPoint's
    # `robopoint/eval/summarize_vqa.py`.
    head = ref.split("/", 1)[0]
    return "/" in ref and (head in _ROOTS or (PACKAGE / head).is_dir())


def _anchors(page: Path) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces to hyphens."""
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
            for h in re.findall(r"^#+ (.+)$", _split(page.read_text())[1], re.M)}


def reference_problems(text: str, packages: bool = False, page: Path = ROOT / "README.md") -> list[str]:
    """Problems of every file, module and local link (with its #anchor) a page names. With `packages`, a bare `x.py`
    after a `**pkg/**` heading is pkg's module (docs/architecture.md's module list)."""
    problems = []
    _, prose = _split(text)
    heads = [(m.start(), m.group(1) or "") for m in _PACKAGE_HEADING.finditer(prose)]
    for no, pos, ref in _spans(prose):
        package = ([None] + [pkg for at, pkg in heads if at < pos])[-1]
        if _DOTTED.match(ref):
            problem = dotted_problem(ref)
        elif _FILE.match(ref) and (packages or _ours(ref)):
            problem = file_problem(ref, package if packages else None)
        else:
            continue
        if problem:
            problems.append(f"{no}: {problem}")
    for m in re.finditer(r"\]\(([^)\s]*)\)", prose):
        link, _, anchor = m.group(1).partition("#")
        if re.match(r"^[a-z]+:", link):
            continue
        no = prose.count("\n", 0, m.start()) + 1
        target = (page.parent / link) if link else page
        if not target.exists():
            problems.append(f"{no}: link {m.group(1)}: no such file")
        elif anchor and target.suffix == ".md" and anchor not in _anchors(target):
            problems.append(f"{no}: link {m.group(1)}: {link or 'this page'} has no heading #{anchor}")
    return problems


@pytest.mark.parametrize("page", [p.relative_to(ROOT).as_posix() for p in PAGES])
def test_every_file_and_module_a_page_names_exists(page):
    problems = reference_problems((ROOT / page).read_text(), packages=page == "docs/architecture.md", page=ROOT / page)
    assert not problems, page + ":\n" + "\n".join(problems)


def test_architecture_names_its_modules():
    # Not vacuous: the module list is read, and a module that is gone is caught.
    text = (ROOT / "docs" / "architecture.md").read_text()
    assert len([m for m in _INLINE.finditer(text) if m.group(2).endswith(".py")]) > 40
    assert reference_problems("**data/** — `encode.py`, `lengths.py`.", packages=True) == [
        "1: lengths.py: no such file"]
    assert reference_problems("**core** — `errors.py`. **eval/** — `run.py`", packages=True) == []
    assert dotted_problem("lora_manip.eval.parse.classify_task") == ("lora_manip.eval.parse.classify_task: "
                                                                     "no module lora_manip.eval.parse")
    assert dotted_problem("lora_manip.answers.kinds.classify_task") is None
    assert file_problem("tests/test_demo.py") == "tests/test_demo.py: no such file"
    assert reference_problems("see `tests/test_demo.py` and [x](docs/nothing.md)") == [
        "1: tests/test_demo.py: no such file", "1: link docs/nothing.md: no such file"]
    assert reference_problems("RoboPoint's `robopoint/eval/summarize_vqa.py`") == []  # upstream files: not ours
    assert reference_problems("[a](docs/training.md#resuming), [b](docs/training.md#resume), [c](#the-cli)") == [
        "1: link docs/training.md#resume: docs/training.md has no heading #resume"]
    assert file_problem("tests/proofs/test_demo.py::test_nothing_like_this").endswith("no test_nothing_like_this "
                                                                                       "in tests/proofs/test_demo.py")


def test_readme_is_a_short_guide_that_starts_with_the_two_commands():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 300
    blocks = re.findall(r"```bash\n(.*?)```", readme, re.S)
    ci = (ROOT / ".ci" / "run").read_text()
    test_command = blocks[1].strip()
    assert "lora-manip demo" in blocks[0] and test_command.endswith("python -m pytest -q -n 2")
    assert test_command in ci, "the README's test command is the one .ci/run runs"
    assert 'python -m pytest -q -m "not slow"' in readme
    for page in ("training", "data", "evaluation", "merge-convert", "grpo", "reliability", "benchmarks"):
        assert f"docs/{page}.md" in readme
