"""`lora-manip train RECIPE --dry-run`: what a run would do, without weights or training.

The model is built on the meta device from its config (no weights are read, so a 7B plan takes seconds and no
memory), the recipe's freezing / LoRA is applied to it, and the optimizer groups are built as in training.
"""

from __future__ import annotations

import math
from pathlib import Path

from ..recipe import Recipe


def _meta_model(recipe: Recipe):
    from accelerate import init_empty_weights
    from transformers import AutoConfig, LlavaOnevisionForConditionalGeneration

    from ..errors import UserError
    from ..model.load import check_model_path

    check_model_path(recipe.model.path)
    try:
        config = AutoConfig.from_pretrained(recipe.model.path)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read the config of {recipe.model.path}: {str(e).splitlines()[0]}") from None
    with init_empty_weights():
        return LlavaOnevisionForConditionalGeneration._from_config(config)


def _quantised_summary(model, recipe: Recipe) -> str:
    import torch

    from ..model.load import NEVER_QUANTISED
    from ..model.parts import canonical

    if recipe.method != "qlora":
        return "nothing"
    n = sum(m.weight.numel() for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and "lora_" not in name and "modules_to_save" not in name
            and not canonical(name).startswith(tuple(NEVER_QUANTISED)))
    q = recipe.quantization
    kind = f"{q.bits}-bit {q.quant_type}" + (" + double quantisation" if q.double_quant and q.bits == 4 else "")
    return f"{kind}: {n / 1e9:.2f}B weights of the language model's linear layers; never: {', '.join(NEVER_QUANTISED)}"


def _dataset_sizes(recipe: Recipe) -> list[tuple[str, str]]:
    from ..data.records import read_raw_records

    rows = []
    for split, entries in (("train", recipe.data.train), ("val", recipe.data.val)):
        for d in entries:
            path = Path(d.annotation_path)
            n = f"{len(read_raw_records(path)):,} records" if path.is_file() else "missing (created on first train)" \
                if recipe.data.create_synthetic_if_missing else "MISSING"
            rows.append((f"{split}: {d.name or path.name}", f"{n}{f', sample {d.sample}' if d.sample else ''}"))
    return rows


def describe_plan(recipe: Recipe) -> str:
    from ..model.adapters import prepare_trainable, trainable_summary
    from ..model.load import resolve_attention
    from .optim import param_groups

    attn = resolve_attention(recipe.model.attn_implementation)
    model = prepare_trainable(_meta_model(recipe), recipe)
    total = sum(p.numel() for n, p in model.named_parameters() if "original_module" not in n)
    lines = [f"model: {recipe.model.path} ({total:,} parameters), method {recipe.method}, "
             f"attention {attn}", "trainable parameters per part:"]
    for part, n in trainable_summary(model).items():
        lines.append(f"  {part:<16}{n:>15,}  ({getattr(recipe.parts, part).train})")
    lines.append("optimizer parameter groups:")
    for g in param_groups(model, recipe):
        n = sum(p.numel() for p in g["params"])
        lines.append(f"  {g['group_name']:<26} lr {g['lr']:<9.3g} weight_decay {g['weight_decay']:<5g} "
                     f"{len(g['params']):>5} tensors {n:>15,} params")
    lines.append(f"quantised: {_quantised_summary(model, recipe)}")
    d, t = recipe.distributed, recipe.train
    lines.append(f"processes: {d.nproc_per_node} per node x {d.nnodes} node(s)"
                 f"{', DeepSpeed ' + d.deepspeed if d.deepspeed else ''}")
    lines.append(f"effective batch size: {t.per_device_batch_size} per device x {t.gradient_accumulation_steps} "
                 f"accumulation x {d.nproc_per_node * d.nnodes} processes = {recipe.effective_batch_size}")
    sizes = _dataset_sizes(recipe)
    lines += [f"  {name}: {n}" for name, n in sizes]
    if t.max_steps > 0:
        lines.append(f"optimizer steps: {t.max_steps} (train.max_steps)")
    else:
        n_train = sum(int(s.split()[0].replace(",", "")) for name, s in sizes
                      if name.startswith("train") and s[0].isdigit())
        if n_train:
            steps = math.ceil(n_train / recipe.effective_batch_size * t.epochs)
            lines.append(f"optimizer steps: ~{steps} ({n_train:,} samples x {t.epochs} epoch(s) / "
                         f"{recipe.effective_batch_size}, before sub-sampling and length drops)")
    return "\n".join(lines)
