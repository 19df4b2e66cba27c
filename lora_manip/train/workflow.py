"""`lora-manip train`: recipe -> processor -> data -> model -> trainable parts -> Trainer -> saved run.

Read top to bottom; each step is a small function. The run folder receives the resolved recipe (recipe.yaml),
train_log.jsonl, checkpoints, and at the end the adapter (LoRA/QLoRA) or full model, with the processor.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path

from ..errors import UserError
from ..fsutil import (atomic_write_text, cleanup_partials, disk_errors, guard_output, move_aside, normal_mode,
                      output_lock)
from ..recipe import Recipe, dump_recipe
from ..runinfo import read_run, start_run

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


RUN_ID_ENV = "LORA_MANIP_RUN_ID"  # set by the launcher for the torchrun children: the folder is prepared


def _rank() -> int:
    return int(os.environ.get("RANK", 0))


def check_output_dir(recipe: Recipe, overwrite: bool, resume: bool) -> None:
    """Every refusal about train.output_dir, before anything is loaded or written."""
    from ..model.load import local_folder

    out = Path(recipe.train.output_dir)
    if overwrite and resume:
        raise UserError("--overwrite and --resume contradict each other; choose one")
    if out.exists() and not out.is_dir():
        raise UserError(f"train.output_dir {out} is a file, not a folder; choose another output folder")
    inputs = {"base model folder": local_folder(recipe.model.path) or recipe.model.path}
    for split in ("train", "val"):
        for i, d in enumerate(getattr(recipe.data, split)):
            inputs[f"data.{split}.{i}.annotation_path file"] = d.annotation_path
            inputs[f"data.{split}.{i}.data_path folder"] = d.data_path
    if recipe.distributed.deepspeed:
        inputs["distributed.deepspeed file"] = recipe.distributed.deepspeed
    # A run inside its data root is odd but harmless; one that holds (and --overwrite would delete) it is not.
    guard_output(out, inputs, "train.output_dir", may_nest_in=tuple(k for k in inputs if k.startswith("data.")))
    if resume:
        latest_checkpoint(out)  # refuse now, not after minutes of loading
    elif out.exists() and any(out.iterdir()) and not overwrite:
        raise UserError(f"train.output_dir {out} already holds a run; pass --resume to continue it, --overwrite "
                        "to replace it (the old run is deleted first), or choose another folder "
                        "(--set train.output_dir=...)")


def prepare_output_dir(recipe: Recipe, overwrite: bool, resume: bool) -> str | None:
    """Checks, then (rank 0, holding the folder's lock in run_training) clears leftovers, takes an --overwrite'd
    run out of the way in one rename before anything new is written, and writes run.json first. Returns the run
    id (None on other ranks)."""
    out = Path(recipe.train.output_dir)
    prepared = os.environ.get(RUN_ID_ENV)
    if prepared and (read_run(out) or {}).get("run_id") == prepared:
        return prepared  # the launcher did all of this before starting the processes
    if _rank() != 0:
        return None  # rank 0 checks and prepares; the others never write into the folder themselves
    check_output_dir(recipe, overwrite, resume)
    cleanup_partials(out)
    if overwrite and out.exists() and any(out.iterdir()):
        # The old run's adapter, recipe or log must never sit beside the new run's: all of it goes, in one rename.
        move_aside(out)
    out.mkdir(parents=True, exist_ok=True)
    previous = read_run(out) if resume else None
    return start_run(out, "train", previous["run_id"] if previous else None)


@contextlib.contextmanager
def run_lock(recipe: Recipe):
    """One run per output folder: rank 0 (or the launcher) owns train.output_dir while the run lasts."""
    if _rank() != 0:
        yield
        return
    with output_lock(recipe.train.output_dir, "lora-manip train"):
        yield


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


def load_data(recipe: Recipe, processor):
    from ..data.dataset import build_datasets

    return build_datasets(recipe.data, processor, recipe.train.seed)


def build_model(recipe: Recipe):
    from ..model.adapters import checkpoint_parts, prepare_trainable
    from ..model.load import load_model

    model = load_model(recipe.model.path, recipe.model.dtype, recipe.model.attn_implementation,
                       recipe.quantization if recipe.method == "qlora" else None)
    model.config.use_cache = False  # no KV cache while training (it only costs memory)
    model = prepare_trainable(model, recipe)
    checkpoint_parts(model, recipe.train.gradient_checkpointing)
    return model


def build_trainer(recipe: Recipe, overwrite: bool = False, resume: bool = False, checked: bool = False):
    """Everything up to the first step: checks, inputs, processor, data, model, Trainer."""
    from ..data.dataset import Collator
    from ..model.adapters import trainable_summary
    from ..model.load import local_folder
    from ..model.processor import apply_image_grid, load_processor
    from .callbacks import JsonlLogCallback
    from .launch import preflight
    from .trainer import ManipTrainer

    out = Path(recipe.train.output_dir)
    if not checked:
        preflight(recipe)
    prepare_output_dir(recipe, overwrite, resume)
    prepare_demo_inputs(recipe)
    processor = load_processor(recipe.model.path, recipe.data.max_image_tiles)
    train_ds, val_ds = load_data(recipe, processor)
    gen_eval = None
    if recipe.train.eval_steps:  # before the model: a best_metric these samples cannot produce is refused now
        from .evaluate import GenerationEval

        gen_eval = GenerationEval.from_recipe(recipe, val_ds)
    args = training_arguments(recipe)  # before the model: under ZeRO-3 it makes from_pretrained partition
    # Reading world_size sets up the process group (and DeepSpeed's), which ZeRO-3's partitioned init needs.
    log.info("processes: %d", args.world_size)
    from transformers import set_seed

    set_seed(recipe.train.seed)  # LoRA and any new weights initialise from the recipe's seed, not from chance
    model = build_model(recipe)
    apply_image_grid(model, processor)  # data.max_image_tiles: the model tiles as the processor measured
    if args.should_save:
        atomic_write_text(out / "recipe.yaml", dump_recipe(recipe))
    log.info("trainable parameters per part: %s", json.dumps(trainable_summary(model)))
    log.info("train samples: %d (%s), effective batch size %d", len(train_ds),
             ", ".join(f"dropped {n}: {r}" for r, n in train_ds.dropped.items()) or "none dropped",
             recipe.effective_batch_size)
    # Several processes: text-only batches carry a dummy image so every process runs the same modules each step.
    collator = Collator(processor, dummy_image=args.world_size > 1, packing=recipe.data.packing)
    trainer = ManipTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=val_ds,
                           data_collator=collator, recipe=recipe, processor=processor,
                           base_folder=local_folder(recipe.model.path),
                           callbacks=[JsonlLogCallback(out / "train_log.jsonl")])
    if gen_eval is not None:
        gen_eval.attach(trainer)
    return trainer


def run_training(recipe: Recipe, overwrite: bool = False, resume: bool = False) -> Path:
    from .callbacks import plot_loss

    if recipe.objective == "grpo":
        from .grpo import run_grpo

        return run_grpo(recipe, overwrite, resume)
    out = Path(recipe.train.output_dir)
    with run_lock(recipe), disk_errors(out):
        trainer = build_trainer(recipe, overwrite, resume)
        trainer.train(resume_from_checkpoint=latest_checkpoint(out) if resume else None)
        if trainer.eval_dataset is not None:
            trainer.evaluate()
        trainer.save_final(str(out))  # in place: the run_complete.json it writes last says it finished
        if trainer.args.should_save:
            plot_loss(out / "train_log.jsonl", out / "loss.png")
            for f in out.iterdir():  # some writers (safetensors) leave 0600; results get the umask's mode
                if f.is_file():
                    normal_mode(f, folder=False)
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
