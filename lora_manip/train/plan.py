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
    from ..hub import check_model_path
    from .preflight import check_model_source

    check_model_source(recipe)
    if recipe.model.create_tiny_if_missing and not Path(recipe.model.path).exists():
        # Plan from the config the tiny writer would write: a dry run writes nothing, the model included.
        from ..model.tiny import build_config, build_tokenizer

        config = build_config(build_tokenizer())
        with init_empty_weights():
            return LlavaOnevisionForConditionalGeneration._from_config(config)
    check_model_path(recipe.model.path)
    try:
        config = AutoConfig.from_pretrained(recipe.model.path)
    except (OSError, ValueError) as e:
        where = "" if Path(recipe.model.path).exists() else " (no such local folder; asked the hub)"
        raise UserError(f"cannot read the config of {recipe.model.path}{where}: {str(e).splitlines()[0]}") from None
    with init_empty_weights():
        return LlavaOnevisionForConditionalGeneration._from_config(config)


def _quantised_summary(model, recipe: Recipe) -> str:
    import torch

    from ..model.load import NEVER_QUANTISED
    from ..model.layouts import unwrap_peft

    if recipe.method != "qlora":
        return "nothing"
    n = sum(m.weight.numel() for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and "lora_" not in name and "modules_to_save" not in name
            and not unwrap_peft(name).startswith(tuple(NEVER_QUANTISED)))
    q = recipe.quantization
    kind = f"{q.bits}-bit {q.quant_type}" + (" + double quantisation" if q.double_quant and q.bits == 4 else "")
    return f"{kind}: {n / 1e9:.2f}B weights of the language model's linear layers; never: {', '.join(NEVER_QUANTISED)}"


# Bytes per element of a 4-bit weight: half a byte, plus one fp32 absmax per 64-weight block, or with double
# quantisation one 8-bit absmax per block and one fp32 per 256 blocks (bitsandbytes' layout).
_NF4_BYTES = {True: 0.5 + 1 / 64 + 4 / (64 * 256), False: 0.5 + 4 / 64}
_OPTIMIZER_BYTES = {"adamw_torch": 8, "adamw_8bit": 2, "paged_adamw_8bit": 2, "mezo": 0}


def weight_memory(model, recipe: Recipe) -> list[str]:
    """Expected memory per part, per process: weights as they will sit (4-bit, the load dtype, or fp32 master
    copies of what trains) and the trained weights' gradients and optimizer state. Activations are not counted."""
    import torch

    from ..model.load import NEVER_QUANTISED
    from ..dtypes import TORCH_DTYPES
    from ..model.layouts import unwrap_peft
    from ..model.layouts import part_of

    load_bytes = TORCH_DTYPES[recipe.model.dtype].itemsize
    q = recipe.quantization if recipe.method == "qlora" else None
    quantised = set()
    if q is not None:
        quantised = {f"{unwrap_peft(n)}.weight" for n, m in model.named_modules()
                     if isinstance(m, torch.nn.Linear) and "lora_" not in n and "modules_to_save" not in n
                     and not unwrap_peft(n).startswith(tuple(NEVER_QUANTISED))}
    ds = bool(recipe.distributed.deepspeed)
    world = recipe.distributed.nproc_per_node * recipe.distributed.nnodes if ds else 1  # ZeRO-3 partitions all
    rows: dict[str, list[float]] = {}
    for n, p in model.named_parameters():
        if "original_module" in n:
            continue
        name = unwrap_peft(n)
        numel = p.numel() or getattr(p, "ds_numel", 0)
        if p.requires_grad:
            # fp32 master weight + fp32 gradient + optimizer state; under DeepSpeed a 16-bit copy + its fp32 master
            weight = (load_bytes + 4) if ds else 4
            state = 4 + _OPTIMIZER_BYTES[recipe.train.optimizer]
        else:
            weight = (1 if q.bits == 8 else _NF4_BYTES[q.double_quant]) if name in quantised else load_bytes
            state = 0
        row = rows.setdefault(part_of(n), [0.0, 0.0])
        row[0] += numel * weight / world
        row[1] += numel * state / world
    lines = [f"expected memory per process (weights; gradients + optimizer state){' under ZeRO-3' if ds else ''}:"]
    for part, (w, st) in rows.items():
        lines.append(f"  {part:<16}{w / 2**30:>8.2f} GiB{st / 2**30:>10.2f} GiB")
    total_w, total_s = sum(r[0] for r in rows.values()), sum(r[1] for r in rows.values())
    lines.append(f"  {'total':<16}{total_w / 2**30:>8.2f} GiB{total_s / 2**30:>10.2f} GiB  (+ activations)")
    return lines


def activation_memory(model, recipe: Recipe) -> list[str]:
    """A rough bound on one micro-batch's activations at train.max_tokens_per_batch (16-bit, flash/sdpa attention:
    linear in the tokens). Per token and LM layer a decoder layer keeps ~16 x hidden + 3 x intermediate values;
    with checkpointing only the layer inputs stay (hidden per layer) plus one layer's worth while it is recomputed.
    The vision tower keeps activations only when it trains; it is costed per 729-token tile the same way. An
    estimate to size the budget against, not a measurement (benchmarks/throughput.py measures)."""
    budget = recipe.train.max_tokens_per_batch
    if not budget:
        return [f"batch: {recipe.train.per_device_batch_size} samples per micro-batch (no token budget: memory "
                "follows the largest images a batch draws)"]
    cfg = model.config
    gc = recipe.train.gradient_checkpointing
    gc = ["lm", "vision_tower"] if gc is True else list(gc or [])

    def tower(c, tokens: int, checkpointed: bool) -> float:
        per_layer = 16 * c.hidden_size + 3 * c.intermediate_size
        if checkpointed:
            return 2 * tokens * (c.num_hidden_layers * c.hidden_size + per_layer)
        return 2 * tokens * c.num_hidden_layers * per_layer

    lm = tower(cfg.text_config, budget, "lm" in gc)
    vision = tower(cfg.vision_config, budget, "vision_tower" in gc) if recipe.parts.vision_tower.train != "frozen" \
        else 0.0
    return [f"token budget: {budget} tokens per micro-batch (train.max_tokens_per_batch); expected activations "
            f"~{(lm + vision) / 2**30:.1f} GiB (LM {lm / 2**30:.1f}, vision tower {vision / 2**30:.1f}; "
            f"checkpointing: {', '.join(gc) or 'none'})"]


def _created_on_first_train(recipe: Recipe) -> set[Path]:
    """What the demo's synthetic data set creates on first train (build.prepare_demo_inputs): the first train
    dataset's data_path with train.json and val.json in it, when that dataset's annotation file does not exist."""
    synth, train = recipe.data.create_synthetic_if_missing, recipe.data.train
    if synth is None or not train or Path(train[0].annotation_path).exists():
        return set()
    folder = Path(train[0].data_path).resolve()
    return {folder, folder / "train.json", folder / "val.json"}


def _datasets(recipe: Recipe) -> tuple[list[tuple[str, str]], list[tuple[str, str, bool]], int | None]:
    """(rows: (dataset, what the plan says of it); gaps: (what is wrong, dataset, whether the path came from the
    registry) for each file or folder the run would stop on; training records counted, None when some are created
    on first train). Records are counted from the file's index, not checked one by one (`data check` does that)."""
    from ..data.check import path_hint, recipe_registry
    from ..data.records import RecordIndex
    from ..errors import UserError

    created, registry = _created_on_first_train(recipe), recipe_registry(recipe.data)
    rows, gaps, n_train = [], [], 0
    for split, entries in (("train", recipe.data.train), ("val", recipe.data.val)):
        for d in entries:
            label, said = f"{split}: {d.name or Path(d.annotation_path).name}", []
            annotation, images = Path(d.annotation_path), Path(d.data_path)
            if annotation.resolve() in created:
                said.append("missing (created on first train)")
                n_train = None if split == "train" else n_train
            elif not annotation.is_file():
                said.append(f"MISSING: annotation file {annotation} "
                            f"{'is not a file' if annotation.exists() else 'not found'}")
                gaps.append(("annotation file not found", label, bool(path_hint(registry, d, "annotation_path"))))
            else:
                try:
                    index = RecordIndex(annotation)
                    problem = str(index.problems[0]) if index.problems else None  # training stops on these too
                except UserError as e:
                    index, problem = None, str(e)
                if problem:
                    said.append(f"UNREADABLE: {problem}")
                    gaps.append(("annotation file unreadable", label, False))
                else:
                    said.append(f"{len(index):,} records")
                    if split == "train" and n_train is not None:
                        n_train += len(index)
            if not images.is_dir() and images.resolve() not in created:
                said.append(f"MISSING: images folder (data_path) {images} "
                            f"{'is not a folder' if images.exists() else 'not found'}")
                gaps.append(("images folder not found", label, bool(path_hint(registry, d, "data_path"))))
            rows.append((label, "; ".join(said) + (f", sample {d.sample}" if d.sample else "")))
    if n_train == 0 and recipe.data.train and not any(g[1].startswith("train: ") for g in gaps):
        gaps.append(("data.train's files hold no records", "-", False))
    return rows, gaps, n_train


def _stop_line(recipe: Recipe, gaps: list[tuple[str, str, bool]]) -> str:
    """One line: what the run would stop on, for which datasets, and what to fix."""
    from ..data.check import recipe_registry

    parts = []
    for what in dict.fromkeys(g[0] for g in gaps):
        names = [g[1] for g in gaps if g[0] == what]
        more = f", and {len(names) - 3} more" if len(names) > 3 else ""
        parts.append(f"{what} for {len(names)} dataset(s) ({', '.join(names[:3])}{more})" if names[0] != "-"
                     else what)
    fixes = []
    registry = recipe_registry(recipe.data)
    if registry is not None and any(g[2] for g in gaps):
        fixes.append(registry.root_hint())
    if any(not g[2] and g[1] != "-" for g in gaps):
        fixes.append("fix the recipe's annotation_path / data_path")
    fixes.append("`lora-manip data check RECIPE` lists every problem")
    return f"error: the run would stop on its data: {'; '.join(parts)}; {'; '.join(fixes)}"


def describe_plan(recipe: Recipe) -> tuple[int, str]:
    """(exit code, the plan). 2 (bad input) when the run would stop on its data: an annotation file or images
    folder missing, an unreadable file, no training records (the demo's synthetic data, created on first train, is
    not missing); the plan is printed all the same, its last line saying what and what to fix."""
    from ..model.adapters import prepare_trainable, trainable_summary
    from ..model.load import resolve_attention
    from .optim import param_groups

    attn = resolve_attention(recipe.model.attn_implementation)
    model = prepare_trainable(_meta_model(recipe), recipe)
    total = sum(p.numel() for n, p in model.named_parameters() if "original_module" not in n)
    later = " (created on first train)" if recipe.model.create_tiny_if_missing and \
        not Path(recipe.model.path).exists() else ""
    lines = [f"model: {recipe.model.path}{later} ({total:,} parameters), method {recipe.method}, "
             f"attention {attn}", "trainable parameters per part:"]
    for part, n in trainable_summary(model).items():
        lines.append(f"  {part:<16}{n:>15,}  ({getattr(recipe.parts, part).train})")
    lines.append("optimizer parameter groups:")
    for g in param_groups(model, recipe):
        n = sum(p.numel() for p in g["params"])
        lines.append(f"  {g['group_name']:<26} lr {g['lr']:<9.3g} weight_decay {g['weight_decay']:<5g} "
                     f"{len(g['params']):>5} tensors {n:>15,} params")
    lines.append(f"quantised: {_quantised_summary(model, recipe)}")
    lines += weight_memory(model, recipe)
    lines += activation_memory(model, recipe)
    d = recipe.distributed
    lines.append(f"processes: {d.nproc_per_node} per node x {d.nnodes} node(s)"
                 f"{', DeepSpeed ' + d.deepspeed if d.deepspeed else ''}")
    rows, gaps, n_train = _datasets(recipe)
    t = recipe.train
    if t.max_tokens_per_batch:
        measured, why, blocks = _measured_train_set(recipe, gaps)
        if blocks:
            gaps.append((blocks, "-", False))
        lines.append(batch_accounting(recipe, *measured) if measured else
                     f"{_budget_head(recipe)}; samples and tokens per optimizer step are measured from the data, "
                     f"not here: {why}")
    else:
        measured = None
        lines.append(batch_accounting(recipe))
    lines += [f"  {name}: {n}" for name, n in rows]
    if t.max_steps > 0:
        lines.append(f"optimizer steps: {t.max_steps} (train.max_steps)")
    elif gaps:
        lines.append("optimizer steps: not known: the run would stop on its data (last line)")
    elif n_train is None:
        lines.append("optimizer steps: set by the data created on first train (the run logs them at start)")
    elif t.max_tokens_per_batch and not measured:
        lines.append("optimizer steps: set by the token budget (the run logs them at start)")
    elif not t.max_tokens_per_batch:  # under a measured budget batch_accounting has said them
        steps = math.ceil(n_train / recipe.effective_batch_size * t.epochs)
        lines.append(f"optimizer steps: ~{steps} ({n_train:,} samples x {t.epochs:g} epoch(s) / "
                     f"{recipe.effective_batch_size}, before sub-sampling and length drops)")
    if gaps:
        return 2, "\n".join(lines + [_stop_line(recipe, gaps)])
    return 0, "\n".join(lines)


# ------------------------------------------------------------------------------------------ batch accounting


def _budget_head(recipe: Recipe) -> str:
    t, d = recipe.train, recipe.distributed
    return (f"batches: token budget {t.max_tokens_per_batch:,} tokens per micro-batch x {t.gradient_accumulation_steps}"
            f" accumulation x {d.nproc_per_node * d.nnodes} processes (train.per_device_batch_size is not read)")


def total_steps(recipe: Recipe, steps_per_epoch: int) -> str:
    """The optimizer steps of the whole run, as the Trainer counts them (train.max_steps, else epochs x steps per
    epoch, rounded up)."""
    t = recipe.train
    if t.max_steps > 0:
        return f"{t.max_steps} optimizer steps in all (train.max_steps)"
    return f"{math.ceil(t.epochs * steps_per_epoch)} optimizer steps in all ({t.epochs:g} epoch(s))"


def batch_accounting(recipe: Recipe, train_set=None, tile_tokens: int | None = None) -> str:
    """What one optimizer step holds, for the run log and --dry-run. Without a token budget: the recipe's
    per-device batch x accumulation x processes. Under one (train.max_tokens_per_batch) a micro-batch holds as
    many samples as fit, so that product says nothing: the epoch's batches are built here exactly as the trainer
    builds them (same sampler, seed and processes) from the measured `train_set`, and the samples and tokens per
    optimizer step (mean, min, max) and the real number of steps are reported."""
    from ..data.sampler import TokenBudgetBatchSampler, step_stats

    t, d = recipe.train, recipe.distributed
    world = d.nproc_per_node * d.nnodes
    if not t.max_tokens_per_batch:
        line = (f"effective batch size: {t.per_device_batch_size} per device x {t.gradient_accumulation_steps} "
                f"accumulation x {world} processes = {recipe.effective_batch_size} samples per optimizer step")
        if train_set is not None and len(train_set):
            per_epoch = math.ceil(math.ceil(len(train_set) / (t.per_device_batch_size * world))
                                  / t.gradient_accumulation_steps)
            line += f"; {per_epoch} optimizer steps per epoch, {total_steps(recipe, per_epoch)}"
        return line
    if train_set is None or not len(train_set):
        return f"{_budget_head(recipe)}; no training samples measured"
    sampler = TokenBudgetBatchSampler(train_set.lengths, train_set.has_images, train_set.tiles, t.max_tokens_per_batch,
                                      tile_tokens, t.seed, recipe.data.packing, world)
    stats = step_stats(sampler.batches(0), sampler.lengths, t.gradient_accumulation_steps, world)
    return f"{_budget_head(recipe)}: {stats.describe()}, {total_steps(recipe, stats.steps)}"


def _measured_train_set(recipe: Recipe, gaps: list) -> tuple[tuple | None, str | None, str | None]:
    """((train dataset, tokens per tile), None, None) measured as the run measures it (the same checks and cached
    length scan), else (None, why not, what the run would stop on or None): a model or data set the first train
    creates, data the run would stop on (`gaps`), a processor that does not load, records training refuses."""
    from ..data.dataset import build_datasets
    from ..data.processor import load_processor
    from ..errors import UserError

    if recipe.model.create_tiny_if_missing and not Path(recipe.model.path).exists():
        return None, "the model is created on first train", None
    if gaps:
        return None, "the data cannot be read (last line)", None
    missing = [d.annotation_path for d in recipe.data.train if not Path(d.annotation_path).is_file()]
    if missing:  # the demo's, created on first train (anything else is a gap)
        return None, f"{missing[0]} does not exist yet", None
    try:
        processor = load_processor(recipe.model.path, recipe.data.max_image_tiles)
    except UserError as e:
        return None, str(e), f"the processor does not load ({str(e).splitlines()[0]})"
    try:
        train, _ = build_datasets(recipe.data, processor, recipe.train.seed)
    except UserError as e:  # records training refuses: the run would stop on them
        return None, str(e), f"records training refuses ({str(e).splitlines()[0]})"
    return (train, processor.num_image_tokens), None, None
