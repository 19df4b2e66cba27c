"""The base a QLoRA adapter was trained on, reproduced for `merge --base-as-trained`.

QLoRA trains the adapter against the 4-bit base: every Linear layer of the language model is stored as nf4/fp4
codes plus per-block scales and dequantised on the fly. The adapter learnt to correct THAT model, not the
full-precision one, so folding it into the full-precision weights gives a model that differs from what was trained
by the quantisation error (tiny test model: 0.83 max logit difference; 3e-6 as trained). `--base-as-trained` folds
it into dequantise(quantise(W)) instead, computed with bitsandbytes' own functions and settings as transformers
uses them (blocksize 64, quant_type, double quantisation of the scales; all of them change the values), so the
merged weights are the trained model's up to one rounding to the training's compute dtype.

Which weights were quantised: `model.load.NEVER_QUANTISED` keeps the vision tower, projector and lm_head out, and
bitsandbytes replaces only nn.Linear, so exactly the 2-D weights of the language model except its embeddings.
8-bit (LLM.int8) training also quantises activations at run time, which no set of merged weights reproduces; it is
refused.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UserError

log = logging.getLogger(__name__)

BLOCKSIZE = 64  # transformers' Params4bit default for bnb_4bit quantisation


@dataclass(frozen=True)
class QuantSpec:
    quant_type: str  # nf4 | fp4
    double_quant: bool
    source: str  # where the settings came from, for messages

    def describe(self) -> str:
        return f"4-bit {self.quant_type}{', double quantisation' if self.double_quant else ''} (from {self.source})"


def quantised_in_training(canonical: str, shape: tuple[int, ...]) -> bool:
    return (canonical.startswith("model.language_model.") and canonical.endswith(".weight") and len(shape) == 2
            and ".embed_tokens." not in canonical)


def as_trained(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """dequantise(quantise(w)) in fp32, as bitsandbytes' Linear4bit stores and unpacks w. Quantising from fp32 is
    exact for any stored dtype: bitsandbytes converts to fp32 before it scales and rounds."""
    import bitsandbytes.functional as bnbf

    packed, state = bnbf.quantize_4bit(w.float().contiguous(), blocksize=BLOCKSIZE,
                                       compress_statistics=spec.double_quant, quant_type=spec.quant_type,
                                       quant_storage=torch.uint8)
    return bnbf.dequantize_4bit(packed, state).float()


def _from_block(block, where: str):
    """The recipe's own quantization schema, so a merge reads the block exactly as training did (imported here: the
    schema pulls in pydantic, which `merge` needs only for a QLoRA adapter)."""
    from pydantic import ValidationError

    from ..recipe import QuantCfg

    try:
        return QuantCfg(**(block or {}))
    except (ValidationError, TypeError) as e:
        errors = getattr(e, "errors", lambda: [])()
        first = errors[0] if errors else {"loc": (), "msg": str(e)}
        field = ".".join(str(x) for x in first["loc"]) or "quantization"
        raise UserError(f"{where}: quantization.{field}: {first['msg']}") from None


def parse_quantization(text: str) -> QuantSpec:
    """`--quantization`: recipe field names as key=value pairs, e.g. "quant_type=nf4,double_quant=true"; a bare
    "nf4" / "fp4" means that quant_type with the recipe defaults (double quantisation on)."""
    block: dict = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            key, value = "quant_type", item
        low = value.strip().lower()
        block[key.strip()] = {"true": True, "false": False}.get(low, int(low) if low.isdigit() else value.strip())
    return _spec(_from_block(block, f"--quantization {text!r}"), f"--quantization {text}")


def recipe_quantization(adapter_dir: Path) -> tuple[str | None, QuantSpec | None]:
    """(method, QuantSpec for a qlora recipe) from the recipe.yaml `lora-manip train` saves with the adapter;
    (None, None) when there is none."""
    from ..recipe.load import RUN_RECIPE, read_run_recipe

    recipe = read_run_recipe(adapter_dir)
    if recipe is None:
        return None, None
    if recipe.method != "qlora":
        return recipe.method, None
    return recipe.method, _spec(recipe.quantization, str(Path(adapter_dir) / RUN_RECIPE))


def _spec(cfg, source: str) -> QuantSpec:
    if cfg.bits != 4:
        raise UserError(f"{source}: quantization.bits {cfg.bits}: --base-as-trained reproduces 4-bit QLoRA (nf4/fp4) "
                        "only; 8-bit LLM.int8 also quantises activations at run time, which merged weights cannot "
                        "carry. Merge into the unquantised base (drop --base-as-trained)")
    return QuantSpec(cfg.quant_type, cfg.double_quant, source)


def resolve_spec(adapter_dir: Path, base_as_trained: bool, explicit: str | None) -> QuantSpec | None:
    """The quantisation to reproduce, or None for the default merge into the unquantised base."""
    if explicit is not None and not base_as_trained:
        raise UserError("--quantization describes the 4-bit base for --base-as-trained; pass both or neither")
    method, spec = recipe_quantization(adapter_dir)
    if not base_as_trained:
        if spec is not None:
            log.info("QLoRA adapter (%s): merging into the UNQUANTISED base weights, which differ from the 4-bit "
                     "ones it was trained against by the quantisation error; --base-as-trained merges into the "
                     "weights as trained instead", spec.describe())
        return None
    if explicit is not None:
        return parse_quantization(explicit)
    if method is None:
        raise UserError(f"{adapter_dir}/recipe.yaml does not exist, so the 4-bit settings the adapter was trained "
                        "with are unknown; pass them: --quantization quant_type=nf4,double_quant=true")
    if spec is None:
        raise UserError(f"{adapter_dir}/recipe.yaml: method is {method}, not qlora: the adapter was trained on the "
                        "unquantised base, which the default merge uses; drop --base-as-trained")
    return spec
