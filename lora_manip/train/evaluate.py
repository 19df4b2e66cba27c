"""Eval during training: every `train.eval_steps` steps (and at the last step) the model being trained answers
`train.eval_limit` validation samples, greedy and batched, and the answers are scored with the manipulation metrics.

The pieces are the eval package's own: `predict_samples` generates (lora_manip/eval/generate.py, prompts from
data/encode.py `prompt_text` with the recipe's system prompt) and `score_records` scores (eval/score.py), so the
numbers logged here are the ones `lora-manip eval` reports for the same answers (strict mode, coordinates read
as [0, 1]). What this module adds is when and where:

- **Samples.** A seeded subset of `train.eval_limit` samples of the Trainer's validation set (the recipe's data.val
  plus the val_fraction hold-outs), chosen once: every eval answers the same questions, so the numbers compare.
- **Logged** through `Trainer.log` as `eval_<kind>.<metric>` (eval_box.acc@0.1, eval_choice.accuracy,
  eval_trajectory.dtw, eval_<kind>.parse_failure_rate, ...) plus eval_generated (samples), eval_unscorable and
  eval_generate_s (seconds): train_log.jsonl has them at their step, wandb / tensorboard show them under eval/.
  The answers themselves go to OUTPUT_DIR/eval_predictions/step-N.jsonl (`lora-manip score` reads them).
- **Best checkpoint.** With `train.best_metric`, each eval that beats the best so far (strictly) saves the model
  as the final save does (adapter or full model, extras, processor) plus recipe.yaml and best.json (metric, value,
  step) into OUTPUT_DIR/best_checkpoint, built beside it and swapped in. The folder is deliberately not named
  `checkpoint-*`: the Trainer's checkpoint rotation (mtime-ordered) counts every `checkpoint-*` folder and would
  delete it under save_total_limit. Which way a metric improves is decided by name in recipe/names.py. On
  `--resume` the best so far is read back from best.json. A value the eval cannot compute (None: e.g. a distance
  when no answer parsed) never counts as an improvement.
- **Several processes** (DDP, DeepSpeed ZeRO-3): each process answers its share of the batches and the answers are
  gathered, so every process scores the same answers and agrees on "improved" (the best save is collective under
  ZeRO-3). ZeRO-3 gathers each layer's weights collectively in every forward pass, so the processes must run the
  same passes: generate() keeps them in step within a batch (transformers' synced_gpus, on by default under
  ZeRO-3), and the batches are dealt so that in every round all processes hold batches with the same number of
  images per sample (a text-only batch skips the vision tower), the last round of each kind padded with a repeat.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from transformers import TrainerCallback

from ..errors import UserError
from ..fsutil import finish_tree
from ..outputs import remove_path  # a link planted at these names is removed, never followed
from ..recipe import POINT_THRESHOLD, higher_is_better

log = logging.getLogger(__name__)

BEST_DIR = "best_checkpoint"
BEST_INFO = "best.json"
PREDICTIONS = "eval_predictions"  # step-N.jsonl: the answers of each eval, as `lora-manip score` reads them
_WHERE = re.compile(r" (?:index|line) \d+.*$")  # Sample.source is "<file> index N (line M)" or "<file> line N"


def pick_samples(samples, limit: int, seed: int) -> list:
    """A seeded subset of `limit` samples, in their original order (all of them when there are no more)."""
    n = len(samples)
    idx = range(n) if n <= limit else sorted(np.random.default_rng(seed).choice(n, limit, replace=False).tolist())
    return [samples[i] for i in idx]


def eval_records(samples: list, answers: list[str]) -> list[dict]:
    """The records `lora-manip eval` writes to predictions.jsonl (and `lora-manip score` reads)."""
    from ..eval.generate import eval_record
    from ..answers.kinds import task_from_filename

    records = []
    for s, a in zip(samples, answers):
        file = _WHERE.sub("", s.source)
        records.append(eval_record(s, a, s.extra.get("dataset") or Path(file).stem, task_from_filename(file)))
    return records


def score_answers(samples: list, answers: list[str]) -> dict:
    """The scorer's summary for `answers` to `samples`, as `lora-manip eval` scores them."""
    from ..eval.score import score_records

    return score_records(eval_records(samples, answers), point_threshold=POINT_THRESHOLD)[1]


def flat_metrics(summary: dict) -> dict[str, float]:
    """{"box.acc@0.1": 0.5, ...}: the numeric per-kind stats over all eval samples (None values left out)."""
    return {f"{kind}.{name}": float(v) for kind, stats in summary["all"].items() for name, v in stats.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def deal_batches(batches: list[list[int]], n_images: list[int], world: int, rank: int) -> list[list[int]]:
    """This process's batches: round-robin, each kind (images per sample) padded to whole rounds with a repeat of
    its last batch, so that in every round all processes hold batches of one kind (see the module docstring)."""
    dealt: list[list[int]] = []
    for kind in dict.fromkeys(n_images[b[0]] for b in batches):
        group = [b for b in batches if n_images[b[0]] == kind]
        dealt += group + [group[-1]] * (-len(group) % world)
    return dealt[rank::world]


class GenerationEval(TrainerCallback):
    """Generate, score, log and keep the best model during training (module docstring). Built from the recipe and
    the validation set before the model loads (`from_recipe` refuses a best_metric the samples cannot produce),
    then `attach`ed to the Trainer, whose model, processor, `log` and `save_model` it uses."""

    def __init__(self, recipe, samples: list):
        t = recipe.train
        self.every, self.max_new_tokens = t.eval_steps, t.eval_max_new_tokens
        self.batch_size = t.per_device_batch_size
        self.system_prompt = recipe.data.system_prompt
        self.best_metric = t.best_metric
        self.samples = samples
        self.best: float | None = None
        self.trainer = None
        self._last_step = -1

    @classmethod
    def from_recipe(cls, recipe, val_ds) -> "GenerationEval":
        if val_ds is None or not len(val_ds):
            raise UserError("train.eval_steps: the validation set is empty (every data.val record was dropped or "
                            "skipped); fix the validation data or remove train.eval_steps")
        t = recipe.train
        seed = t.seed if recipe.data.seed is None else recipe.data.seed
        samples = pick_samples(val_ds.samples, t.eval_limit, seed)
        if t.best_metric:
            # Scoring the ground truths as answers shows which kinds and metrics these samples produce, exactly
            # as the scorer classifies them, before minutes of model loading.
            metrics = flat_metrics(score_answers(samples, [s.messages[-1]["content"] for s in samples]))
            if t.best_metric not in metrics:
                kinds = sorted({k.split(".")[0] for k in metrics})
                raise UserError(f"train.best_metric: {t.best_metric} is not produced by the {len(samples)} eval "
                                f"samples (their kinds: {', '.join(kinds) or 'none'}; *_px distances need the "
                                "records' width/height); choose another metric")
        log.info("eval during training: %d validation samples every %d steps%s", len(samples), t.eval_steps,
                 f", best {t.best_metric} kept in {BEST_DIR}/" if t.best_metric else "")
        return cls(recipe, samples)

    def attach(self, trainer) -> None:
        self.trainer = trainer
        trainer.add_callback(self)

    # ------------------------------------------------------------------------------------------------ events

    def on_train_begin(self, args, state, control, **kwargs):
        if not self.best_metric:
            return
        out = Path(args.output_dir)
        if args.should_save:
            _recover(out)
            info = out / BEST_DIR / BEST_INFO
            if info.is_file():  # --resume: the best so far stays the bar to beat
                saved = json.loads(info.read_text(encoding="utf-8"))
                if saved.get("metric") == self.best_metric:
                    self.best = saved["value"]
                    log.info("best %s so far: %s at step %s", self.best_metric, self.best, saved.get("step"))
        if getattr(args, "world_size", 1) > 1:
            # Every process must take the same "improved?" decision (the best save is collective under ZeRO-3),
            # so they start from rank 0's bar, whatever their own filesystem shows.
            shared = [self.best]
            torch.distributed.broadcast_object_list(shared, src=0)
            self.best = shared[0]

    def on_step_end(self, args, state, control, model=None, **kwargs):
        step = state.global_step
        if step == self._last_step or (step % self.every and step < state.max_steps):
            return
        self._last_step = step
        start = time.perf_counter()
        answers = self.generate(model, args)
        if args.should_save:
            from ..fsutil import atomic_write_text

            atomic_write_text(Path(args.output_dir) / PREDICTIONS / f"step-{step}.jsonl", "".join(
                json.dumps(r) + "\n" for r in eval_records(self.samples, answers)))
        summary = score_answers(self.samples, answers)
        metrics = flat_metrics(summary)
        logs = {f"eval_{k}": v for k, v in metrics.items()}
        logs.update(eval_generated=len(self.samples), eval_unscorable=len(summary["data_errors"]),
                    eval_generate_s=round(time.perf_counter() - start, 2))
        self.trainer.log(logs)
        log.info("eval at step %d: %s", step, ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()
                                                      if not k.endswith(".count")))
        if self.best_metric:
            self._keep_if_best(args, step, metrics.get(self.best_metric))

    # ---------------------------------------------------------------------------------------------- generate

    def generate(self, model, args) -> list[str]:
        from ..data.encode import Chat, prompt_text
        from ..eval.generate import plan_batches, predict_samples

        processor = self.trainer.processor
        chat = Chat(processor, self.system_prompt)
        prompts = [prompt_text(chat, s.messages) for s in self.samples]
        batches = plan_batches(processor, self.samples, prompts, self.batch_size)
        n_images = [len(s.images) for s in self.samples]
        mine = deal_batches(batches, n_images, args.world_size, args.process_index)
        answers: dict[int, str] = {}
        was_training = model.training
        model.eval()
        try:
            # autocast: trained weights are fp32 masters beside 16-bit frozen ones (model/adapters.py), which
            # only autocast mixes; the Trainer's own autocast wraps forward(), which generate() bypasses.
            with torch.no_grad(), self.trainer.accelerator.autocast(), _zero3_gathered_loose_weights(model):
                for b in mine:
                    got = predict_samples(model, chat, [self.samples[i] for i in b], batch_size=len(b),
                                          max_new_tokens=self.max_new_tokens, progress=False)
                    answers.update(zip(b, got))
        finally:
            model.train(was_training)
        if args.world_size > 1:
            shares: list = [None] * args.world_size
            torch.distributed.all_gather_object(shares, answers)
            for share in shares:
                answers.update(share)
        return [answers[i] for i in range(len(self.samples))]

    # ------------------------------------------------------------------------------------------------- best

    def _keep_if_best(self, args, step: int, value: float | None) -> None:
        if value is None:
            log.warning("eval at step %d: %s could not be computed; best checkpoint unchanged", step,
                        self.best_metric)
            return
        if self.best is not None and not (value > self.best if higher_is_better(self.best_metric)
                                          else value < self.best):
            return
        out = Path(args.output_dir)
        staging = out / f".{BEST_DIR}.staging"
        if args.should_save:
            remove_path(staging)
        self.trainer.accelerator.wait_for_everyone()
        self.trainer.save_model(str(staging))  # every process: under ZeRO-3 the weights are gathered collectively
        if args.should_save:
            from ..fsutil import atomic_write_text

            if (out / "recipe.yaml").is_file():  # eval and merge read the system prompt / quantisation from it
                shutil.copy2(out / "recipe.yaml", staging / "recipe.yaml")
            atomic_write_text(staging / BEST_INFO, json.dumps({
                "metric": self.best_metric, "value": value, "step": step,
                "higher_is_better": higher_is_better(self.best_metric), "previous": self.best}, indent=1) + "\n")
            _swap_in(staging, out / BEST_DIR)
        self.trainer.accelerator.wait_for_everyone()
        log.info("new best %s %.4g at step %d (was %s): saved to %s", self.best_metric, value, step, self.best,
                 out / BEST_DIR)
        self.best = value


@contextlib.contextmanager
def _zero3_gathered_loose_weights(model):
    """ZeRO-3 gathers a module's weights around its forward() only. generate() computes image features before the
    first forward (transformers' multimodal pre-pass, `get_image_features`), which uses `image_newline`, a weight
    of the inner model itself that is still partitioned then (an empty tensor). During eval that call gathers the
    inner model's own weights (one small tensor); every process makes it together, as the dealt batches ensure."""
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    if not is_deepspeed_zero3_enabled():
        yield
        return
    import deepspeed
    from transformers import LlavaOnevisionModel

    inner = next(m for m in model.modules() if isinstance(m, LlavaOnevisionModel))
    own, original = list(inner.parameters(recurse=False)), inner.get_image_features

    @functools.wraps(original)  # generate() picks the call's arguments from the signature
    def gathered(*args, **kwargs):
        with deepspeed.zero.GatheredParameters(own, modifier_rank=None):
            return original(*args, **kwargs)

    inner.get_image_features = gathered
    try:
        yield
    finally:
        del inner.get_image_features


def _swap_in(staging: Path, final: Path) -> None:
    """Replace `final` by the complete `staging` folder. Two renames: a crash between them leaves the previous
    best as `.best_checkpoint.old`, which `_recover` puts back."""
    old = final.parent / f".{final.name}.old"
    remove_path(old)
    finish_tree(staging)  # the umask's modes (safetensors writes 0600), on disk before the rename
    if final.exists():
        os.replace(final, old)
    os.replace(staging, final)
    remove_path(old)


def _recover(out: Path) -> None:
    final, old = out / BEST_DIR, out / f".{BEST_DIR}.old"
    if old.is_dir() and not final.exists():
        os.replace(old, final)
    remove_path(old)
    remove_path(out / f".{BEST_DIR}.staging")
