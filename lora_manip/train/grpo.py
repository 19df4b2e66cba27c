"""`objective: grpo`: reinforcement fine-tuning with the manipulation metrics as rewards, through TRL's GRPOTrainer.

The run is SFT's (workflow.build_trainer and workflow.end_run): output-folder checks and lock, the processor with
the image-tile cap, data registry and checks, model loading and quantisation, per-part trainable choice, the image
grid; the trainer additions are SFT's too (trainer.ManipTrainerMixin: per-part learning rates, log fields, saves in
the base's layout, marked checkpoints). What GRPO brings is the `GRPO` objective: its arguments (`grpo_arguments`),
its dataset wrapper (`grpo_inputs`) and its trainer class (`ManipGRPOTrainer`). Each training record becomes a
prompt (its conversation up to the last answer, in the message form the checkpoint's chat template wants, from
data/encode.py) with its ground truth and task kind; TRL samples `num_generations` answers per prompt, scores them
with the rewards of that kind (train/rewards.py) and takes the clipped policy-gradient step. The SFT trainer's
batching and loss settings (data.packing, data.group_by_length, train.max_tokens_per_batch, train.loss_reduction)
are refused in a grpo recipe (recipe/checks.py): TRL batches prompts in groups and has its own loss.

Where GRPO starts (docs/grpo.md):
- `model.path` a merged SFT checkpoint: a fresh LoRA (recipe `lora`, `parts`) is trained on it; the reference for
  the KL term is that checkpoint. The result is an adapter on the merged checkpoint.
- `model.path` the base and `model.adapter` the SFT adapter: the adapter is loaded with PEFT and trained further,
  with its own LoRA settings and fully trained parts; TRL keeps a frozen copy of it as the reference. The result is
  an adapter on the base, a drop-in replacement for the SFT one (merge, eval, predict take it unchanged). Chosen
  over merging in memory and adding a fresh LoRA, whose result would need the unsaved merged model as its base.

Outputs are those of an SFT run: the adapter (image_newline inside) or full model, the base's processor
files, recipe.yaml, train_log.jsonl, loss.png plus reward.png, checkpoints with a completion marker.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter

import torch
from trl import GRPOTrainer

from ..data.processor import apply_image_grid
from ..errors import UserError
from ..model.adapters import fp32_master_weights
from .build import Inputs, Objective, training_arguments
from .callbacks import plot_loss, plot_reward
from .rewards import make_reward_funcs
from .trainer import ManipTrainerMixin

log = logging.getLogger(__name__)


# -------------------------------------------------------------------------------------------------------- data


def _raw_records(samples):
    """The raw annotation record behind each sample (for fields the Sample does not keep, such as `mask`), or
    None per sample where the samples are not the lazy per-file views."""
    parts = getattr(samples, "parts", None)
    if parts is None:
        return [None] * len(samples)
    out = []
    for part in parts:
        index, root = getattr(part, "index", None), getattr(part, "data_root", ".")
        for pos in getattr(part, "positions", []):
            raw = index.read(int(pos)) if index is not None else None
            out.append((raw, root) if isinstance(raw, dict) else None)
    return out if len(out) == len(samples) else [None] * len(samples)


def classify(sample, gt: str, has_mask: bool) -> str:
    """The task kind, decided as the scorer decides it (a guessed kind the ground truth contradicts falls back to
    the ground truth's format)."""
    from ..answers.kinds import classify_task
    from ..answers.parse import parse_answer

    tk = classify_task(sample.extra.get("task"), gt, has_mask=has_mask)
    if tk.source == "guess" and tk.kind != "pointing" and not parse_answer(gt, tk.kind).ok:
        return classify_task(None, gt).kind
    return tk.kind


class PromptDataset:
    """The records GRPO trains on, one per record whose task kind has rewards (the others are counted in `skipped`
    and left out), as a `datasets.Dataset` (`to_dataset`, what TRL accepts) with the columns {"prompt", "images",
    "gt", "kind", "mask", "id"}: prompt and images as TRL's VLM path wants them, the rest passed to the rewards.
    Images are decoded on access, never held."""

    def __init__(self, manip_dataset, kinds: set[str]):
        from ..data.encode import for_template, with_system
        from ..data.files import path_under

        chat, samples = manip_dataset.chat, manip_dataset.samples
        raws = _raw_records(samples)
        self.items, self.skipped = [], Counter()
        for s, raw in zip(samples, raws):
            msgs = with_system(s.messages, chat.system_prompt)
            if msgs[-1]["role"] != "assistant":
                self.skipped["no answer to score"] += 1
                continue
            if len(s.images) > 1:
                # TRL slices pixel values per prompt assuming anyres single images; LLaVA-OV treats multi-image
                # prompts differently (base tile only), which TRL's log-probability pass does not know.
                self.skipped["more than one image"] += 1
                continue
            gt = msgs[-1]["content"]
            mask = None
            if raw is not None and isinstance(raw[0].get("mask"), str) and raw[0]["mask"]:
                mask = path_under(raw[1], raw[0]["mask"])  # confined to the data root, as image paths are
                if mask is None:
                    raise UserError(f"{s.source} id={s.id!r} field `mask`: path {raw[0]['mask']!r} leads out of "
                                    f"the data root {raw[1]}")
            kind = classify(s, gt, mask is not None)
            if kind not in kinds:
                self.skipped[f"kind {kind} has no reward in grpo.rewards"] += 1
                continue
            self.items.append({"prompt": json.dumps(for_template(chat.processor, msgs[:-1])),
                               "image_paths": list(s.images), "gt": gt, "kind": kind, "mask": mask, "id": s.id})
        self.kinds = Counter(it["kind"] for it in self.items)

    def __len__(self) -> int:
        return len(self.items)

    def to_dataset(self):
        from datasets import Dataset as HFDataset

        columns = {k: [it[k] for it in self.items] for k in ("prompt", "image_paths", "gt", "kind", "mask", "id")}
        return HFDataset.from_dict(columns).with_transform(_decode)


def _decode(batch: dict) -> dict:
    """Rows as TRL reads them: the prompt's messages, the images as PIL (decoded here, on access)."""
    from ..data.images import load_image

    def load(paths):
        return [load_image(path) for path in paths]

    return {"prompt": [json.loads(p) for p in batch["prompt"]], "images": [load(p) for p in batch["image_paths"]],
            "gt": batch["gt"], "kind": batch["kind"], "mask": batch["mask"], "id": batch["id"]}


def check_template(processor, source: str) -> None:
    """TRL renders prompts itself, with typed content parts (its VLM path turns every message into a list of
    parts); a string-content ChatML template would render those as empty turns."""
    from ..data.encode import template_style

    if template_style(processor) != "list":
        raise UserError(f"model.path {source}: objective grpo needs a chat template that takes typed content parts "
                        "(the llava-hf one); this checkpoint's renders strings only (lmms-lab ChatML). Convert it "
                        "with `lora-manip convert` or use a llava-hf checkpoint")


def grpo_inputs(recipe, processor, train_records, val_records) -> Inputs:
    """GRPO's dataset wrapper: the checked records (data/dataset.py) as prompts of the kinds grpo.rewards scores."""
    kinds = {k for k, r in recipe.grpo.rewards.items() if r}
    train_ds = PromptDataset(train_records, kinds)  # each dataset carries its Chat (processor, system prompt)
    val_ds = PromptDataset(val_records, kinds) if val_records else None
    for name, ds in (("train", train_ds), ("val", val_ds)):
        if ds is not None:
            log.info("grpo %s prompts: %d (%s); left out: %s", name, len(ds), dict(ds.kinds),
                     dict(ds.skipped) or "none")
    if not len(train_ds):
        raise UserError(f"data.train: no record of a kind grpo.rewards scores ({', '.join(sorted(kinds))}); "
                        f"left out: {dict(train_ds.skipped)}")
    return Inputs(train_ds.to_dataset(), val_ds.to_dataset() if val_ds is not None and len(val_ds) else None)


# ----------------------------------------------------------------------------------------------------- trainer


def grpo_arguments(recipe):
    """GRPOConfig = the SFT TrainingArguments (build.training_arguments) + the recipe's grpo block."""
    import dataclasses

    from transformers import TrainingArguments
    from trl import GRPOConfig

    base = training_arguments(recipe)
    kwargs = {f.name: getattr(base, f.name) for f in dataclasses.fields(TrainingArguments)
              if f.init and not f.name.startswith("_")}
    g = recipe.grpo
    # TRL checks the eval batch against the group size; round up to whole groups.
    eval_batch = -(-recipe.train.per_device_batch_size // g.num_generations) * g.num_generations
    kwargs.update(
        per_device_eval_batch_size=eval_batch, num_generations=g.num_generations,
        max_completion_length=g.max_completion_length, temperature=g.temperature, top_p=g.top_p, top_k=g.top_k,
        min_p=g.min_p, beta=g.beta,
        epsilon=g.epsilon, epsilon_high=g.epsilon_high, loss_type=g.loss_type, scale_rewards=g.scale_rewards,
        num_iterations=g.num_iterations, mask_truncated_completions=g.mask_truncated_completions,
        remove_unused_columns=False, disable_dropout=True, log_completions=False,
        # A fresh LoRA and a reference must give the same log-probabilities at step 0; dropout would not.
    )
    return GRPOConfig(**kwargs)


class ManipGRPOTrainer(ManipTrainerMixin, GRPOTrainer):
    """TRL's GRPOTrainer with the kit's additions (trainer.ManipTrainerMixin), the mean reward per task kind and
    the rollout speed in the log, and the run's end: validation scores before and after in grpo_eval.json, the
    mean reward plotted beside the loss."""

    plots = (("loss.png", plot_loss), ("reward.png", plot_reward))
    scores_file = "grpo_eval.json"

    def __init__(self, *, model, args, recipe, processor, **kwargs):
        # Generation during rollouts needs the KV cache (built without it for training); checkpointing cannot use it.
        model.config.use_cache = not recipe.train.gradient_checkpointing
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        super().__init__(model=model, args=args, recipe=recipe, processor=processor, processing_class=processor,
                         reward_funcs=make_reward_funcs(recipe.grpo.rewards, recipe.grpo.distance_scale), **kwargs)
        # TRL adds a frozen "ref" adapter (PEFT marks what it likes trainable) and casts trained weights of a
        # quantised model to bf16; the recipe's choice of trained parts and the fp32 master weights are restored.
        for n, p in self.model.named_parameters():
            p.requires_grad_(n in trainable)
        if not recipe.distributed.deepspeed:
            fp32_master_weights(self.model)
        if self.ref_model is not None:
            # A reference TRL loads from model.path (beta > 0 without PEFT) tiles as the processor does, like the
            # policy (data.max_image_tiles).
            apply_image_grid(getattr(self.ref_model, "module", self.ref_model), processor)

    def evaluates_at_start(self) -> bool:
        return self.recipe.grpo.eval_at_start

    def _get_per_token_logps_and_entropies(self, *args, batch_num_images=None, **kwargs):
        # The OneVision image processor reports images per prompt, which TRL does not forward (and need not:
        # every prompt here has at most one image, PromptDataset).
        return super()._get_per_token_logps_and_entropies(*args, **kwargs)

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        from accelerate.utils import gather_object

        per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        mode = "train" if self.model.training else "eval"
        kinds = gather_object([x["kind"] for x in inputs])
        total = (per_func * self.reward_weights.to(per_func.device).unsqueeze(0)).nansum(dim=1)
        for kind in sorted(set(kinds)):
            sel = torch.tensor([k == kind for k in kinds], device=per_func.device)
            self._metrics[mode][f"reward_by_kind/{kind}"].append(total[sel].mean().item())
        return per_func

    def _generate_single_turn(self, prompt_ids, *args, **kwargs):
        # Rollout speed is what GRPO spends most of its time on; TRL times it only for wandb/mlflow.
        start = time.perf_counter()
        completion_ids, logprobs = super()._generate_single_turn(prompt_ids, *args, **kwargs)
        mode = "train" if self.model.training else "eval"
        tokens = sum(len(c) for c in completion_ids)
        self._metrics[mode]["generation/tokens_per_s"].append(tokens / max(time.perf_counter() - start, 1e-9))
        return completion_ids, logprobs


def check_grpo(recipe, processor) -> None:
    check_template(processor, recipe.model.path)


GRPO = Objective(arguments=grpo_arguments, inputs=grpo_inputs, trainer=ManipGRPOTrainer, check=check_grpo)
