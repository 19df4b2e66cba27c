"""The trainers: what every objective's trainer adds to its base (`ManipTrainerMixin`), and SFT's (`ManipTrainer`,
over the transformers Trainer) with the objective that builds it (`SFT`).

`ManipTrainerMixin` is shared by SFT's trainer here and GRPO's (grpo.py, over TRL's GRPOTrainer): (1) one optimizer
group per part and learning rate (train/optim.py), (2) the learning rate of every part and the peak memory on each
training log line, (3) saves in the base's layout: the adapter or model, what PEFT does not save itself
(image_newline, model/adapters.save_extras) and the base's own processor files, never TRL's frozen reference adapter,
(4) checkpoints marked complete before older ones rotate away, extras restored on resume, (5) the run's end as
workflow.end_run reads it: what is plotted, which scores are kept, whether the validation set is scored first.

Why Trainer and not TRL's SFTTrainer for SFT: SFTTrainer wants a `datasets.Dataset`, and for vision-language models
its collator supervises image tokens unless the chat template carries `{% generation %}` markers, which real
LLaVA-OneVision templates do not. The kit does its own tokenisation and label masking (data/encode.py) and its own
collator, so SFTTrainer would add a dependency surface and nothing else. Trainer brings DeepSpeed, checkpointing,
resume, schedulers, logging integrations and the optimizer registry. SFT adds: length-grouped and token-budget
batches, a loss that never materialises full-vocabulary logits for unlabelled positions and can weigh samples
instead of tokens (train/loss.py), MeZO, text-only batches that still run the vision tower when several processes
train (`image_features_unused`), and tokens/s in the log.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import torch
from transformers import Trainer

from ..checkpoints.next_config import carry_image_cap
from ..data.collate import DUMMY_IMAGE, Collator
from ..data.processor import save_processor
from ..model.adapters import load_extras, save_extras
from .build import Inputs, Objective, training_arguments
from .callbacks import PreemptionCallback, part_lrs_and_memory, plot_loss
from .loss import IGNORE, loss_at_positions, positions_to_keep, supervised_rows
from .optim import param_groups


class ManipTrainerMixin:
    """What every objective's trainer adds (module docstring); first base of the trainer class, before the Trainer
    (or TRL trainer) it extends."""

    plots = (("loss.png", plot_loss),)  # (file, plot_loss-like function over train_log.jsonl), drawn at the end
    scores_file: str | None = None  # where the end of the run keeps its validation scores, if it keeps them

    def __init__(self, *args, recipe, processor, base_folder=None, **kwargs):
        self.recipe, self.processor, self.base_folder = recipe, processor, base_folder
        super().__init__(*args, **kwargs)
        self.add_callback(PreemptionCallback())  # SIGTERM / SIGUSR1: save at the next step boundary, stop

    def evaluates_at_start(self) -> bool:
        """Whether the run scores the validation set before the first step too (workflow.run_training)."""
        return False

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            model = model or self.model
            opt_cls, opt_kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
            opt_kwargs.pop("lr", None)  # each group carries its part's rate
            self.optimizer = opt_cls(param_groups(model, self.recipe), **opt_kwargs)
            if "bitsandbytes" in str(opt_cls) and opt_kwargs.get("optim_bits") == 8:
                keep_embeddings_32bit(model)
        return self.optimizer

    def step_log(self) -> dict:
        """Fields a trainer adds to each training log line after the per-part rates and memory."""
        return {}

    def log(self, logs: dict, start_time: float | None = None) -> None:
        if self.optimizer is not None and "loss" in logs:
            logs.update(part_lrs_and_memory(self.optimizer, logs.get("learning_rate")))
            logs.update(self.step_log())
        super().log(logs, start_time)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        from peft import PeftModel
        from transformers.trainer import TRAINING_ARGS_NAME

        out = output_dir or self.args.output_dir
        if isinstance(self.model, PeftModel) and len(self.model.peft_config) > 1:
            # TRL's frozen "ref" copy of a continued adapter is the run's starting point, not its result.
            if self.args.should_save:
                os.makedirs(out, exist_ok=True)
                self.model.save_pretrained(out, selected_adapters=["default"])
                torch.save(self.args, os.path.join(out, TRAINING_ARGS_NAME))
        else:
            # The base's own processor files are copied below, not those of the kit's image-only loader that a
            # processing_class (GRPO's) would write.
            proc, self.processing_class = self.processing_class, None
            try:
                super()._save(out, state_dict)
            finally:
                self.processing_class = proc
        if self.args.should_save:
            save_extras(self.model, out, state_dict)
            # An adapter, checkpoint or trained model folder loads with AutoProcessor like the base.
            save_processor(self.processor, out, source=self.base_folder)
            carry_image_cap(Path(out), self.recipe.data.max_image_tiles)  # a server tiles as training did

    def save_final(self, output_dir: str, mark_finished: bool = True) -> None:
        """The run's result. A full model whose trained weights were kept in fp32 (model/adapters.py: fp32 master
        weights) is written in the dtype it was loaded in, so the folder matches the base tensor for tensor;
        checkpoints keep fp32 so a resume continues exactly. `mark_finished`: write run_complete.json (the final
        save writes in place: only that marker says it completed; merge checks it); workflow.end_run writes it
        itself, last."""
        from peft import PeftModel

        from ..model.load import compute_dtype

        load_dtype = compute_dtype(self.recipe.model.dtype)
        if isinstance(self.model, PeftModel) or self.is_deepspeed_enabled or load_dtype == torch.float32:
            self.save_model(output_dir)
        else:
            state = {k: (v.to(load_dtype) if v.is_floating_point() and v.dtype == torch.float32 else v)
                     for k, v in self.model.state_dict().items()}
            self._save(output_dir, state_dict=state)
        if mark_finished and self.args.should_save:
            from ..runinfo import finish_run

            finish_run(output_dir, self.state.global_step)

    def _save_checkpoint(self, model, trial):
        """The Trainer's checkpoint, marked complete before older ones are rotated away: the Trainer rotates inside
        _save_checkpoint, before on_save, so a crash in between would leave nothing marked to resume from."""
        from transformers.trainer import rotate_checkpoints

        from .run_folder import mark_complete

        args = self.args
        limit, args.save_total_limit = args.save_total_limit, None
        try:
            super()._save_checkpoint(model, trial)
        finally:
            args.save_total_limit = limit
        if args.should_save:
            mark_complete(args.output_dir, self.state.global_step)
            rotate_checkpoints(output_dir=args.output_dir, save_total_limit=limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_extras(model or self.model, resume_from_checkpoint)  # PEFT's resume restores the adapter only


class ManipTrainer(ManipTrainerMixin, Trainer):
    """SFT: the Trainer with the kit's batches, loss and MeZO (module docstring)."""

    def __init__(self, *args, recipe, processor, generation_eval=None, **kwargs):
        # Several processes: text-only batches carry a dummy image so every process runs the same modules each step.
        kwargs.setdefault("data_collator", Collator(processor, dummy_image=kwargs["args"].world_size > 1,
                                                    packing=recipe.data.packing))
        super().__init__(*args, recipe=recipe, processor=processor, **kwargs)
        # compute_loss divides by the token count of the whole accumulated batch (num_items_in_batch).
        self.loss_is_scaled_for_ga = True
        self._tokens = 0
        self._tokens_since = time.time()
        if generation_eval is not None:
            generation_eval.attach(self)

    def _get_train_sampler(self, train_dataset=None):
        # Length-grouped batches, images and text-only apart: little padding on anyres sequences (data/sampler.py).
        if not self.recipe.data.group_by_length:
            return super()._get_train_sampler(train_dataset)
        from ..data.sampler import grouped_sampler

        return grouped_sampler(train_dataset if train_dataset is not None else self.train_dataset,
                               self.args.per_device_train_batch_size, self.args.data_seed or self.args.seed)

    def get_train_dataloader(self):
        budget = self.recipe.train.max_tokens_per_batch
        if not budget:
            return super().get_train_dataloader()
        # Variable-size micro-batches need a batch sampler; accelerate then hands each process every
        # world_size-th batch (the sampler makes their number a multiple of world_size).
        from torch.utils.data import DataLoader

        from ..data.sampler import token_budget_sampler

        sampler = token_budget_sampler(self.train_dataset, budget, self.processor.num_image_tokens,
                                       self.args.data_seed or self.args.seed, self.recipe.data.packing,
                                       self.args.world_size, self.args.gradient_accumulation_steps)
        loader = DataLoader(self.train_dataset, batch_sampler=sampler, collate_fn=self.data_collator,
                            num_workers=self.args.dataloader_num_workers, pin_memory=self.args.dataloader_pin_memory)
        return self.accelerator.prepare(loader)

    def _get_num_items_in_batch(self, batch_samples, device):
        if self.recipe.train.loss_reduction == "token":
            return super()._get_num_items_in_batch(batch_samples, device)
        # Count samples instead of tokens, through the stock counter so its cross-process sum stays: one
        # supervised shifted label per sample that has any.
        marks = []
        for b in batch_samples:
            m = torch.full((len(b["labels"]), 2), IGNORE, dtype=torch.long)
            m[supervised_rows(b["labels"]).cpu(), 1] = 0
            marks.append({"labels": m})
        return super()._get_num_items_in_batch(marks, device)

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.recipe.train.optimizer != "mezo":
            return super().training_step(model, inputs, num_items_in_batch)
        return self._mezo_step(model, self._prepare_inputs(inputs))

    @torch.no_grad()
    def _mezo_step(self, model, inputs):
        """MeZO (Malladi et al. 2023), as upstream's trainer offers: estimate the gradient along one random
        direction z from two forward passes at theta +- eps*z, then theta -= lr * g * z. z is regenerated from a
        seed instead of stored, so memory is that of inference. The per-part learning rates and weight decay of
        the optimizer groups apply; the (SGD) optimizer the Trainer steps afterwards sees no gradients."""
        eps = self.recipe.train.mezo_eps
        seed = int(torch.randint(0, 2**31 - 1, (1,)).item())  # from the seeded RNG: reproducible and resumable
        groups = [(g, [p for p in g["params"] if p.requires_grad]) for g in self.optimizer.param_groups]

        def walk(fn):
            gen = torch.Generator(device="cpu").manual_seed(seed)
            for g, params in groups:
                for p in params:
                    fn(g, p, torch.randn(p.shape, generator=gen).to(p.device, p.dtype))

        walk(lambda g, p, z: p.add_(z, alpha=eps))
        loss_plus = self.compute_loss(model, dict(inputs))
        walk(lambda g, p, z: p.add_(z, alpha=-2 * eps))
        loss_minus = self.compute_loss(model, dict(inputs))
        walk(lambda g, p, z: p.add_(z, alpha=eps))
        projected = float(loss_plus - loss_minus) / (2 * eps)

        def update(g, p, z):
            if g["weight_decay"]:
                p.mul_(1 - g["lr"] * g["weight_decay"])
            p.add_(z, alpha=-g["lr"] * projected)

        walk(update)
        return ((loss_plus + loss_minus) / 2).detach() / self.args.gradient_accumulation_steps

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.pop("labels")
        dummy = inputs.pop(DUMMY_IMAGE, False)
        mask = inputs.get("attention_mask")  # packed rows have none: every position is a real token
        self._tokens += int(mask.sum()) if mask is not None else inputs["input_ids"].numel()
        keep = positions_to_keep(labels)
        with image_features_unused(model) if dummy else contextlib.nullcontext():
            outputs = model(**inputs, logits_to_keep=keep)
        loss = loss_at_positions(outputs.logits, labels, keep, num_items_in_batch,
                                 per_sample=self.recipe.train.loss_reduction == "sample")
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # num_items_in_batch was summed over processes; DDP/ZeRO average gradients over them.
            loss = loss * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss

    def step_log(self) -> dict:
        now = time.time()
        out = {"tokens_per_s": round(self._tokens / max(now - self._tokens_since, 1e-9), 1)}
        self._tokens, self._tokens_since = 0, now
        return out

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, dict(inputs))
        return loss.detach(), None, None


def keep_embeddings_32bit(model) -> None:
    """What the stock create_optimizer does for 8-bit bitsandbytes optimizers and the per-part groups would lose:
    embedding tables keep 32-bit optimizer state (8-bit state on embeddings is unstable, per bitsandbytes)."""
    import bitsandbytes

    manager = bitsandbytes.optim.GlobalOptimManager.get_instance()
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding):
            manager.register_module_override(module, "weight", {"optim_bits": 32})


@contextlib.contextmanager
def image_features_unused(model):
    """Run the model on a batch whose only image is the collator's dummy, keeping none of its features.

    Under ZeRO-3 every process must run the same modules in the same order each step (parameters are gathered
    module by module, collectively), and DDP expects a gradient for every trained parameter: a text-only batch on
    one process while another has images desynchronises both (a gloo collective mismatch, an NCCL hang). So a
    text-only batch carries a blank image, goes through the model's own forward (embeddings, vision tower,
    projector, LM: the order every process runs), and the image features are cut to zero rows before they are
    placed, as upstream LLaVA does (`image_features[0:0]`): the vision tower and projector run and receive exactly
    zero gradient, the text's logits and gradients are those without the dummy. transformers has no hook for this,
    hence the temporary instance attribute over `get_image_features`."""
    from transformers import LlavaOnevisionModel

    inner = next(m for m in model.modules() if isinstance(m, LlavaOnevisionModel))
    original = inner.get_image_features

    def zero_rows(*args, **kwargs):
        out = original(*args, **kwargs)
        out.pooler_output = [torch.cat(out.pooler_output, dim=0)[:0]]
        return out

    inner.get_image_features = zero_rows
    try:
        yield
    finally:
        del inner.get_image_features


def sft_inputs(recipe, processor, train_ds, val_ds) -> Inputs:
    """SFT's dataset wrapper: the datasets as they are (ManipTrainer's collator batches them), plus eval during
    training, built before the model loads so that a best_metric these samples cannot produce is refused now."""
    gen_eval = None
    if recipe.train.eval_steps:
        from .evaluate import GenerationEval

        gen_eval = GenerationEval.from_recipe(recipe, val_ds)
    return Inputs(train_ds, val_ds, {"generation_eval": gen_eval})


SFT = Objective(arguments=training_arguments, inputs=sft_inputs, trainer=ManipTrainer)
