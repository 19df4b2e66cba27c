"""What `eval`, `predict` and `score` check before they load a model.

Inputs: a model folder written by a training run must hold a finished run (runinfo, as `merge` checks), and the
adapter's safetensors files are validated by their headers (checkpoints.tensors.read_header, as `merge` does) before
PEFT or safetensors see them, so a truncated or corrupt file is one line naming it rather than a Rust traceback.
A pickle adapter is refused by name: loading one can run code. A LoRA rank that disagrees with
adapter_config.json is named by tensor and shapes, since PEFT's own message is a multi-line list.

Outputs are guarded where every command's are, in outputs/ (check_results, results_folder, check_file).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

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
    r_default = cfg.r
    for ref in refs:
        key = peft_inner(ref.name)
        m = LORA_KEY.match(key) if key is not None else None
        if not m or m.group("param") != "weight" or len(ref.shape) != 2:
            continue
        module = m.group("module")
        want = peft_pattern_value(cfg.rank_pattern or {}, module, r_default)
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
