"""`lora-manip merge`: fold a LoRA/QLoRA adapter and the fully trained parts back into a full LLaVA-OneVision
checkpoint that transformers and vLLM load like the original.

Streaming: the base checkpoint is read shard by shard and tensor by tensor (in row chunks) from its safetensors
files, the adapter's deltas for each tensor are applied in fp32 and the result is cast and written straight into
bounded-size output shards, so peak memory stays near one row chunk plus the current LoRA pair, not the model. The
merge never loads a model and never reads 4-bit weights: a QLoRA adapter is folded into the unquantised base
checkpoint it was trained from (the adapter names it; `--base` overrides it), or, with `--base-as-trained`, into
that checkpoint's weights quantised and dequantised exactly as the 4-bit training saw them (checkpoints/quant.py).

What is folded in, for each base tensor (checkpoints/plan.py decides, checkpoints/fold.py computes):
- LoRA / rsLoRA / DoRA / lora_bias deltas, per-module r/alpha from rank_pattern / alpha_pattern as PEFT matches them.
- modules_to_save (projector, vision tower trained in full): the adapter's tensors replace the base's.
- image_newline (a bare parameter PEFT cannot name, saved in adapter_model.safetensors; older runs: in
  `extra_trainables.safetensors`): replaces the base tensor.
Every adapter tensor must be used exactly once; leftovers and shape mismatches are errors naming file and tensor,
raised before anything is written.

The output keeps the base's formats: its tensor names (whatever transformers layout the base uses), its config
(dtype updated, no quantization_config), its generation config and its processor files byte for byte (the adapter
folder's copy when it has one), plus the run's recipe.yaml and a model card. It goes to a temporary folder that is
renamed only after the merged model has been reloaded and checked against base + adapter on a probe input
(checkpoints/verify.py; skipped, with a message, for models too large to load twice here).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from ..dtypes import WEIGHT_SHORT_NAMES, code_of, config_name
from ..errors import UserError
from ..fsutil import copy_files
from ..model.adapters import read_adapter_config
from ..outputs import atomic_dir, owned_output
from ..recipe.load import RUN_RECIPE
from ..runinfo import check_complete, record_source
from .next_config import carry_image_cap, run_image_cap
from .plan import ADAPTER_FILE, MergePlan, plan_merge
from .quant import resolve_spec
from .shards import DEFAULT_SHARD_BYTES, parse_size, write_checkpoint
from .verify import verify as _verify

log = logging.getLogger(__name__)

def merge_adapter(adapter_dir: str, base: str | None = None, out: str | None = None, dtype: str | None = None,
                  force: bool = False, verify: bool = True, *, max_shard_size: str | int = DEFAULT_SHARD_BYTES,
                  verify_max_bytes: int | None = None, base_as_trained: bool = False,
                  quantization: str | None = None) -> tuple[Path, float | None]:
    """Merge `adapter_dir` into its base; returns (output folder, max |logit diff| of the check or None when the
    check did not run). `dtype`: bf16 | fp16 | fp32 (default: the base's). `max_shard_size`: bytes or '5GB'.
    `base_as_trained`: fold a QLoRA adapter into the 4-bit weights it was trained against (settings from the
    adapter's recipe.yaml, or `quantization`, e.g. "quant_type=nf4,double_quant=true")."""
    from ..model.adapters import adapter_base, is_adapter_dir

    if dtype is not None and dtype not in WEIGHT_SHORT_NAMES:  # the request first, before any folder is read
        raise UserError(f"--dtype {dtype}: choose one of {', '.join(WEIGHT_SHORT_NAMES)}")
    adapter_dir = Path(adapter_dir)
    run_id = check_complete(adapter_dir)  # an unfinished or mixed run folder is refused first, naming the run
    if not is_adapter_dir(adapter_dir):
        hint = " (it holds a full model: nothing to merge)" if (adapter_dir / "config.json").is_file() else ""
        raise UserError(f"{adapter_dir} is not an adapter folder: no adapter_config.json{hint}")
    quant = resolve_spec(adapter_dir, base_as_trained, quantization)
    base_name = base or adapter_base(adapter_dir)
    base_dir = resolve_base(base_name, from_adapter=base is None, adapter_dir=adapter_dir)
    out = Path(out) if out else adapter_dir.with_name(adapter_dir.name + "-merged")
    with owned_output(out, "lora-manip merge", "merge", {"adapter folder": adapter_dir, "base folder": base_dir},
                      force) as out:  # the resolved path from here on
        return _merge_locked(adapter_dir, base_dir, base_name, out, dtype, force, verify, max_shard_size,
                             verify_max_bytes, quant, run_id)


def _merge_locked(adapter_dir: Path, base_dir: Path, base_name: str, out: Path, dtype, force: bool, verify: bool,
                  max_shard_size, verify_max_bytes, quant, run_id: str | None) -> tuple[Path, float | None]:
    from ..data.processor import copy_processor_files

    plan = plan_merge(adapter_dir, base_dir, dtype, quant)  # every check that can fail on the inputs happens here
    log.info("merging %s into %s: %d LoRA-adapted tensors, %d replaced, %d copied; output %s (%s)", adapter_dir,
             base_name, plan.n_lora, plan.n_replaced, len(plan.tensors) - plan.n_lora - plan.n_replaced, out,
             plan.out_dtype)
    if quant is not None:
        log.info("base as trained: %d language-model weights taken as %s", plan.n_requantised, quant.describe())
    _readahead(adapter_dir / ADAPTER_FILE)  # A/B are read tensor by tensor later: let the kernel fetch them now
    with atomic_dir(out, force=force, kind="merge") as tmp:
        write_checkpoint(tmp, plan.tensors, parse_size(max_shard_size))
        _write_config(tmp, plan)
        copy_files(base_dir, tmp, ["generation_config.json"])
        # The trainer copies the base's processor files into the adapter folder; they win when present (the run
        # may have been trained from a base folder that has since changed).
        source = adapter_dir if (adapter_dir / "processor_config.json").is_file() else base_dir
        copied = copy_processor_files(source, tmp)
        log.info("processor/tokenizer files from %s: %s", source, ", ".join(copied) or "none")
        if (adapter_dir / RUN_RECIPE).is_file():  # eval reads the run's system prompt and template from it
            shutil.copyfile(adapter_dir / RUN_RECIPE, tmp / RUN_RECIPE)
        carry_image_cap(tmp, run_image_cap(tmp))  # a server reads the grid from config/processor, not the recipe
        _write_card(tmp, base_name, adapter_dir, plan)
        record_source(tmp, run_id, adapter_dir, "merge")  # eval can tell which run the checkpoint came from
        diff = None
        if verify:
            diff = _verify(tmp, adapter_dir, base_dir, plan, verify_max_bytes)
        else:
            log.info("merge check skipped (--no-verify)")
    return out, diff


def _readahead(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        finally:
            os.close(fd)
    except (OSError, AttributeError):
        pass


def resolve_base(base: str, from_adapter: bool = False, adapter_dir: Path | None = None) -> Path:
    """A local folder, or a hub id already in the local Hugging Face cache (hub.py; never downloads)."""
    from ..hub import HUB_ID, local_folder

    where = f" (named by {adapter_dir}/adapter_config.json; pass --base to override)" if from_adapter else ""
    path = Path(base).expanduser()
    if path.exists() and not path.is_dir():
        raise UserError(f"base model {base}{where} is not a folder")
    folder = local_folder(base)
    if folder is not None:
        return folder
    if HUB_ID.match(base):
        raise UserError(f"base model {base}{where} is neither a local folder nor in the local Hugging Face "
                        "cache; download it first (huggingface-cli download) or pass --base PATH")
    raise UserError(f"base model {base}{where} does not exist")


def _write_config(folder: Path, plan: MergePlan) -> None:
    cfg = json.loads(json.dumps(plan.base_config))
    name = config_name(code_of(plan.out_dtype))

    def clean(node: dict) -> None:
        node.pop("quantization_config", None)
        node.pop("_pre_quantization_dtype", None)
        if "torch_dtype" in node:
            node["torch_dtype"] = name
        if node is cfg or "dtype" in node:
            node["dtype"] = name
        for value in node.values():
            if isinstance(value, dict):
                clean(value)
    clean(cfg)
    cfg.setdefault("architectures", ["LlavaOnevisionForConditionalGeneration"])
    (folder / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _write_card(folder: Path, base: str, adapter_dir: Path, plan: MergePlan) -> None:
    recipe = adapter_dir / RUN_RECIPE
    cfg = read_adapter_config(adapter_dir)
    lines = [
        "---", "library_name: transformers", f"base_model: {base}", "pipeline_tag: image-text-to-text", "---", "",
        "# Merged LLaVA-OneVision checkpoint (lora-manip)", "",
        f"- base model: `{base}`", f"- adapter: `{adapter_dir}` (LoRA r={cfg.r}, alpha={cfg.lora_alpha}"
        f", rslora={cfg.use_rslora}, dora={cfg.use_dora})",
        f"- fully trained modules folded in: {cfg.modules_to_save or 'none'}"
        + "".join(f" + {name}" for name in plan.extras),
        f"- dtype: {plan.out_dtype}",
        "- base weights: " + (f"as trained ({plan.quant.describe()}, dequantised)" if plan.quant else "unquantised"),
        "",
        "Load with `LlavaOnevisionForConditionalGeneration.from_pretrained` like the original.", "",
    ]
    if recipe.is_file():
        lines += ["## Training recipe", "", "```yaml", recipe.read_text().rstrip(), "```", ""]
    (folder / "README.md").write_text("\n".join(lines), encoding="utf-8")

