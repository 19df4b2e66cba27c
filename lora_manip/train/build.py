"""The pieces every training objective builds alike, as workflow.build_trainer puts them together: the demo's inputs
when missing, the TrainingArguments, the model with its trainable parts (a fresh adapter or, for GRPO, the SFT one
trained further), and `Objective`, the three things an objective brings of its own (SFT in trainer.py, GRPO in
grpo.py): its arguments, its dataset wrapper and its trainer class."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple

from ..errors import UserError
from ..recipe import Recipe

log = logging.getLogger(__name__)


class Inputs(NamedTuple):
    """What an objective's dataset wrapper hands its trainer: the datasets as the trainer reads them, and keyword
    arguments of the trainer that come from the data (SFT's eval during training)."""

    train: Any
    val: Any
    trainer_kwargs: dict = {}


@dataclass(frozen=True)
class Objective:
    """One training objective, as the shared build (workflow.build_trainer) and ending (workflow.end_run) take it.

    arguments: recipe -> TrainingArguments (or a subclass: GRPOConfig); built before the model, which ZeRO-3 needs.
    inputs: (recipe, processor, train, val) -> Inputs: the checked datasets (data/dataset.py) wrapped as the
        trainer reads them; runs before the model loads, so what the data cannot support is refused early.
    trainer: the trainer class, a `ManipTrainerMixin` subclass (trainer.py), built with model, args, train_dataset,
        eval_dataset, recipe, processor, base_folder, callbacks and the Inputs' trainer_kwargs.
    check: (recipe, processor) -> None, refusals that need the processor but no data (optional)."""

    arguments: Callable
    inputs: Callable
    trainer: type
    check: Callable | None = field(default=None)


def prepare_demo_inputs(recipe: Recipe) -> None:
    """Create the tiny model / synthetic data a demo recipe names, when missing (never overwrites)."""
    if recipe.model.create_tiny_if_missing and not Path(recipe.model.path).exists():
        from ..model.tiny import write_tiny_model

        log.info("creating tiny LLaVA-OneVision at %s", recipe.model.path)
        write_tiny_model(recipe.model.path)
    synth = recipe.data.create_synthetic_if_missing
    first = recipe.data.train[0]
    if synth is not None and not Path(first.annotation_path).exists():
        from ..data.synth import write_synth_dataset

        log.info("creating synthetic data set (%d records) at %s", synth.n, first.data_path)
        write_synth_dataset(first.data_path, n=synth.n, seed=synth.seed, tasks=synth.tasks)


def training_arguments(recipe: Recipe):
    from transformers import TrainingArguments

    import torch

    from ..model.load import compute_dtype, has_cuda, name_deepspeed_accelerator

    name_deepspeed_accelerator()  # the Trainer imports DeepSpeed (through transformers) when it is installed
    t, gpu = recipe.train, has_cuda()
    # Autocast wherever the weights are 16-bit: trained weights are fp32 masters (model/adapters.py) next to 16-bit
    # frozen ones, which only autocast can mix. On a CPU the kit loads fp32, so it does not apply there.
    half = gpu or compute_dtype(recipe.model.dtype) != torch.float32
    return TrainingArguments(
        output_dir=t.output_dir,
        per_device_train_batch_size=t.per_device_batch_size,
        per_device_eval_batch_size=t.per_device_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        learning_rate=recipe.parts.language_model.lr,  # the scheduler scales each part's group from its own rate
        warmup_steps=t.warmup_ratio,
        lr_scheduler_type=t.lr_scheduler,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim="sgd" if t.optimizer == "mezo" else t.optimizer,  # MeZO updates weights itself (trainer.py)
        # Checkpointing is enabled per part on the model itself (model/adapters.checkpoint_parts), not here.
        bf16=half and t.precision == "bf16",
        fp16=half and t.precision == "fp16",
        tf32=gpu and t.tf32 or None,
        use_cpu=not gpu,
        seed=t.seed,
        data_seed=t.seed,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        report_to=reporters(t.report_to) or "none",
        deepspeed=recipe.distributed.deepspeed,
        remove_unused_columns=False,
        dataloader_num_workers=recipe.data.num_workers,
        eval_strategy="no",
    )


def reporters(asked: list[str]) -> list[str]:
    """The asked-for loggers; one that is not installed is refused (preflight calls this before anything is
    written or loaded: a run that was asked to log must not train for hours unlogged). wandb defaults to offline
    mode: runs never depend on the network; `wandb sync` uploads later."""
    import importlib.util

    modules = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",)}
    out = [r for r in asked if r != "none"]
    missing = [r for r in out if not any(importlib.util.find_spec(m) for m in modules[r])]
    if missing:
        raise UserError(f"train.report_to: {', '.join(missing)} is not installed; pip install "
                        f"\"lora-manip[{','.join(missing)}]\" or remove it from train.report_to")
    if "wandb" in out:
        os.environ.setdefault("WANDB_MODE", "offline")
    return out


def check_adapter(recipe: Recipe) -> None:
    """model.adapter (GRPO continuing an SFT adapter) must be an adapter folder; refused before anything is written."""
    adapter = recipe.model.adapter
    if adapter and not (Path(adapter) / "adapter_config.json").is_file():
        raise UserError(f"model.adapter: {adapter} is not an adapter folder (no adapter_config.json); train one "
                        "with an SFT recipe (method lora or qlora) first")


def build_model(recipe: Recipe):
    """The base model as the recipe loads it (dtype, attention, QLoRA's quantisation), its parts frozen, adapted or
    trained in full (or model.adapter loaded and trained further), with the chosen towers checkpointed."""
    from ..model.adapters import checkpoint_parts, prepare_trainable
    from ..model.load import load_model

    model = load_model(recipe.model.path, recipe.model.dtype, recipe.model.attn_implementation,
                       recipe.quantization if recipe.method == "qlora" else None)
    model.config.use_cache = False  # no KV cache while training (it only costs memory); GRPO's rollouts turn it on
    model = continue_adapter(model, recipe) if recipe.model.adapter else prepare_trainable(model, recipe)
    checkpoint_parts(model, recipe.train.gradient_checkpointing)
    return model


def continue_adapter(model, recipe: Recipe):
    """model.adapter loaded with PEFT and trained further: its own LoRA weights train, with its own LoRA settings,
    and the parts the recipe trains in full, which the adapter must carry (modules_to_save, extra_trainables)."""
    from peft import PeftModel

    from ..model.adapters import fp32_master_weights, load_extras, part_modes
    from ..model.layouts import part_of
    from ..model.load import refuse_pickle_weights

    adapter = recipe.model.adapter
    refuse_pickle_weights(adapter, "model.adapter")
    try:
        model = PeftModel.from_pretrained(model, adapter, is_trainable=True)
    except (RuntimeError, ValueError) as e:
        raise UserError(f"model.adapter {adapter} does not fit model.path {recipe.model.path}: "
                        f"{str(e).splitlines()[0]}") from None
    load_extras(model, adapter)
    modes = part_modes(recipe)
    for name, p in model.named_parameters():
        if "lora_" in name:
            continue  # the adapter's own LoRA weights train, whatever parts says
        p.requires_grad_(modes[part_of(name)] == "full" and "original_module" not in name
                         and ("modules_to_save" in name or "image_newline" in name))
    trained = {part_of(n) for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n}
    missing = [part for part, mode in modes.items() if mode == "full" and part not in trained]
    if missing:
        raise UserError(f"parts.{missing[0]}.train: full, but model.adapter {adapter} does not carry {missing[0]} "
                        "(it was frozen in SFT); set it to frozen")
    log.info("continuing SFT adapter %s (its LoRA settings are kept; recipe lora.* is not used)", adapter)
    if not recipe.distributed.deepspeed:
        fp32_master_weights(model)
    return model
