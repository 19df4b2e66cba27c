"""Which annotation files one `lora-manip eval` reads, and where their images are: `--data` files and registry
names (repeatable), a registry split (`--split val`: every dataset of the registry named ``*_val``, as upstream names
its sets ``*_train``), and each file's image root. Everything here is checked before a model loads: a file given twice,
an unknown name, and every image a record names that is not on disk (a wrong `--data-root` is found in seconds, not
after the model has loaded).

The registry is the one recipes read (recipe/registry.py): `--registry PATH`, else the LORA_MANIP_REGISTRY
environment variable. A registry dataset's images are relative to its ``data_path``; a plain file's to its own folder;
`--data-root` overrides both for every file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from ..recipe.registry import ENV_VAR, Registry, known_names, load_registry

__all__ = ["EvalData", "resolve_data", "missing_images", "file_names"]


@dataclass(frozen=True)
class EvalData:
    """One annotation file of an eval: `name` is its dataset name in predictions.jsonl, the report and metrics.json
    (the registry's name, else the file's stem, made unique with its parent folders), `root` its image folder."""

    name: str
    path: str
    root: str
    root_from: str = "--data-root"  # where `root` came from, for the message when its images are missing


def _registry(path: str | None) -> tuple[Registry, str]:
    where = path or os.environ.get(ENV_VAR)  # load_registry reads `~` as the home folder
    if not where:
        raise UserError(f"a dataset name or --split needs a registry: pass --registry datasets.yaml or set {ENV_VAR} "
                        "(recipes/registry/datasets.example.yaml is one), or give --data a file")
    try:
        return load_registry(where), where
    except ValueError as e:
        raise UserError(f"--registry: {e}") from None


def _looks_like_a_file(item: str) -> bool:
    return os.sep in item or "/" in item or item.lower().endswith((".json", ".jsonl"))


def _unique_names(items: list[tuple[str, str, bool]]) -> list[str]:
    """Dataset names: the registry's own, else the file's stem; a stem several files share gets as many parent
    folders as tell them apart (Task_planning's val files are all task_planning.json: "choice/task_planning")."""
    names = [n for n, _, _ in items]
    parts = [Path(p).resolve().with_suffix("").parts[1:] for _, p, _ in items]
    for depth in range(1, max(len(x) for x in parts) + 1):
        clash = {n for n in names if names.count(n) > 1}
        grow = [i for i, n in enumerate(names) if n in clash and not items[i][2]]
        if not grow:
            break
        for i in grow:
            names[i] = "/".join(parts[i][-1 - depth:])
    return names


def file_names(paths: list[str | os.PathLike]) -> list[str]:
    """Each file's dataset name as eval gives it: its stem, with parent folders where stems clash."""
    return _unique_names([(Path(p).stem, str(p), False) for p in paths])


def resolve_data(data: list[str] | None, split: str | None = None, registry: str | None = None,
                 data_root: str | None = None) -> list[EvalData]:
    """The files to evaluate, in the order given (`--data` items, then the split's datasets in registry order)."""
    table: Registry | None = None
    where = ""
    found: list[tuple[str, str, str | None, str]] = []  # (name, path, registry data_path, what named it)
    if data_root:  # a wrong root would otherwise read as every image missing
        data_root = os.path.expanduser(data_root)
        if not Path(data_root).is_dir():
            what = "is a file, not a folder" if Path(data_root).exists() else "no such folder"
            raise UserError(f"--data-root {data_root}: {what} (the folder the records' image paths start at)")
    for item in data or []:
        item = os.path.expanduser(item)  # the shell leaves `~` in --data=~/val.json and in quotes
        if Path(item).is_file() or _looks_like_a_file(item):
            if not Path(item).is_file():
                raise UserError(f"--data {item}: no such file")
            found.append((Path(item).stem, item, None, f"--data {item}"))
            continue
        if table is None:
            table, where = _registry(registry)
        if item not in table:
            raise UserError(f"--data {item}: not a file, nor a dataset of the registry {where}; "
                            f"{known_names(item, list(table))}")
        found.append((item, table[item]["annotation_path"], table[item]["data_path"], f"--data {item}"))
    if split:
        if table is None:
            table, where = _registry(registry)
        names = [n for n in table if n.endswith(f"_{split}")]
        if not names:
            ends = sorted({n.rsplit("_", 1)[-1] for n in table if "_" in n})
            raise UserError(f"--split {split}: the registry {where} names no dataset *_{split} (its names end in "
                            f"{', '.join('_' + e for e in ends[:6]) or 'nothing'})")
        found += [(n, table[n]["annotation_path"], table[n]["data_path"], f"--split {split}") for n in names]
    if not found:
        raise UserError("nothing to evaluate: give --data FILE (repeatable) or --split NAME with a registry")
    seen: dict[Path, str] = {}
    for _, path, reg_root, what in found:
        key = Path(path).resolve()
        if key in seen:  # its answers would be generated and counted twice
            raise UserError(f"{path}: given twice ({seen[key]} and {what}); each file is evaluated once")
        seen[key] = what
        if not Path(path).is_file():
            hint = table.root_hint() if reg_root is not None and table is not None else "check the path"
            raise UserError(f"{what}: annotation file {path} not found; {hint}")
    names = _unique_names([(n, p, reg is not None) for n, p, reg, _ in found])
    out = []
    for name, (_, path, reg_root, _) in zip(names, found):
        if data_root:
            root, source = data_root, "--data-root"
        elif reg_root is not None:
            root, source = reg_root, "the registry's data_path"
        else:
            root, source = str(Path(path).parent), "the annotation file's folder"
        out.append(EvalData(name, str(path), str(root), source))
    return out


def missing_images(sources: list[EvalData], samples: list[list]) -> str | None:
    """None when every image the records name is a file, else one line: how many are missing, in which files, the
    first ones with their records and fields (`images[0]`, as `data check` names them). The root they were looked
    up under, and `--data-root` as the fix, only when the root looks wrong (half or more of a file's images missing);
    a few missing among many found are named plainly: the root is right, those files are not there."""
    missing: list[tuple[EvalData, object, int, str]] = []
    per_file: dict[str, int] = {}
    wrong_root = False
    for src, group in zip(sources, samples):
        total = gone = 0
        for s in group:
            for k, p in enumerate(s.images):
                total += 1
                if not os.path.isfile(p):
                    gone += 1
                    missing.append((src, s, k, p))
        if gone:
            per_file[src.name] = gone
            wrong_root = wrong_root or 2 * gone >= total
    if not missing:
        return None
    files = ", ".join(f"{n} ({k})" for n, k in list(per_file.items())[:4]) + (", ..." if len(per_file) > 4 else "")
    src, s, k, p = missing[0]
    if wrong_root:
        return (f"{len(missing)} image(s) not found, in {files}; first: {s.source} id={s.id!r} field `images[{k}]`: "
                f"{p} (looked up under {src.root}, {src.root_from}); pass --data-root with the folder the records' "
                "image paths start at")
    shown = "; ".join(f"{s.source} id={s.id!r} field `images[{k}]`: {p}" for _, s, k, p in missing[:3])
    more = f"; and {len(missing) - 3} more (`lora-manip data check` lists each)" if len(missing) > 3 else ""
    return (f"{len(missing)} image(s) not found, in {files} (the others are there): {shown}{more}; restore them or "
            "remove their records")
