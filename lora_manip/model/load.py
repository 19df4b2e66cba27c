"""Load LLaVA-OneVision for training or inference: device-aware dtype, attention implementation, 4-bit/8-bit
quantisation (vision tower, projector and lm_head are never quantised). Weights are read from safetensors only:
a folder whose weights are pickle files alone (pytorch_model.bin, *.pt, ...) is refused before anything opens
them, since unpickling can run code the file carries (`refuse_pickle_weights`)."""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
from pathlib import Path

import torch

from ..dtypes import TORCH_DTYPES
from ..errors import UserError
from ..hub import check_model_path, local_folder

log = logging.getLogger(__name__)

# Full prefixes: transformers 5.x matches llm_int8_skip_modules by prefix/suffix, so bare "vision_tower" would
# match nothing and the projector would be quantised (then PEFT cannot train it). A custom list replaces the
# default lm_head skip, hence lm_head here too.
NEVER_QUANTISED = ["model.vision_tower", "model.multi_modal_projector", "lm_head"]


def has_cuda() -> bool:
    return torch.cuda.is_available()


def name_deepspeed_accelerator() -> None:
    """Tell DeepSpeed a machine without a CUDA GPU is one (DS_ACCELERATOR, its documented override) before
    transformers imports it (saving a model, building a Trainer): left to guess, it logs "Setting accelerator to
    CPU. If you have GPU or other accelerator, we were unable to detect it." on every CPU run. A DS_ACCELERATOR the
    user set wins; with a GPU DeepSpeed's own detection is silent and stays in charge."""
    if not has_cuda():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def compute_dtype(name: str) -> torch.dtype:
    """The recipe's dtype on a GPU; float32 on CPU, where bf16 matmuls are unusably slow (measured: a 0.5B-shaped
    LoRA step did not finish in 15 minutes in bf16, ~50 s in fp32)."""
    if has_cuda():
        return TORCH_DTYPES[name]
    if name != "float32":
        _note_float32(name)
    return torch.float32


@functools.lru_cache(maxsize=None)
def _note_float32(name: str) -> None:
    # once per process and dtype: a run asks for its compute dtype in several places (arguments, loading, trainer)
    log.info("no CUDA GPU: computing in float32 instead of %s", name)


@functools.lru_cache(maxsize=1)
def flash_attention_problem() -> str | None:
    """Why flash-attention 2 cannot be used here, or None. Installed is not enough: a wheel built for another torch
    or CUDA imports with "undefined symbol" or fails at its first kernel call, so it is imported and run once on a
    tiny input (milliseconds) before a run relies on it."""
    if not has_cuda():
        return "no CUDA GPU"
    if importlib.util.find_spec("flash_attn") is None:
        return ("flash-attn is not installed (pip install -e \".[gpu]\" && pip install \"flash-attn>=2.6\" "
                "--no-build-isolation)")
    try:
        from flash_attn import flash_attn_func

        q = torch.zeros(1, 8, 2, 64, device="cuda", dtype=torch.bfloat16)
        flash_attn_func(q, q, q)
    except Exception as e:  # noqa: BLE001 - any failure (ImportError, OSError, CUDA error) means "not usable"
        return f"flash-attn is installed but fails ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    return None


def resolve_attention(requested: str) -> str:
    """`auto`: flash-attention 2 where it works, else sdpa (with a warning when it is installed but broken);
    `flash_attention_2` asked for explicitly where it cannot work is refused."""
    problem = flash_attention_problem() if requested in ("auto", "flash_attention_2") else None
    if requested == "flash_attention_2" and problem:
        raise UserError(f"model.attn_implementation: flash_attention_2 cannot be used: {problem}; set it to auto "
                        "or sdpa")
    if requested == "auto" and problem and problem.startswith("flash-attn is installed"):
        log.warning("attention: %s; using sdpa instead", problem)
    chosen = requested if requested != "auto" else ("sdpa" if problem else "flash_attention_2")
    log.info("attention implementation: %s%s", chosen, " (auto)" if requested == "auto" else "")
    return chosen


def require_bitsandbytes() -> None:
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UserError("method: qlora needs bitsandbytes (pip install bitsandbytes)")


def quantization_config(q, dtype: torch.dtype):
    from transformers import BitsAndBytesConfig

    require_bitsandbytes()
    if q.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=NEVER_QUANTISED)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=q.quant_type, bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=dtype if not has_cuda() else TORCH_DTYPES[q.compute_dtype],
        llm_int8_skip_modules=NEVER_QUANTISED)


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def refuse_pickle_weights(path: str | os.PathLike, what: str = "model") -> None:
    """A UserError when a local (or hub-cached) folder holds pickle weight files and no safetensors. The kit's own
    message, so no loader's advice to unpickle it anyway (torch suggests weights_only=False) ever reaches a user."""
    folder = local_folder(str(path))
    if folder is None or any(folder.glob("*.safetensors")):
        return
    pickles = sorted(f.name for f in folder.iterdir() if f.suffix in PICKLE_SUFFIXES and f.is_file())
    if pickles:
        shown = ", ".join(pickles[:3]) + (", ..." if len(pickles) > 3 else "")
        raise UserError(f"{what} {path}: its weights are pickle files only ({shown}); the kit never loads pickle "
                        "weights, because unpickling can run code hidden in the file. Convert them to safetensors "
                        "where you trust the file (transformers: from_pretrained, then save_pretrained with "
                        "safe_serialization=True) and pass that folder")


def load_model(path: str, dtype: str = "float32", attn: str = "auto", quantization=None, device_map=None):
    """LlavaOnevisionForConditionalGeneration from a local folder or hub id. `quantization`: a recipe QuantCfg
    (QLoRA) or None."""
    from transformers import LlavaOnevisionForConditionalGeneration

    check_model_path(path)
    refuse_pickle_weights(path)
    torch_dtype = compute_dtype(dtype)
    # use_safetensors: transformers never falls back to a pickle file, even one placed beside the safetensors
    kwargs = dict(dtype=torch_dtype, attn_implementation=resolve_attention(attn), use_safetensors=True)
    if quantization is not None:
        kwargs["quantization_config"] = quantization_config(quantization, torch_dtype)
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        kwargs["device_map"] = {"": f"cuda:{local_rank}"} if has_cuda() else {"": "cpu"}
    elif device_map is not None:
        kwargs["device_map"] = device_map
    try:
        return LlavaOnevisionForConditionalGeneration.from_pretrained(path, **kwargs)
    except OSError as e:
        hint = "" if Path(path).exists() else " (no such local folder, and the hub could not provide it)"
        raise UserError(f"cannot load model {path}{hint}: {str(e).splitlines()[0]}") from None
