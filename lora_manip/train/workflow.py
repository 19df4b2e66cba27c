"""`lora-manip train`, every objective: recipe -> processor -> data -> model -> trainable parts -> trainer -> saved run.

Read top to bottom. `build_trainer` is the one build and `end_run` the one ending of every run; an objective (SFT in
trainer.py, GRPO in grpo.py) brings only its arguments, its dataset wrapper and its trainer class (build.Objective),
as LLaMA-Factory's stages all call one loader set. So the processor is loaded with the image-tile cap
(data.max_image_tiles) and the model given the same grid whatever the objective, as eval reloads them from the
run's recipe.yaml. The output folder's checks, lock and resume point live in run_folder.py; demo inputs,
TrainingArguments and the model in build.py. The run folder receives the resolved recipe (recipe.yaml),
train_log.jsonl, checkpoints, and at the end the adapter (LoRA/QLoRA) or full model, with the processor.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ..fsutil import atomic_write_text, disk_errors, normal_mode
from ..recipe import Recipe, dump_recipe
from .build import Objective, build_model, check_adapter, prepare_demo_inputs
from .run_folder import latest_checkpoint, prepare_output_dir, run_dir, run_lock

log = logging.getLogger(__name__)


def objective_of(recipe: Recipe) -> Objective:
    if recipe.objective == "grpo":
        from .grpo import GRPO  # TRL is imported only for GRPO runs

        return GRPO
    from .trainer import SFT

    return SFT


def build_trainer(recipe: Recipe, overwrite: bool = False, resume: bool = False, checked: bool = False):
    """Everything up to the first step, for every objective: checks, inputs, processor, data, model, trainer."""
    from transformers import set_seed

    from ..data.dataset import build_datasets
    from ..data.processor import apply_image_grid, load_processor
    from ..hub import local_folder
    from ..model.adapters import trainable_summary
    from .callbacks import JsonlLogCallback
    from .plan import batch_accounting
    from .preflight import preflight

    objective = objective_of(recipe)
    out = run_dir(recipe)  # resolved once (~, links): the kit and the Trainer write to one folder
    if not checked:
        preflight(recipe)
    check_adapter(recipe)
    prepare_output_dir(recipe, overwrite, resume)
    prepare_demo_inputs(recipe)
    processor = load_processor(recipe.model.path, recipe.data.max_image_tiles)
    if objective.check is not None:
        objective.check(recipe, processor)
    train_ds, val_ds = build_datasets(recipe.data, processor, recipe.train.seed)
    log.info("train samples: %d (%s); %s", len(train_ds),
             ", ".join(f"dropped {n}: {r}" for r, n in train_ds.dropped.items()) or "none dropped",
             batch_accounting(recipe, train_ds, processor.num_image_tokens))  # under a budget: what a step holds
    inputs = objective.inputs(recipe, processor, train_ds, val_ds)  # before the model: refusals come early
    args = objective.arguments(recipe)  # before the model: under ZeRO-3 it makes from_pretrained partition
    # Reading world_size sets up the process group (and DeepSpeed's), which ZeRO-3's partitioned init needs.
    log.info("processes: %d", args.world_size)
    set_seed(recipe.train.seed)  # LoRA and any new weights initialise from the recipe's seed, not from chance
    model = build_model(recipe)
    apply_image_grid(model, processor)  # data.max_image_tiles: the model tiles as the processor measured
    if args.should_save:
        atomic_write_text(out / "recipe.yaml", dump_recipe(recipe))
    log.info("trainable parameters per part: %s", json.dumps(trainable_summary(model)))
    return objective.trainer(model=model, args=args, train_dataset=inputs.train, eval_dataset=inputs.val,
                             recipe=recipe, processor=processor, base_folder=local_folder(recipe.model.path),
                             callbacks=[JsonlLogCallback(out / "train_log.jsonl")], **inputs.trainer_kwargs)


def run_training(recipe: Recipe, overwrite: bool = False, resume: bool = False) -> Path:
    """Build, score the validation set where the objective does (before the first step too for GRPO's
    eval_at_start), train, score it again, end the run."""
    out = run_dir(recipe)  # resolved once (~, links): the kit and the Trainer write to one folder
    with run_lock(recipe), disk_errors(out):
        trainer = build_trainer(recipe, overwrite, resume)
        scores = {}
        if trainer.eval_dataset is not None and trainer.evaluates_at_start() and not resume:
            scores["start"] = trainer.evaluate()
        trainer.train(resume_from_checkpoint=latest_checkpoint(out) if resume else None)
        if trainer.eval_dataset is not None:
            scores["end"] = trainer.evaluate()
        end_run(trainer, out, scores)
    return out


def end_run(trainer, out: Path, scores: dict) -> None:
    """The one ending of every run: the result saved in place, the scores the trainer keeps, its plots, the
    umask's file modes, and last the marker that says the run finished (merge, eval and predict check it)."""
    from ..runinfo import finish_run

    trainer.save_final(str(out), mark_finished=False)
    if not trainer.args.should_save:
        return
    if scores and trainer.scores_file:
        atomic_write_text(out / trainer.scores_file, json.dumps(scores, indent=1) + "\n")
    for name, plot in trainer.plots:
        plot(out / "train_log.jsonl", out / name)
    for f in out.iterdir():  # some writers (safetensors) leave 0600; results get the umask's mode
        if f.is_file():
            normal_mode(f, folder=False)
    finish_run(out, trainer.state.global_step)
