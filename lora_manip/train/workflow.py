"""`lora-manip train`: recipe -> processor -> data -> model -> trainable parts -> Trainer -> saved run.

Read top to bottom; each step is a small function. The run folder receives the resolved recipe (recipe.yaml),
train_log.jsonl, checkpoints, and at the end the adapter (LoRA/QLoRA) or full model, with the processor.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from ..errors import UserError
from ..fsutil import atomic_write_text
from ..recipe import Recipe, dump_recipe

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
        write_synth_dataset(first.data_path, n=synth.n, seed=synth.seed)


def check_output_dir(recipe: Recipe, overwrite: bool, resume: bool) -> None:
    out = Path(recipe.train.output_dir)
    if overwrite and resume:
        raise UserError("--overwrite and --resume contradict each other; choose one")
    if resume:
        latest_checkpoint(out)  # refuse now, not after minutes of loading
    elif out.exists() and any(out.iterdir()):
        if not overwrite:
            raise UserError(f"train.output_dir {out} already holds a run; pass --resume to continue it, --overwrite "
                            "to train into it anyway, or choose another folder (--set train.output_dir=...)")
        if int(os.environ.get("RANK", 0)) == 0:
            # The old run's checkpoints would be rotated against (or resumed instead of) the new ones, and its log
            # would be appended to: --overwrite removes exactly those, nothing else in the folder.
            import shutil

            for p in [*out.glob("checkpoint-*"), out / "train_log.jsonl", out / "loss.png"]:
                log.warning("--overwrite: removing %s of the previous run", p)
                shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)


def training_arguments(recipe: Recipe):
    from transformers import TrainingArguments

    import torch

    from ..model.load import compute_dtype, has_cuda

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
        gradient_checkpointing=t.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
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


def load_data(recipe: Recipe, processor):
    from ..data.dataset import build_datasets

    return build_datasets(recipe.data, processor, recipe.train.seed)


def build_model(recipe: Recipe):
    from ..model.adapters import prepare_trainable
    from ..model.load import load_model

    model = load_model(recipe.model.path, recipe.model.dtype, recipe.model.attn_implementation,
                       recipe.quantization if recipe.method == "qlora" else None)
    model.config.use_cache = False  # no KV cache while training (it only costs memory)
    return prepare_trainable(model, recipe)


def build_trainer(recipe: Recipe, overwrite: bool = False, resume: bool = False):
    """Everything up to the first step: checks, inputs, processor, data, model, Trainer."""
    from ..data.dataset import Collator
    from ..model.adapters import trainable_summary
    from ..model.load import local_folder
    from ..model.processor import load_processor
    from .callbacks import JsonlLogCallback
    from .launch import preflight
    from .trainer import ManipTrainer

    out = Path(recipe.train.output_dir)
    preflight(recipe)
    check_output_dir(recipe, overwrite, resume)
    prepare_demo_inputs(recipe)
    processor = load_processor(recipe.model.path)
    train_ds, val_ds = load_data(recipe, processor)
    args = training_arguments(recipe)  # before the model: under ZeRO-3 it makes from_pretrained partition
    # Reading world_size sets up the process group (and DeepSpeed's), which ZeRO-3's partitioned init needs.
    log.info("processes: %d", args.world_size)
    from transformers import set_seed

    set_seed(recipe.train.seed)  # LoRA and any new weights initialise from the recipe's seed, not from chance
    model = build_model(recipe)
    if args.should_save:
        atomic_write_text(out / "recipe.yaml", dump_recipe(recipe))
    log.info("trainable parameters per part: %s", json.dumps(trainable_summary(model)))
    log.info("train samples: %d (%s), effective batch size %d", len(train_ds),
             ", ".join(f"dropped {n}: {r}" for r, n in train_ds.dropped.items()) or "none dropped",
             recipe.effective_batch_size)
    # Several processes: text-only batches carry a dummy image so every process runs the same modules each step.
    collator = Collator(processor, dummy_image=args.world_size > 1)
    return ManipTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=val_ds, data_collator=collator,
                        recipe=recipe, processor=processor, base_folder=local_folder(recipe.model.path),
                        callbacks=[JsonlLogCallback(out / "train_log.jsonl")])


def run_training(recipe: Recipe, overwrite: bool = False, resume: bool = False) -> Path:
    from .callbacks import plot_loss

    if recipe.objective == "grpo":
        from .grpo import run_grpo

        return run_grpo(recipe, overwrite, resume)
    out = Path(recipe.train.output_dir)
    trainer = build_trainer(recipe, overwrite, resume)
    trainer.train(resume_from_checkpoint=latest_checkpoint(out) if resume else None)
    if trainer.eval_dataset is not None:
        trainer.evaluate()
    trainer.save_final(str(out))
    if trainer.args.should_save:
        plot_loss(out / "train_log.jsonl", out / "loss.png")
    return out


def latest_checkpoint(out: Path) -> str:
    """The newest checkpoint whose save completed; incomplete ones (a run killed while saving) are skipped."""
    from .callbacks import COMPLETE_MARKER

    ckpts = sorted((p for p in out.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
                   key=lambda p: int(p.name.split("-")[-1]), reverse=True)
    for p in ckpts:
        if (p / COMPLETE_MARKER).is_file():
            return str(p)
        log.warning("skipping %s: its save did not complete", p)
    raise UserError(f"--resume: {out} holds no complete checkpoint-* folder to resume from")
