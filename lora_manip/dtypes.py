"""The one dtype table: every name a dtype goes by in this kit, side by side.

A float dtype appears as a safetensors header code (BF16), a config.json / recipe string (bfloat16, which is
also its torch attribute name), a short name on the command line and in `train.precision` (bf16), and a torch
dtype. Everything that turns one of these into another reads the rows below, so a spelling accepted in one place
is accepted everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import UserError


@dataclass(frozen=True)
class Float:
    code: str  # safetensors header
    config: str  # config.json `dtype` / `torch_dtype`, recipe `model.dtype`
    short: str  # `merge --dtype`, recipe `train.precision`
    torch: torch.dtype
    weights: bool  # models are loaded, trained and saved in it (float64 only ever appears in files)
    aliases: tuple[str, ...] = ()


FLOATS = (
    Float("BF16", "bfloat16", "bf16", torch.bfloat16, True),
    Float("F16", "float16", "fp16", torch.float16, True, ("half",)),
    Float("F32", "float32", "fp32", torch.float32, True, ("float",)),
    Float("F64", "float64", "fp64", torch.float64, False),
)

# Every code a safetensors header may hold here; the integer, bool and fp8 ones are only ever copied.
CODE_TO_TORCH: dict[str, torch.dtype] = {
    **{f.code: f.torch for f in FLOATS},
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
TORCH_TO_CODE: dict[torch.dtype, str] = {v: k for k, v in CODE_TO_TORCH.items()}
ITEMSIZE: dict[str, int] = {k: torch.empty((), dtype=v).element_size() for k, v in CODE_TO_TORCH.items()}
FLOAT_CODES = frozenset(f.code for f in FLOATS)

_BY_CODE = {f.code: f for f in FLOATS}
_BY_NAME = {name: f for f in FLOATS for name in (f.config, f.short, *f.aliases)}

WEIGHT_CODES = tuple(f.code for f in FLOATS if f.weights)
WEIGHT_NAMES = tuple(f.config for f in FLOATS if f.weights)  # recipe model.dtype / quantization.compute_dtype
WEIGHT_SHORT_NAMES = tuple(f.short for f in FLOATS if f.weights)  # recipe train.precision, merge --dtype
# config.json / recipe name -> torch dtype, for the dtypes a model is loaded in
TORCH_DTYPES: dict[str, torch.dtype] = {f.config: f.torch for f in FLOATS if f.weights}


def code_of(name: str | torch.dtype | None) -> str | None:
    """bf16 / bfloat16 / torch.bfloat16 -> 'BF16' (None stays None); an unknown name is a UserError."""
    if name is None:
        return None
    if isinstance(name, torch.dtype):
        return TORCH_TO_CODE[name]
    row = _BY_NAME.get(str(name).lower().replace("torch.", ""))
    if row is None:
        raise UserError(f"unknown dtype {name}")
    return row.code


def to_torch(name: str) -> torch.dtype | None:
    """bfloat16 / bf16 / half ... -> the torch dtype; None for a name that is not a float dtype."""
    row = _BY_NAME.get(str(name).lower().replace("torch.", ""))
    return None if row is None else row.torch


def config_name(code: str) -> str:
    """'BF16' -> 'bfloat16', as config.json writes it."""
    return _BY_CODE[code].config


def short_name(code: str) -> str:
    """'BF16' -> 'bf16'."""
    return _BY_CODE[code].short
