"""`auto` attention on a CUDA machine where flash-attn is installed but broken (a wheel for another torch/CUDA):
sdpa with a warning, not a crash at the first forward; an explicit flash_attention_2 is refused with the reason."""

from __future__ import annotations

import logging
import sys

import pytest

from lora_manip.errors import UserError
from lora_manip.model import load


@pytest.fixture
def broken_flash_attn(tmp_path, monkeypatch):
    pkg = tmp_path / "flash_attn"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise ImportError('flash_attn_2_cuda.so: undefined symbol: _ZN3c104cuda9SetDevice')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "flash_attn", raising=False)
    monkeypatch.setattr(load, "has_cuda", lambda: True)
    load.flash_attention_problem.cache_clear()
    yield
    load.flash_attention_problem.cache_clear()


def test_auto_falls_back_to_sdpa_when_flash_attn_is_broken(broken_flash_attn, caplog):
    with caplog.at_level(logging.WARNING, logger=load.__name__):
        assert load.resolve_attention("auto") == "sdpa"
    assert "installed but fails" in caplog.text and "undefined symbol" in caplog.text


def test_explicit_flash_attention_is_refused_with_the_reason(broken_flash_attn):
    with pytest.raises(UserError, match="undefined symbol"):
        load.resolve_attention("flash_attention_2")


def test_no_gpu_is_sdpa_without_a_warning(monkeypatch, caplog):
    monkeypatch.setattr(load, "has_cuda", lambda: False)
    load.flash_attention_problem.cache_clear()
    with caplog.at_level(logging.WARNING, logger=load.__name__):
        assert load.resolve_attention("auto") == "sdpa"
    assert "fails" not in caplog.text
    with pytest.raises(UserError, match="no CUDA GPU"):
        load.resolve_attention("flash_attention_2")
    load.flash_attention_problem.cache_clear()


def test_the_float32_note_on_a_cpu_is_logged_once(monkeypatch, caplog):
    """A run asks for its compute dtype in several places (arguments, loading, the trainer; eval twice): the note
    that a CPU computes in float32 is one line per process, not one per question."""
    import torch

    monkeypatch.setattr(load, "has_cuda", lambda: False)
    load._note_float32.cache_clear()
    with caplog.at_level(logging.INFO, logger=load.__name__):
        assert [load.compute_dtype("bfloat16") for _ in range(3)] == [torch.float32] * 3
        load.compute_dtype("float16")
    notes = [r.getMessage() for r in caplog.records if r.getMessage().startswith("no CUDA GPU")]
    assert notes == ["no CUDA GPU: computing in float32 instead of bfloat16",
                     "no CUDA GPU: computing in float32 instead of float16"]
