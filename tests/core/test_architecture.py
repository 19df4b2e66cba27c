"""The package's shape (docs/architecture.md): layers along the data flow, imports only downward or sideways, no
circles, no module over the size a reader takes in at once. Imports inside functions count: hiding one there keeps
`--help` fast but does not remove the coupling."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "lora_manip"

# Lowest first. A module may import from its own layer and the layers below it, never from one above.
# train sits above eval and checkpoints: evaluation during training and GRPO's rewards score with eval's metrics,
# and training writes checkpoints in the base's layout. model/layouts.py (the tensor-name table) sits in model
# because the tiny-model writer and the part table read it, and checkpoints/ builds on model/.
LAYERS = [
    ("core", ["errors", "dtypes", "fsutil", "outputs", "runinfo", "hub"]),
    ("recipe", ["recipe"]),
    ("answers", ["answers"]),
    ("data", ["data"]),
    ("model", ["model"]),
    ("checkpoints", ["checkpoints"]),
    ("eval", ["eval"]),
    ("train", ["train"]),
    ("entry", ["cli", "demo", "__main__"]),
]
MAX_LINES = 400


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    pkg = name.split(".")[:-1] if path.name != "__init__.py" else name.split(".")
    deps = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg[: len(pkg) - node.level + 1]
                mod = ".".join([*base, *([node.module] if node.module else [])])
            elif (node.module or "").startswith("lora_manip"):
                mod = node.module.removeprefix("lora_manip").lstrip(".")
            else:
                continue
            for alias in node.names:
                full = f"{mod}.{alias.name}".lstrip(".")
                deps.add(full if full in modules else mod)
        elif isinstance(node, ast.Import):
            deps |= {a.name.removeprefix("lora_manip.") for a in node.names if a.name.startswith("lora_manip.")}
    return {d for d in deps if d and d != name}


def _layer(name: str) -> int | None:
    for i, (_, prefixes) in enumerate(LAYERS):
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            return i
    return None


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {n: _imports(n, p, modules) for n, p in modules.items() if n}


def test_every_module_has_a_layer_and_imports_only_downward():
    graph = _graph()
    unplaced = sorted(n for n in graph if _layer(n) is None)
    assert not unplaced, "modules in no layer (add them to LAYERS and docs/architecture.md): " + ", ".join(unplaced)
    upward = []
    for name, deps in sorted(graph.items()):
        for dep in sorted(deps):
            if _layer(dep) > _layer(name):
                upward.append(f"{name} ({LAYERS[_layer(name)][0]}) imports {dep} ({LAYERS[_layer(dep)][0]})")
    assert not upward, "imports that go up a layer:\n" + "\n".join(upward)


def test_no_import_cycles():
    graph = _graph()
    cycles, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == "open":
                cycles.append(" -> ".join(stack[stack.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_no_module_over_the_size_limit():
    long = {n: len(p.read_text().splitlines()) for n, p in _modules().items()}
    over = sorted(f"{n}: {k} lines" for n, k in long.items() if k > MAX_LINES)
    assert not over, f"modules over {MAX_LINES} lines:\n" + "\n".join(over)


def test_the_checker_sees_function_level_and_relative_imports(tmp_path):
    # the rules above are only as good as the import reader: it must see imports hidden in functions
    mod = tmp_path / "m.py"
    mod.write_text("def f():\n    from ..train.grpo import x\n    from . import sampler\n")
    modules = {"data.m": mod, "train.grpo": mod, "data.sampler": mod}
    assert _imports("data.m", mod, modules) == {"train.grpo", "data.sampler"}
