"""merge's base model is found as every command finds a model (hub.py): a local folder, or a hub id already in the
local Hugging Face cache; nothing downloads, and each miss is one line naming what to do."""

from __future__ import annotations

import pytest

from lora_manip.checkpoints.merge import resolve_base
from lora_manip.errors import UserError


def _cached_snapshot(cache, repo: str):
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("0" * 40)
    snap = folder / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    return snap


def test_folder_cache_and_misses(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    assert resolve_base(str(tmp_path)) == tmp_path
    snap = _cached_snapshot(tmp_path / "cache", "org/cached")
    assert resolve_base("org/cached").resolve() == snap.resolve()
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is not a folder"):
        resolve_base(str(tmp_path / "file"))
    with pytest.raises(UserError, match=r"org/absent \(named by .*adapter_config.json; pass --base to override\) is "
                                        "neither a local folder nor in the local Hugging Face cache"):
        resolve_base("org/absent", from_adapter=True, adapter_dir=tmp_path)
    with pytest.raises(UserError, match="does not exist"):
        resolve_base(str(tmp_path / "nothing" / "here" / "x"))
