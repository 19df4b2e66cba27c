"""`objective: grpo`: reinforcement fine-tuning with the manipulation metrics as rewards, through TRL's GRPOTrainer.

Same run as SFT up to the trainer (workflow.py): output-folder checks and lock, processor, data registry and checks,
model loading and quantisation, per-part trainable choice (`prepare_trainable`), per-part learning rates. Then each
training record becomes a prompt (its conversation up to the last answer, in the message form the checkpoint's chat
template wants, from data/encode.py) with its ground truth and task kind; TRL samples `num_generations` answers per
prompt, scores them with the rewards of that kind (train/rewards.py) and takes the clipped policy-gradient step.

Where GRPO starts (README, "Reinforcement fine-tuning"):
- `model.path` a merged SFT checkpoint: a fresh LoRA (recipe `lora`, `parts`) is trained on it; the reference for
  the KL term is that checkpoint. The result is an adapter on the merged checkpoint.
- `model.path` the base and `model.adapter` the SFT adapter: the adapter is loaded with PEFT and trained further,
  with its own LoRA settings and fully trained parts; TRL keeps a frozen copy of it as the reference. The result is
  an adapter on the base, a drop-in replacement for the SFT one (merge, eval, predict take it unchanged). Chosen
  over merging in memory and adding a fresh LoRA, whose result would need the unsaved merged model as its base.

Outputs are those of an SFT run: the adapter (or full model), extra_trainables.safetensors, the base's processor
files, recipe.yaml, train_log.jsonl, loss.png plus reward.png, checkpoints with a completion marker.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from pathlib import Path

import torch

from ..errors import UserError

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

    def __init__(self, manip_dataset, processor, system_prompt: str | None, kinds: set[str]):
        from ..data.encode import for_template, with_system

        samples = manip_dataset.samples
        raws = _raw_records(samples)
        self.items, self.skipped = [], Counter()
        for s, raw in zip(samples, raws):
            msgs = with_system(s.messages, system_prompt)
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
                mask = str(Path(raw[1]) / raw[0]["mask"])
            kind = classify(s, gt, mask is not None)
            if kind not in kinds:
                self.skipped[f"kind {kind} has no reward in grpo.rewards"] += 1
                continue
            self.items.append({"prompt": json.dumps(for_template(processor, msgs[:-1])),
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
    from PIL import Image

    def load(paths):
        out = []
        for path in paths:
            with Image.open(path) as im:
                out.append(im.convert("RGB"))
        return out

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


# ------------------------------------------------------------------------------------------------------- model


def build_policy(recipe):
    """The model to train: the SFT path's loading and trainable parts, or the SFT adapter trained further."""
    from ..model.adapters import fp32_master_weights, load_extras, part_modes
    from ..model.load import load_model
    from ..model.parts import part_of
    from .build import build_model

    if not recipe.model.adapter:
        model = build_model(recipe)
    else:
        from peft import PeftModel

        model = load_model(recipe.model.path, recipe.model.dtype, recipe.model.attn_implementation,
                           recipe.quantization if recipe.method == "qlora" else None)
        try:
            model = PeftModel.from_pretrained(model, recipe.model.adapter, is_trainable=True)
        except (RuntimeError, ValueError) as e:
            raise UserError(f"model.adapter {recipe.model.adapter} does not fit model.path {recipe.model.path}: "
                            f"{str(e).splitlines()[0]}") from None
        load_extras(model, recipe.model.adapter)
        modes = part_modes(recipe)
        for name, p in model.named_parameters():
            if "lora_" in name:
                continue  # the adapter's own LoRA weights train, whatever parts says
            p.requires_grad_(modes[part_of(name)] == "full" and "original_module" not in name
                             and ("modules_to_save" in name or "image_newline" in name))
        trained = {part_of(n) for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n}
        missing = [part for part, mode in modes.items() if mode == "full" and part not in trained]
        if missing:
            raise UserError(f"parts.{missing[0]}.train: full, but model.adapter {recipe.model.adapter} does not "
                            f"carry {missing[0]} (it was frozen in SFT); set it to frozen")
        log.info("continuing SFT adapter %s (its LoRA settings are kept; recipe lora.* is not used)",
                 recipe.model.adapter)
        if not recipe.distributed.deepspeed:
            fp32_master_weights(model)
    # Generation during rollouts needs the KV cache (the SFT path turns it off); checkpointing cannot use it.
    model.config.use_cache = not recipe.train.gradient_checkpointing
    return model


# ----------------------------------------------------------------------------------------------------- trainer


def grpo_arguments(recipe):
    """GRPOConfig = the SFT TrainingArguments (workflow.training_arguments) + the recipe's grpo block."""
    import dataclasses

    from transformers import TrainingArguments
    from trl import GRPOConfig

    from .build import training_arguments

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


def _trainer_class():
    from peft import PeftModel
    from transformers.trainer import TRAINING_ARGS_NAME
    from trl import GRPOTrainer

    from ..model.adapters import load_extras, save_extras
    from ..data.processor import save_processor
    from .callbacks import part_lrs_and_memory
    from .optim import param_groups
    from .trainer import keep_embeddings_32bit

    class ManipGRPOTrainer(GRPOTrainer):
        """GRPOTrainer with what the kit's SFT trainer adds: per-part learning rates, saving the base's processor
        files and extra_trainables.safetensors, checkpoint completion markers; plus the mean reward per task kind."""

        def __init__(self, *args, recipe, processor, base_folder=None, **kwargs):
            self.recipe, self.processor, self.base_folder = recipe, processor, base_folder
            super().__init__(*args, **kwargs)

        def create_optimizer(self, model=None):
            if self.optimizer is None:
                model = model or self.model
                opt_cls, opt_kwargs = GRPOTrainer.get_optimizer_cls_and_kwargs(self.args, model)
                opt_kwargs.pop("lr", None)  # each group carries its part's rate
                self.optimizer = opt_cls(param_groups(model, self.recipe), **opt_kwargs)
                if "bitsandbytes" in str(opt_cls) and opt_kwargs.get("optim_bits") == 8:
                    keep_embeddings_32bit(model)
            return self.optimizer

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

        def log(self, logs: dict, start_time=None) -> None:
            if self.optimizer is not None and "loss" in logs:
                logs.update(part_lrs_and_memory(self.optimizer))
            super().log(logs, start_time)

        def _save(self, output_dir=None, state_dict=None):
            out = output_dir or self.args.output_dir
            if isinstance(self.model, PeftModel) and len(self.model.peft_config) > 1:
                # TRL's frozen "ref" copy of a continued adapter is the run's starting point, not its result.
                if self.args.should_save:
                    os.makedirs(out, exist_ok=True)
                    self.model.save_pretrained(out, selected_adapters=["default"])
                    torch.save(self.args, os.path.join(out, TRAINING_ARGS_NAME))
            else:
                # The Trainer would write the kit's image-only processor; the base's own files are copied below.
                proc, self.processing_class = self.processing_class, None
                try:
                    super()._save(out, state_dict)
                finally:
                    self.processing_class = proc
            if self.args.should_save:
                save_extras(self.model, out, state_dict)
                save_processor(self.processor, out, source=self.base_folder)

        def save_final(self, output_dir: str) -> None:
            self.save_model(output_dir)

        def _save_checkpoint(self, model, trial):
            from .trainer import save_marked_checkpoint

            save_marked_checkpoint(self, super()._save_checkpoint, model, trial)

        def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
            super()._load_from_checkpoint(resume_from_checkpoint, model)
            load_extras(model or self.model, resume_from_checkpoint)

    return ManipGRPOTrainer


def build_grpo_trainer(recipe, overwrite: bool = False, resume: bool = False):
    """Everything up to the first step, in the order of workflow.build_trainer."""
    from transformers import set_seed

    from ..data.dataset import build_datasets
    from ..fsutil import atomic_write_text
    from ..model.adapters import trainable_summary
    from ..hub import local_folder
    from ..data.processor import load_processor
    from ..recipe import dump_recipe
    from .build import prepare_demo_inputs
    from .callbacks import JsonlLogCallback
    from .preflight import preflight
    from .rewards import make_reward_funcs
    from .run_folder import prepare_output_dir

    out = Path(recipe.train.output_dir)
    preflight(recipe)
    adapter = recipe.model.adapter
    if adapter and not (Path(adapter) / "adapter_config.json").is_file():
        raise UserError(f"model.adapter: {adapter} is not an adapter folder (no adapter_config.json); train one "
                        "with an SFT recipe (method lora or qlora) first")
    prepare_output_dir(recipe, overwrite, resume)
    prepare_demo_inputs(recipe)
    processor = load_processor(recipe.model.path)
    check_template(processor, recipe.model.path)
    train_records, val_records = build_datasets(recipe.data, processor, recipe.train.seed)
    kinds = {k for k, r in recipe.grpo.rewards.items() if r}
    train_ds = PromptDataset(train_records, processor, recipe.data.system_prompt, kinds)
    val_ds = PromptDataset(val_records, processor, recipe.data.system_prompt, kinds) if val_records else None
    for name, ds in (("train", train_ds), ("val", val_ds)):
        if ds is not None:
            log.info("grpo %s prompts: %d (%s); left out: %s", name, len(ds), dict(ds.kinds),
                     dict(ds.skipped) or "none")
    if not len(train_ds):
        raise UserError(f"data.train: no record of a kind grpo.rewards scores ({', '.join(sorted(kinds))}); "
                        f"left out: {dict(train_ds.skipped)}")
    if val_ds is not None and not len(val_ds):
        val_ds = None
    args = grpo_arguments(recipe)
    log.info("processes: %d", args.world_size)
    set_seed(recipe.train.seed)
    model = build_policy(recipe)
    if args.should_save:
        atomic_write_text(out / "recipe.yaml", dump_recipe(recipe))
    log.info("trainable parameters per part: %s", json.dumps(trainable_summary(model)))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    trainer = _trainer_class()(
        model=model, reward_funcs=make_reward_funcs(recipe.grpo.rewards, recipe.grpo.distance_scale), args=args,
        train_dataset=train_ds.to_dataset(),
        eval_dataset=val_ds.to_dataset() if val_ds is not None else None, processing_class=processor, recipe=recipe,
        processor=processor, base_folder=local_folder(recipe.model.path),
        callbacks=[JsonlLogCallback(out / "train_log.jsonl")])
    # TRL adds a frozen "ref" adapter (PEFT marks what it likes trainable) and casts trained weights of a quantised
    # model to bf16; the recipe's choice of trained parts and the fp32 master weights are restored.
    for n, p in trainer.model.named_parameters():
        p.requires_grad_(n in trainable)
    if not recipe.distributed.deepspeed:
        from ..model.adapters import fp32_master_weights

        fp32_master_weights(trainer.model)
    return trainer


def run_grpo(recipe, overwrite: bool = False, resume: bool = False) -> Path:
    """`lora-manip train` with objective: grpo. The validation prompts are scored (mean reward per reward and per
    kind, sampled as in training) before the first step and after the last; both land in train_log.jsonl and in
    grpo_eval.json."""
    from ..fsutil import atomic_write_text, disk_errors, normal_mode
    from ..runinfo import finish_run
    from .callbacks import plot_loss, plot_reward
    from .run_folder import latest_checkpoint, run_lock

    out = Path(recipe.train.output_dir)
    with run_lock(recipe), disk_errors(out):
        trainer = build_grpo_trainer(recipe, overwrite, resume)
        scores = {}
        if trainer.eval_dataset is not None and recipe.grpo.eval_at_start and not resume:
            scores["start"] = trainer.evaluate()
        trainer.train(resume_from_checkpoint=latest_checkpoint(out) if resume else None)
        if trainer.eval_dataset is not None:
            scores["end"] = trainer.evaluate()
        trainer.save_final(str(out))
        if trainer.args.should_save:
            if scores:
                atomic_write_text(out / "grpo_eval.json", json.dumps(scores, indent=1) + "\n")
            plot_loss(out / "train_log.jsonl", out / "loss.png")
            plot_reward(out / "train_log.jsonl", out / "reward.png")
            for f in out.iterdir():  # some writers (safetensors) leave 0600; results get the umask's mode
                if f.is_file():
                    normal_mode(f, folder=False)
            finish_run(out, trainer.state.global_step)  # last: it says the run finished
    return out
