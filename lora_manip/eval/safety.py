"""What `eval`, `predict` and `score` check before they load a model or write a result.

Inputs: a model folder written by a training run must hold a finished run (runinfo, as `merge` checks), and the
adapter's safetensors files are validated by their headers (checkpoints.tensors.read_header, as `merge` does) before
PEFT or safetensors see them, so a truncated or corrupt file is one line naming it rather than a Rust traceback.
A pickle adapter is refused by name: loading one can run code. A LoRA rank that disagrees with
adapter_config.json is named by tensor and shapes, since PEFT's own message is a multi-line list.

Outputs: an output folder has one owner (fsutil.output_lock), leftovers of a killed run are removed, a full disk
is one line, and nothing is written over the model or into a path that is a file.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from pathlib import Path
from typing import Iterator

from ..errors import UserError

log = logging.getLogger(__name__)

ADAPTER_FILE = "adapter_model.safetensors"
PICKLE_ADAPTER = "adapter_model.bin"
_SIZE_MISMATCH = re.compile(r"size mismatch for (?P<name>\S+?): copying a param with shape torch\.Size\((?P<got>"
                            r"\[[^\]]*\])\) from checkpoint, the shape in current model is torch\.Size\((?P<want>"
                            r"\[[^\]]*\])\)")


# ------------------------------------------------------------------------------------------------- inputs


def check_model(model_path: str) -> str | None:
    """Validate a local model or adapter folder before anything loads it; returns its run id (None for a folder
    no run of this kit wrote, or a hub id)."""
    from ..checkpoints.tensors import read_header
    from ..model.adapters import EXTRA_FILE, is_adapter_dir
    from ..runinfo import check_complete

    path = Path(model_path)
    if not path.is_dir():
        return None
    adapter = is_adapter_dir(path)
    run_id = check_complete(path, "adapter" if adapter else "model")
    if not adapter:
        for shard in sorted(path.glob("*.safetensors")):
            read_header(shard)
        return run_id
    weights = path / ADAPTER_FILE
    if not weights.is_file():
        if (path / PICKLE_ADAPTER).is_file():
            raise UserError(f"{path / PICKLE_ADAPTER}: a pickle adapter is never loaded (unpickling can run code); "
                            f"re-save it as {ADAPTER_FILE} (PEFT: save_pretrained(..., safe_serialization=True))")
        raise UserError(f"{path}: no {ADAPTER_FILE} beside adapter_config.json")
    _, refs = read_header(weights)
    if (path / EXTRA_FILE).is_file():
        read_header(path / EXTRA_FILE)
    _check_ranks(path, weights, refs)
    return run_id


def _check_ranks(folder: Path, weights: Path, refs) -> None:
    from ..checkpoints.plan import peft_pattern_value
    from ..model.adapters import read_adapter_config
    from ..model.layouts import LORA_KEY, peft_inner

    cfg = read_adapter_config(folder)
    r_default = cfg.get("r", 8)
    for ref in refs:
        key = peft_inner(ref.name)
        m = LORA_KEY.match(key) if key is not None else None
        if not m or m.group("param") != "weight" or len(ref.shape) != 2:
            continue
        module = m.group("module")
        want = peft_pattern_value(cfg.get("rank_pattern") or {}, module, r_default)
        got = ref.shape[0] if m.group("kind") == "lora_A" else ref.shape[1]
        if got != want:
            axis = "rows" if m.group("kind") == "lora_A" else "columns"
            raise UserError(f"{weights}: tensor {ref.name} {list(ref.shape)} has rank {got} ({axis}), but "
                            f"{folder / 'adapter_config.json'} gives {module} r={want}: the config and the weights "
                            "are not from the same run")


def adapter_fit_error(e: UserError, adapter: str) -> UserError:
    """PEFT's "Error(s) in loading state_dict" lists one mismatch a line; keep the first, with the count."""
    cause = e.__context__
    found = list(_SIZE_MISMATCH.finditer(str(cause))) if isinstance(cause, RuntimeError) else []
    if not found:
        return e
    first = found[0]
    more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
    name = re.sub(r"\.default(?=\.weight$)", "", first.group("name"))
    return UserError(f"{Path(adapter) / ADAPTER_FILE}: tensor {name} is {first.group('got')}, the base model "
                     f"expects {first.group('want')}{more}: the adapter was trained on another base (or another "
                     "rank); pass --base with the model it was trained on")


# ------------------------------------------------------------------------------------------------ outputs


def check_out_folder(out: str | os.PathLike, flag: str = "--out",
                     inputs: dict[str, str | os.PathLike | None] | None = None) -> None:
    """An output folder that is a file, or that is one of the input folders (resolved, symlinks followed)."""
    o = Path(out)
    if o.exists() and not o.is_dir():
        raise UserError(f"{flag} {out} is a file, not a folder; choose a folder for the results")
    for what, p in (inputs or {}).items():
        if p is not None and Path(p).exists() and o.expanduser().resolve() == Path(p).expanduser().resolve():
            raise UserError(f"{flag} {out} is the {what} {p}; its results would change the folder they "
                            "describe: choose another folder")


def _remove_leftover_tmp_files(folder: Path, names: tuple[str, ...]) -> None:
    # atomic_write_* leaves `.NAME.XXXXXXXX.tmp` behind only when killed between write and rename
    for name in names:
        pattern = re.compile(rf"^\.{re.escape(name)}\.[a-z0-9_]{{8}}\.tmp$")
        for p in folder.iterdir() if folder.is_dir() else ():
            if pattern.match(p.name) and p.is_file() and not p.is_symlink():
                log.warning("removing %s, left by an interrupted command writing %s", p, folder / name)
                p.unlink(missing_ok=True)


@contextlib.contextmanager
def results_folder(out: str | os.PathLike, command: str, names: tuple[str, ...], subfolders: tuple[str, ...] = (),
                   on_full_disk: str | None = None) -> Iterator[None]:
    """Own `out` while results are written into it; leftovers of a killed run are removed first and a full
    disk is a one-line error naming the folder (`on_full_disk`: what the user can do then, when not the
    default "nothing partial was kept")."""
    from ..fsutil import cleanup_partials, disk_full_error, is_disk_full, output_lock

    with output_lock(out, command):
        for sub in subfolders:
            cleanup_partials(Path(out) / sub)
        _remove_leftover_tmp_files(Path(out), names)
        try:
            yield
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - re-raised unless it is a full disk
            if not is_disk_full(e):
                raise
            if on_full_disk is None:
                raise disk_full_error(e, out) from None
            raise UserError(f"{out}: the disk is full (or over quota) while writing ({str(e).splitlines()[0]}); "
                            f"{on_full_disk}") from None
