"""Where a model reference points: a local folder or the Hugging Face hub cache. Nothing here downloads: the kit
runs offline, and a hub id that is not in the local cache is the caller's to report."""

from __future__ import annotations

import re
from pathlib import Path

from .errors import UserError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # org/name


def check_model_path(path: str) -> None:
    """A path must exist locally or at least have the shape of a hub id (org/name)."""
    if not Path(path).expanduser().exists() and not HUB_ID.match(path):
        raise UserError(f"model path {path} does not exist and is not a hub id like "
                        "llava-hf/llava-onevision-qwen2-7b-ov-hf; for the offline demo run "
                        f"`lora-manip tiny-model {path}`")


def local_folder(path: str) -> Path | None:
    """The local folder of a model: the path itself, or a hub id's snapshot in the local cache (never downloads);
    None when neither exists."""
    p = Path(path).expanduser()
    if p.is_dir():
        return p
    if HUB_ID.match(path):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(path, local_files_only=True))
        except Exception:  # noqa: BLE001 - any failure means: not in the cache
            return None
    return None
