"""The dataset registry: a YAML file naming datasets and their files, written once per machine, so recipes name
datasets (`rh20t_vla_current_box_train`, `droid_traj_choice_qa_train%30`) instead of paths. Upstream keeps this
table in Python code; here it is data:

    root: /mnt/data/RoboInter          # optional: relative paths below are resolved against it
    datasets:                          #   (default: the folder of this file)
      rh20t_vla_current_box_train:
        annotation_path: Generation/meta/train/rh20t/llava_format/current_box_qa.json
        data_path: Generation/image/train/rh20t

A recipe points at it with `data.registry: path/to/datasets.yaml` (relative to the working directory, like every
recipe path), or the LORA_MANIP_REGISTRY environment variable. A recipe entry that names a dataset and leaves out
annotation_path / data_path gets them from the registry; an entry may also give them inline (then the registry is
not consulted for that field). `name%NN` samples NN percent of the dataset, like upstream.

`name: all` (upstream's mixture name) stands for the registry's datasets, in the registry's order, each with the
entry's other settings (`all%30` samples 30% of each): in data.train every dataset not named ``*_val`` or ``*_test``
(the held-out sets `eval --split` reads, never trained on), in data.val every ``*_val`` one. Upstream's
own `all` does not work: the LLaVA-OneVision loader's table leaves out `manipvqa_train`, and the Qwen-VL loader
registers `"all": None`, which its `data_list` then tries to copy. A registry that defines a dataset called `all`
gets that dataset instead.

An annotation_path may end in a glob pattern (`*`, `?`, `[...]` in the file name only; folders are literal), for
files whose names are not published (RoboInter-VQA's Generation val files), with `{a,b}` for spellings that are
equally likely: `Generation/meta/val/llava_format/{,*_}contact_box{,_qa}.json` is `contact_box.json`,
`contact_box_qa.json`, `*_contact_box.json` or `*_contact_box_qa.json`. Together they must match exactly one file,
and are matched when its dataset is looked up, not when the registry is read: a machine without some of the files
can still use the others. A path that exists as written is that file, even when its name holds `[`, `{` or `*`.
"""

from __future__ import annotations

import difflib
import fnmatch
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path

import yaml

from ..errors import UserError

ENV_VAR = "LORA_MANIP_REGISTRY"
HELD_OUT = ("_val", "_test")  # name endings of the sets `eval --split` reads; `all` in data.train leaves them out
_GLOB = re.compile(r"[*?[]")
_BRACES = re.compile(r"\{([^{}]*,[^{}]*)\}")  # {a,b}: either spelling (no nesting)
_LISTED = 10  # file names an error lists at most
_PERCENT = re.compile(r"^(?P<name>.*?)%(?P<pct>\d+(?:\.\d+)?)$")


def split_percent(name: str) -> tuple[str, float | None]:
    """'rh20t_vla_current_box_train%30' -> ('rh20t_vla_current_box_train', 0.3); a name without % -> (name, None).
    Raises ValueError for a malformed or out-of-range percentage."""
    if "%" not in name:
        return name, None
    m = _PERCENT.match(name)
    if not m or not m["name"]:
        raise ValueError(f"{name!r}: expected NAME%NN with NN a percentage, like upstream's dataset%30")
    pct = float(m["pct"])
    if not 0 < pct <= 100:
        raise ValueError(f"{name!r}: the percentage must be in (0, 100]")
    return m["name"], pct / 100


class RegistryError(UserError, ValueError):
    """A registry dataset's annotation pattern that does not match exactly one file: a UserError for eval's sources, a
    ValueError for the recipe, which reports it under the entry's key path like the registry's other problems."""


class Registry(Mapping):
    """A registry file's datasets: name -> {"annotation_path", "data_path"}, both absolute. Looking a dataset up
    resolves its annotation pattern (match_annotation), so training, `data check` and eval all read the same file."""

    def __init__(self, path: Path, entries: dict[str, dict[str, str]], written: dict[str, str],
                 root: Path | None = None, root_written: str | None = None):
        self.path, self._entries, self._written = path, entries, written
        self.root, self._root_written = root or path.parent, root_written
        self._resolved: dict[str, dict[str, str]] = {}

    def __getitem__(self, name: str) -> dict[str, str]:
        if name not in self._resolved:
            entry = self._entries[name]
            where = f"registry file {self.path}: datasets.{name}.annotation_path {self._written[name]!r}"
            self._resolved[name] = {**entry, "annotation_path": match_annotation(entry["annotation_path"], where,
                                                                                 self.root_hint())}
        return dict(self._resolved[name])

    def data_path(self, name: str) -> str:
        """The dataset's data_path, its annotation pattern left alone."""
        return self._entries[name]["data_path"]

    def unmatched(self, name: str, key: str) -> str:
        """The dataset's `key` (annotation_path / data_path) made absolute, an annotation pattern left unmatched:
        a recipe entry whose path equals it took that path from this registry."""
        return self._entries[name][key]

    def root_hint(self) -> str:
        """What to check when a file this registry names is missing: its root, as written and as resolved."""
        if self._root_written is None:
            return (f"check the registry's root ({self.path} sets none: its paths are relative to its folder "
                    f"{self.root})")
        resolved = "" if str(self.root) == self._root_written else f", i.e. {self.root}"
        return f"check the registry's root ({self.path}: root = {self._root_written}{resolved})"

    def __contains__(self, name: object) -> bool:  # Mapping's default would resolve the pattern
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


def match_annotation(path: str, where: str, hint: str = "check the registry's root") -> str:
    """`path` itself when its file name has no glob character or it exists as written; else the one file of its
    folder whose name matches. Raises RegistryError (one line starting with `where`) on no match or several;
    `hint` says what to check when the folder is missing."""
    p = Path(path)
    if not _is_pattern(p.name) or p.exists():
        return path
    folder = p.parent
    if not folder.is_dir():
        only = "; only the file name may be a pattern" if _is_pattern(str(folder)) else ""
        raise RegistryError(f"{where}: folder {folder} not found; {hint}{only}")
    spellings = _spellings(p.name)
    hidden = any(a.startswith(".") for a in spellings)  # as glob: `*` does not match a leading dot
    names = sorted(n for n in os.listdir(folder) if not n.startswith(".") or hidden)
    hits = [n for n in names if any(fnmatch.fnmatchcase(n, a) for a in spellings) and (folder / n).is_file()]
    if len(hits) == 1:
        return str(folder / hits[0])
    pattern = repr(p.name) + (f" (any of {', '.join(spellings)})" if len(spellings) > 1 else "")
    if hits:
        raise RegistryError(f"{where}: {len(hits)} files in {folder} match {pattern}: {_listing(hits)}; make the "
                            "pattern match one of them, or set annotation_path to the file")
    files = [n for n in names if n.lower().endswith((".json", ".jsonl")) and (folder / n).is_file()]
    there = (f"its .json/.jsonl files: {_listing(files)}; set annotation_path to one of them" if files
             else "it holds no .json/.jsonl file")
    raise RegistryError(f"{where}: no file in {folder} matches {pattern}; {there}")


def _is_pattern(name: str) -> bool:
    return bool(_GLOB.search(name) or _BRACES.search(name))


def _spellings(name: str) -> list[str]:
    """A file-name pattern's `{a,b}` alternatives spelt out: '{,*_}x{,_qa}.json' -> x.json, x_qa.json, *_x.json,
    *_x_qa.json."""
    m = _BRACES.search(name)
    if m is None:
        return [name]
    return [s for alt in m[1].split(",") for s in _spellings(name[:m.start()] + alt + name[m.end():])]


def _listing(names: list[str]) -> str:
    more = f", ... ({len(names)} in all)" if len(names) > _LISTED else ""
    return ", ".join(names[:_LISTED]) + more


def load_registry(path: str | os.PathLike) -> Registry:
    """{name: {"annotation_path", "data_path"}} with paths made absolute (a Registry: a glob pattern is matched when
    its dataset is looked up). Raises ValueError naming the problem."""
    path = Path(path).expanduser()  # `~` as the shell would read it, here and in root and every entry's paths
    if not path.is_file():
        raise ValueError(f"registry file {path} not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"registry file {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except yaml.YAMLError as e:
        raise ValueError(f"registry file {path} is not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("datasets"), dict):
        raise ValueError(f"registry file {path}: expected a mapping with `datasets:` (name -> annotation_path, "
                         "data_path) and optionally `root:`")
    unknown = set(raw) - {"root", "datasets"}
    if unknown:
        raise ValueError(f"registry file {path}: unknown top-level key(s) {sorted(unknown)} (expected root, datasets)")
    if raw.get("root") is not None and not isinstance(raw["root"], str):
        raise ValueError(f"registry file {path}: root must be a folder path (a string), not "
                         f"{type(raw['root']).__name__} {raw['root']!r}")
    root = Path(raw["root"]).expanduser() if raw.get("root") else path.parent
    if not root.is_absolute():
        root = path.parent / root
    out, written = {}, {}
    for name, entry in raw["datasets"].items():
        if not isinstance(entry, dict) or not {"annotation_path", "data_path"} <= set(entry) \
                or set(entry) - {"annotation_path", "data_path"}:
            raise ValueError(f"registry file {path}: datasets.{name} must have exactly annotation_path and data_path")
        bad = [k for k in ("annotation_path", "data_path") if not isinstance(entry[k], str) or not entry[k]]
        if bad:
            raise ValueError(f"registry file {path}: datasets.{name}.{bad[0]} must be a path (a string)")
        out[str(name)] = {k: str(root / Path(entry[k]).expanduser()) for k in ("annotation_path", "data_path")}
        written[str(name)] = entry["annotation_path"]
    return Registry(path, out, written, root, raw.get("root") or None)


ALL = "all"


class _Registry:
    """The registry a recipe names, loaded on first use; `why_not` says why there is none."""

    def __init__(self, path: str | None, errors: list[str]):
        self.path, self.errors = path, errors
        self.table: Registry | None = None
        self.why_not: str | None = None
        # for the refusal's last lines: the annotation files entries took from the registry that do not exist
        # (key, name, path), and whether a pattern failed (then the recipe is refused before they are reported)
        self.missing: list[tuple[str, str, str]] = []
        self.pattern_failed = False

    def get(self, name: str) -> dict | None:
        if self.table is None and self.why_not is None:
            if not self.path:
                self.why_not = (f"dataset {name!r} is not in any registry: set data.registry (or {ENV_VAR}) to a "
                                "datasets YAML, or give annotation_path and data_path")
            else:
                try:
                    self.table = load_registry(self.path)
                except ValueError as e:
                    self.errors.append(f"data.registry: {e}")
                    self.why_not = ""
        return self.table


def _split_name(entry: dict, key: str, errors: list[str]) -> dict | None:
    """The entry with `name%NN` turned into name + sample, or None (error recorded) when NN is malformed."""
    name = entry.get("name")
    if not (isinstance(name, str) and "%" in name):
        return entry
    try:
        base, fraction = split_percent(name)
    except ValueError as e:
        errors.append(f"{key}.name: {e}")
        return None
    if entry.get("sample") is not None:
        errors.append(f"{key}.name: {name!r} samples {fraction:g} and `sample` is also set; use one")
    return {**entry, "name": base, "sample": fraction}


def _expand_all(entry: dict, key: str, split: str, registry: _Registry, errors: list[str]) -> list[dict]:
    """`name: all` -> one entry per registry dataset of the split (the entry's other settings on each): in data.train
    the datasets not named *_val / *_test, in data.val the *_val ones."""
    inline = [k for k in ("annotation_path", "data_path") if entry.get(k) is not None]
    if inline:
        errors.append(f"{key}.name: `all` stands for every dataset of the registry; it takes no {inline[0]}")
        return []
    table = registry.get(ALL)
    if table is None:
        if registry.why_not:
            errors.append(f"{key}.name: {registry.why_not}")
        return []
    names = _all_names(table, split)
    if not names:
        which = "*_val datasets" if split == "val" else "datasets (but *_val / *_test ones)" if table else "datasets"
        errors.append(f"{key}.name: `all`: registry {registry.path} lists no {which}")
    return [{**entry, "name": name} for name in names]


def _all_names(table: Registry, split: str) -> list[str]:
    """What `all` stands for in data.<split>: the *_val datasets in data.val, the others but *_test in data.train."""
    if split == "val":
        return [n for n in table if n.endswith("_val")]
    return [n for n in table if not n.endswith(HELD_OUT)]


def _all_means(table: Registry, split: str) -> str:
    """`all`'s meaning where it is used, for the unknown-name refusal."""
    n = len(_all_names(table, split))
    if split == "val":
        return f"`all` in data.val stands for its {n} *_val dataset(s) of {len(table)}"
    return f"`all` in data.train stands for its {n} dataset(s) not named *_val / *_test, of {len(table)}"


def known_names(name: str, names: list[str]) -> str:
    """The names an unknown one may have meant: the close ones, else every one of a short registry, else the
    nearest few. For a recipe's and for eval's unknown names alike."""
    close = difflib.get_close_matches(name, names, n=5)
    if close:
        return f"did you mean {', '.join(close)}?"
    if len(names) <= _LISTED:
        return f"its names: {', '.join(names)}"
    nearest = difflib.get_close_matches(name, names, n=_LISTED // 2, cutoff=0)
    return f"its {len(names)} names, nearest first: {', '.join(nearest)}, ..."


def _missing_too(registry: _Registry) -> list[str]:
    """When a pattern's file is not found the recipe is refused before anything else looks for files: one line per
    split naming the other files the recipe took from the registry that are missing too, so one refusal lists them
    all (a wrong root makes every one of them missing)."""
    if not (registry.pattern_failed and registry.missing and registry.table is not None):
        return []
    lines = []
    for split in ("train", "val"):
        gone = [(name, path) for key, name, path in registry.missing if key.startswith(f"data.{split}.")]
        if gone:
            shown = ", ".join(f"{name} ({path})" for name, path in gone[:3])
            more = f", ... ({len(gone)} in all)" if len(gone) > 3 else ""
            lines.append(f"data.{split}: {len(gone)} annotation file(s) the registry names are missing too: "
                         f"{shown}{more}; {registry.table.root_hint()}")
    return lines


def resolve_data_section(data: dict) -> dict:
    """A copy of a recipe's raw `data` mapping with `name%NN` split into name + sample, `name: all` expanded and
    registry names filled in. Raises ValueError whose lines each start with the key path (`data.train.0.name: ...`)."""
    data = dict(data)
    errors: list[str] = []
    registry = _Registry(data.get("registry") or os.environ.get(ENV_VAR), errors)
    for split in ("train", "val"):
        items = data.get(split)
        if not isinstance(items, list):
            continue
        resolved, from_all = [], set()
        for i, entry in enumerate(items):
            key = f"data.{split}.{i}"
            if not isinstance(entry, dict):
                resolved.append(entry)
                continue
            entry = _split_name(dict(entry), key, errors)
            if entry is None:
                resolved.append(items[i])
                continue
            name = entry.get("name")
            if name == ALL and ALL not in (registry.get(ALL) or {}):
                expanded = _expand_all(entry, key, split, registry, errors)
                from_all |= {e["name"] for e in expanded}
                resolved += [_fill(e, key, registry, errors) for e in expanded]
                continue
            resolved.append(_fill(entry, key, registry, errors))
        named = [e.get("name") for e in resolved if isinstance(e, dict)]
        for twice in sorted({n for n in from_all if named.count(n) > 1}):
            errors.append(f"data.{split}: dataset {twice!r} is named twice (once through `all`); list it once, or "
                          "list the datasets one by one instead of `all`")
        data[split] = resolved
    if errors:
        raise ValueError("\n".join(dict.fromkeys(errors + _missing_too(registry))))
    return data


def _fill(entry: dict, key: str, registry: _Registry, errors: list[str]) -> dict:
    """The entry with the annotation_path / data_path it leaves out taken from the registry."""
    name = entry.get("name")
    needs = [k for k in ("annotation_path", "data_path") if entry.get(k) is None]
    if not needs or not isinstance(name, str):
        return entry
    table = registry.get(name)
    if table is None:
        if registry.why_not:
            errors.append(f"{key}.name: {registry.why_not}")
    elif name not in table:
        split = key.split(".")[1]
        names = [*table, *([ALL] if ALL not in table else [])]  # `all` counts as a name
        errors.append(f"{key}.name: unknown dataset {name!r} in registry {registry.path}; {known_names(name, names)} "
                      f"({_all_means(table, split)})")
    else:
        try:  # an annotation pattern is matched here, and only when the entry does not give its own file
            found = table[name] if "annotation_path" in needs else {"data_path": table.data_path(name)}
        except ValueError as e:
            errors.append(f"{key}.name: {e}")
            registry.pattern_failed = True
        else:
            entry = {**entry, **{k: found[k] for k in needs}}
            if "annotation_path" in needs and not Path(found["annotation_path"]).exists():
                registry.missing.append((key, name, found["annotation_path"]))
    return entry
