"""The one dtype table: every name a dtype goes by in this kit, side by side.

A float dtype appears as a safetensors header code (BF16), a config.json / recipe string (bfloat16, which is
also its torch attribute name), a short name on the command line and in `train.precision` (bf16), and a torch
dtype. Everything that turns one of these into another reads the rows below, so a spelling accepted in one place
is accepted everywhere.
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass

from .errors import UserError

# torch is imported only when a torch dtype is asked for (the TORCH-valued tables below are built on first use):
# the recipe schema reads this table, and `lora-manip --help` must not pay torch's seconds of import for it.


@dataclass(frozen=True)
class Float:
    code: str  # safetensors header
    config: str  # config.json `dtype` / `torch_dtype`, recipe `model.dtype`; also its torch attribute name
    short: str  # `merge --dtype`, recipe `train.precision`
    weights: bool  # models are loaded, trained and saved in it (float64 only ever appears in files)
    aliases: tuple[str, ...] = ()

    @property
    def torch(self):
        """The torch dtype (torch.bfloat16, ...)."""
        import torch

        return getattr(torch, self.config)


FLOATS = (
    Float("BF16", "bfloat16", "bf16", True),
    Float("F16", "float16", "fp16", True, ("half",)),
    Float("F32", "float32", "fp32", True, ("float",)),
    Float("F64", "float64", "fp64", False),
)

# Every code a safetensors header may hold here, with its torch attribute name; the integer, bool and fp8 ones are
# only ever copied.
_TORCH_NAME: dict[str, str] = {
    **{f.code: f.config for f in FLOATS},
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
    "BOOL": "bool", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}
FLOAT_CODES = frozenset(f.code for f in FLOATS)

_BY_CODE = {f.code: f for f in FLOATS}
_BY_NAME = {name: f for f in FLOATS for name in (f.config, f.short, *f.aliases)}

WEIGHT_CODES = tuple(f.code for f in FLOATS if f.weights)
WEIGHT_NAMES = tuple(f.config for f in FLOATS if f.weights)  # recipe model.dtype / quantization.compute_dtype
WEIGHT_SHORT_NAMES = tuple(f.short for f in FLOATS if f.weights)  # recipe train.precision, merge --dtype


@functools.cache
def _torch_tables() -> dict[str, dict]:
    import torch

    code_to_torch = {code: getattr(torch, name) for code, name in _TORCH_NAME.items()}
    return {
        "CODE_TO_TORCH": code_to_torch,  # safetensors code -> torch dtype
        "TORCH_TO_CODE": {v: k for k, v in code_to_torch.items()},
        "ITEMSIZE": {k: torch.empty((), dtype=v).element_size() for k, v in code_to_torch.items()},
        # config.json / recipe name -> torch dtype, for the dtypes a model is loaded in
        "TORCH_DTYPES": {f.config: f.torch for f in FLOATS if f.weights},
    }


_TORCH_TABLES = ("CODE_TO_TORCH", "TORCH_TO_CODE", "ITEMSIZE", "TORCH_DTYPES")


def __getattr__(name: str):
    # `from lora_manip.dtypes import CODE_TO_TORCH` lands here (PEP 562): the torch tables exist once asked for.
    # Any other name (the import system probes `__path__`) must not import torch.
    if name in _TORCH_TABLES:
        return _torch_tables()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def code_of(name) -> str | None:
    """bf16 / bfloat16 / torch.bfloat16 -> 'BF16' (None stays None); an unknown name is a UserError."""
    if name is None:
        return None
    torch = sys.modules.get("torch")  # a torch dtype exists only once torch is imported
    if torch is not None and isinstance(name, torch.dtype):
        return _torch_tables()["TORCH_TO_CODE"][name]
    row = _BY_NAME.get(str(name).lower().replace("torch.", ""))
    if row is None:
        raise UserError(f"unknown dtype {name}")
    return row.code


def to_torch(name: str):
    """bfloat16 / bf16 / half ... -> the torch dtype; None for a name that is not a float dtype."""
    row = _BY_NAME.get(str(name).lower().replace("torch.", ""))
    return None if row is None else row.torch


def config_name(code: str) -> str:
    """'BF16' -> 'bfloat16', as config.json writes it."""
    return _BY_CODE[code].config


def short_name(code: str) -> str:
    """'BF16' -> 'bf16'."""
    return _BY_CODE[code].short
