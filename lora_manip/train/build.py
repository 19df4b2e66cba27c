"""What every training objective (SFT in workflow.py, GRPO in grpo.py) builds the same way from a recipe: the
demo's inputs when missing, the TrainingArguments, and the model with its trainable parts."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ..recipe import Recipe

log = logging.getLogger(__name__)


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
    """The asked-for loggers that are installed (a missing one is a warning, not a crash hours into a run).
    wandb defaults to offline mode: runs never depend on the network; `wandb sync` uploads later."""
    import importlib.util

    modules = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",)}
    out = []
    for r in (r for r in asked if r != "none"):
        if any(importlib.util.find_spec(m) for m in modules[r]):
            out.append(r)
        else:
            log.warning("train.report_to: %s is not installed (pip install %s); not reporting to it", r, r)
    if "wandb" in out:
        os.environ.setdefault("WANDB_MODE", "offline")
    return out


def build_model(recipe: Recipe):
    """The base model as the recipe loads it (dtype, attention, QLoRA's quantisation), its parts frozen, adapted or
    trained in full, with the chosen towers checkpointed."""
    from ..model.adapters import checkpoint_parts, prepare_trainable
    from ..model.load import load_model

    model = load_model(recipe.model.path, recipe.model.dtype, recipe.model.attn_implementation,
                       recipe.quantization if recipe.method == "qlora" else None)
    model.config.use_cache = False  # no KV cache while training (it only costs memory)
    model = prepare_trainable(model, recipe)
    checkpoint_parts(model, recipe.train.gradient_checkpointing)
    return model
