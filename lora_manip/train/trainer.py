"""The transformers Trainer, with the three things it lacks for this job.

Why Trainer and not TRL's SFTTrainer: SFTTrainer wants a `datasets.Dataset`, and for vision-language models its
collator supervises image tokens unless the chat template carries `{% generation %}` markers, which real
LLaVA-OneVision templates do not. The kit does its own tokenisation and label masking (data/encode.py) and its own
collator, so SFTTrainer would add a dependency surface and nothing else. Trainer brings DeepSpeed, checkpointing,
resume, schedulers, logging integrations and the optimizer registry.

What is added: (1) per-part learning rates (train/optim.py), (2) a loss that never materialises full-vocabulary
logits for unlabelled positions and can weigh samples instead of tokens (train/loss.py), (3) saving what PEFT
cannot (image_newline) and the base's own processor files, (4) text-only batches that still run the vision tower
when several processes train (`image_features_unused`), plus log fields (learning rate per part, tokens/s).
"""

from __future__ import annotations

import contextlib
import time

import torch
from transformers import Trainer

from ..data.collate import DUMMY_IMAGE
from ..model.adapters import load_extras, save_extras
from ..data.processor import save_processor
from .callbacks import part_lrs_and_memory
from .loss import IGNORE, loss_at_positions, positions_to_keep, supervised_rows
from .optim import param_groups


class ManipTrainer(Trainer):
    def __init__(self, *args, recipe, processor, base_folder=None, **kwargs):
        self.recipe = recipe
        self.processor = processor
        self.base_folder = base_folder
        super().__init__(*args, **kwargs)
        # compute_loss divides by the token count of the whole accumulated batch (num_items_in_batch).
        self.loss_is_scaled_for_ga = True
        self._tokens = 0
        self._tokens_since = time.time()

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
                                       self.args.world_size)
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

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            model = model or self.model
            opt_cls, opt_kwargs = Trainer.get_optimizer_cls_and_kwargs(self.args, model)
            opt_kwargs.pop("lr", None)  # each group carries its own
            self.optimizer = opt_cls(param_groups(model, self.recipe), **opt_kwargs)
            if "bitsandbytes" in str(opt_cls) and opt_kwargs.get("optim_bits") == 8:
                keep_embeddings_32bit(model)
        return self.optimizer

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

    def log(self, logs: dict, start_time: float | None = None) -> None:
        if self.optimizer is not None and "loss" in logs:
            logs.update(part_lrs_and_memory(self.optimizer))
            now = time.time()
            logs["tokens_per_s"] = round(self._tokens / max(now - self._tokens_since, 1e-9), 1)
            self._tokens, self._tokens_since = 0, now
        super().log(logs, start_time)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        super()._save(output_dir, state_dict)
        if self.args.should_save:
            out = output_dir or self.args.output_dir
            save_extras(self.model, out, state_dict)
            # The base's own processor files, not the kit's image-only loader's: an adapter, checkpoint or trained
            # model folder loads with AutoProcessor like the base (the Trainer is given no processing_class, so it
            # writes none of its own).
            save_processor(self.processor, out, source=self.base_folder)

    def save_final(self, output_dir: str) -> None:
        """The run's result. A full model whose trained weights were kept in fp32 (model/adapters.py: fp32 master
        weights) is written in the dtype it was loaded in, so the folder matches the base tensor for tensor;
        checkpoints keep fp32 so a resume continues exactly."""
        from peft import PeftModel

        from ..model.load import compute_dtype

        load_dtype = compute_dtype(self.recipe.model.dtype)
        if isinstance(self.model, PeftModel) or self.is_deepspeed_enabled or load_dtype == torch.float32:
            self.save_model(output_dir)
        else:
            state = {k: (v.to(load_dtype) if v.is_floating_point() and v.dtype == torch.float32 else v)
                     for k, v in self.model.state_dict().items()}
            self._save(output_dir, state_dict=state)
        if self.args.should_save:
            # The final save writes in place: only this marker says it completed (merge checks it).
            from ..runinfo import finish_run

            finish_run(output_dir, self.state.global_step)

    def _save_checkpoint(self, model, trial):
        save_marked_checkpoint(self, super()._save_checkpoint, model, trial)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_extras(model or self.model, resume_from_checkpoint)  # PEFT's resume restores the adapter only

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


def save_marked_checkpoint(trainer, save, model, trial) -> None:
    """`save` (a Trainer's own _save_checkpoint), with the new checkpoint marked complete before older ones are
    rotated away: the Trainer rotates inside _save_checkpoint, before on_save, so a crash in between would leave
    nothing marked to resume from. Shared by the SFT and the GRPO trainer."""
    from transformers.trainer import rotate_checkpoints

    from .run_folder import mark_complete

    args = trainer.args
    limit, args.save_total_limit = args.save_total_limit, None
    try:
        save(model, trial)
    finally:
        args.save_total_limit = limit
    if args.should_save:
        mark_complete(args.output_dir, trainer.state.global_step)
        rotate_checkpoints(output_dir=args.output_dir, save_total_limit=limit,
                           best_model_checkpoint=trainer.state.best_model_checkpoint, use_mtime=True)
