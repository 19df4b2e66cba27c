"""`lora-manip train`: recipe -> processor -> data -> model -> trainable parts -> Trainer -> saved run.

Read top to bottom. The steps GRPO shares live below this module: the output folder's checks, lock and resume point
in run_folder.py, demo inputs, TrainingArguments and the model in build.py. The run folder receives the resolved recipe (recipe.yaml),
train_log.jsonl, checkpoints, and at the end the adapter (LoRA/QLoRA) or full model, with the processor.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ..fsutil import atomic_write_text, disk_errors, normal_mode
from ..recipe import Recipe, dump_recipe
from .build import build_model, prepare_demo_inputs, training_arguments
from .run_folder import latest_checkpoint, prepare_output_dir, run_lock

log = logging.getLogger(__name__)


def build_trainer(recipe: Recipe, overwrite: bool = False, resume: bool = False, checked: bool = False):
    """Everything up to the first step: checks, inputs, processor, data, model, Trainer."""
    from ..data.collate import Collator
    from ..data.dataset import build_datasets
    from ..model.adapters import trainable_summary
    from ..hub import local_folder
    from ..data.processor import apply_image_grid, load_processor
    from .callbacks import JsonlLogCallback
    from .preflight import preflight
    from .trainer import ManipTrainer

    out = Path(recipe.train.output_dir)
    if not checked:
        preflight(recipe)
    prepare_output_dir(recipe, overwrite, resume)
    prepare_demo_inputs(recipe)
    processor = load_processor(recipe.model.path, recipe.data.max_image_tiles)
    train_ds, val_ds = build_datasets(recipe.data, processor, recipe.train.seed)
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
