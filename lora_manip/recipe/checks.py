"""The recipe's cross-checks: settings that are valid one by one but not together. Each returns every problem it
finds as a line that starts with the key path and says the fix, so one failed load lists them all. `r` is the
schema's Recipe, passed in by its validator (importing schema.py here would make a circle)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .names import check_metric_name, check_reward_table

_PARTS = ("language_model", "projector", "vision_tower")


def cross_check(r) -> list[str]:
    return (_unread(r) + _parts(r) + _deepspeed(r) + _grpo(r) + _train_eval(r) + _processes(r)
            + _batching(r) + _val_trained_on(r))


def unread_settings(r) -> dict[str, str]:
    """Key path -> why this recipe never reads it (and the fix): blocks its method does not use, settings of one
    objective under the other, settings that only matter with another one switched on. cross_check refuses those
    the recipe spells out (`model_fields_set`: a default is no setting); dump_recipe leaves them all out of the run
    folder's copy, so that copy loads again."""
    t, out = r.train, {}
    if r.method != "qlora":
        out["quantization"] = (f"only read with method: qlora (method is {r.method}); remove the block or set "
                               "method: qlora")
    if r.method == "full":
        out["lora"] = ("only read with method: lora or qlora (method is full, which trains no adapter); remove the "
                       "block or set method: lora")
    if r.method != "full" and r.model.adapter:  # continue_adapter (train/build.py) keeps the adapter's own settings
        out["lora"] = ("not read with model.adapter (the adapter's adapter_config.json sets its rank, alpha and "
                       "target modules); remove the block")
    if r.objective == "grpo":
        # TRL's GRPOTrainer batches prompts itself (one group of num_generations completions per prompt, its own
        # sampler) and has its own loss (grpo.loss_type); these only shape the SFT trainer's batches and loss.
        why = "not read by objective grpo (TRL batches prompts in groups of grpo.num_generations)"
        out["data.packing"] = f"{why}; remove it"
        out["data.group_by_length"] = f"{why}; remove it"
        out["train.max_tokens_per_batch"] = f"{why}; remove it and size batches with train.per_device_batch_size"
        out["train.loss_reduction"] = "not read by objective grpo (its loss is grpo.loss_type); remove it"
        for key in ("eval_limit", "eval_max_new_tokens"):
            out[f"train.{key}"] = ("not read by objective grpo (it scores its validation prompts with its rewards, "
                                   "grpo.eval_at_start); remove it")
    else:
        if not t.eval_steps:
            for key in ("eval_limit", "eval_max_new_tokens"):
                out[f"train.{key}"] = ("only read with train.eval_steps (no eval during training); remove it or "
                                       "set train.eval_steps")
        if t.max_tokens_per_batch:
            out["data.group_by_length"] = ("not read with train.max_tokens_per_batch (token-budget batches are "
                                           "always of similar length); remove it")
    if t.optimizer != "mezo":
        out["train.mezo_eps"] = f"only read with train.optimizer: mezo (optimizer is {t.optimizer}); remove it"
    return out


def _spelt_out(r, path: str) -> bool:
    node, keys = r, path.split(".")
    for key in keys[:-1]:
        node = getattr(node, key)
    return keys[-1] in node.model_fields_set


def _unread(r) -> list[str]:
    return [f"{path}: {why}" for path, why in unread_settings(r).items() if _spelt_out(r, path)]


def dump_exclude(r) -> dict:
    """unread_settings as pydantic's `exclude` argument ({"quantization": True, "data": {"packing": True}})."""
    out: dict = {}
    for path in unread_settings(r):
        *parents, last = path.split(".")
        node = out
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = True
    return out


def _parts(r) -> list[str]:
    errors = []
    modes = {name: getattr(r.parts, name).train for name in _PARTS}
    if r.method == "full":
        errors += [f"parts.{n}.train: 'lora' needs method: lora or qlora (method is full)"
                   for n, m in modes.items() if m == "lora"]
    elif modes["language_model"] == "full":
        errors.append(f"parts.language_model.train: 'full' needs method: full (method is {r.method}); "
                      "use 'lora' or 'frozen'")
    if modes["projector"] == "lora":
        errors.append("parts.projector.train: must be 'full' or 'frozen' (a 2-layer MLP gains nothing from LoRA)")
    if all(m == "frozen" for m in modes.values()):
        errors.append("parts: every part is frozen, nothing would train")
    if r.method != "full" and "lora" not in modes.values():
        errors.append(f"method: {r.method} but no part has train: lora (no adapter would be trained)")
    return errors


def _deepspeed(r) -> list[str]:
    path = r.distributed.deepspeed
    if path is None:
        return []
    if r.method == "qlora":
        return ["distributed.deepspeed: QLoRA's 4-bit weights cannot be partitioned by DeepSpeed; remove it or use "
                "method: lora"] + _deepspeed_file(path)
    return _deepspeed_file(path)


def _deepspeed_file(path: str) -> list[str]:
    p = Path(path)
    if not p.is_file():
        return [f"distributed.deepspeed: {path} not found (relative paths: from the working directory or the "
                "recipe's folder)"]
    try:
        cfg = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        return [f"distributed.deepspeed: {path} line {e.lineno}: not valid JSON ({e.msg})"]
    except UnicodeDecodeError as e:
        return [f"distributed.deepspeed: {path} is not UTF-8 text ({e.reason} at byte {e.start})"]
    if not isinstance(cfg, dict):
        return [f"distributed.deepspeed: {path} must hold a JSON object ({{...}}), not a {type(cfg).__name__}"]
    # An optimizer/scheduler block makes DeepSpeed build its own, silently replacing the per-part learning rates.
    return [f"distributed.deepspeed: {path} has a `{k}` block; remove it (the kit's optimizer carries one learning "
            "rate per model part, and the recipe's train section sets the schedule)"
            for k in ("optimizer", "scheduler") if k in cfg]


def _grpo(r) -> list[str]:
    if r.objective == "sft":
        errors = ["grpo: set, but objective is sft; add `objective: grpo` or remove the grpo block"] if r.grpo else []
        if r.model.adapter:
            errors.append("model.adapter: only used with objective: grpo (for SFT, merge the adapter and start "
                          "from the merged folder)")
        return errors
    g, t = r.grpo, r.train
    errors = check_reward_table(g.rewards)
    if not any(g.rewards.values()):
        errors.append("grpo.rewards: no reward for any task kind; nothing would be rewarded")
    batch = t.per_device_batch_size * t.gradient_accumulation_steps * r.distributed.nproc_per_node \
        * r.distributed.nnodes
    if batch % g.num_generations:
        errors.append(f"grpo.num_generations: {g.num_generations} must divide the batch of completions "
                      f"(per_device_batch_size x gradient_accumulation_steps x processes = {batch})")
    if t.optimizer == "mezo":
        errors.append("train.optimizer: mezo does not apply to objective: grpo (the policy gradient needs backward)")
    if r.method == "full" and r.model.adapter:
        errors.append("model.adapter: needs method lora or qlora (method is full)")
    return errors


def _train_eval(r) -> list[str]:
    """train.eval_steps / train.best_metric."""
    t, errors = r.train, []
    has_val = bool(r.data.val) or any(d.val_fraction for d in r.data.train)
    if t.eval_steps and r.objective != "sft":
        errors.append(f"train.eval_steps: applies to objective sft; objective {r.objective} scores its "
                      "validation set with its rewards (grpo.eval_at_start)")
    elif t.eval_steps and not has_val:
        errors.append("train.eval_steps: needs validation data to generate on; add data.val entries or a "
                      "val_fraction to a data.train entry")
    if t.best_metric is not None:
        problem = check_metric_name(t.best_metric)
        if problem:
            errors.append(f"train.best_metric: {problem}")
        elif not t.eval_steps:
            errors.append("train.best_metric: needs train.eval_steps (the metric comes from the evals during "
                          "training)")
    return errors


def _processes(r) -> list[str]:
    d, errors = r.distributed, []
    if r.train.optimizer == "mezo" and (d.deepspeed or d.nproc_per_node * d.nnodes > 1):
        errors.append("train.optimizer: mezo runs in one process (its updates are not all-reduced); set "
                      "distributed.nproc_per_node: 1 and no deepspeed")
    if d.node_rank >= d.nnodes:
        errors.append(f"distributed.node_rank: {d.node_rank} but nnodes is {d.nnodes} (ranks 0..{d.nnodes - 1})")
    return errors


def _batching(r) -> list[str]:
    errors = []
    # Under grpo packing and token budgets are refused as unread (unread_settings); their pairing rules do not apply.
    packing = r.data.packing and r.objective == "sft"
    if packing and not r.train.max_tokens_per_batch:
        errors.append("data.packing: true needs train.max_tokens_per_batch (the length of a packed row)")
    if packing and r.train.loss_reduction == "sample":
        errors.append("data.packing with train.loss_reduction: sample is not supported; use token")
    if r.train.max_steps == 0:
        errors.append("train.max_steps: 0 would train nothing; use -1 (train.epochs decides) or a positive count")
    if r.train.precision == "fp16" and r.model.dtype == "bfloat16":
        errors.append("train.precision: fp16 with model.dtype bfloat16 mixes formats; use bf16 or float16")
    return errors


def _file_key(path: str) -> tuple:
    """One file however it is reached (relative, through a link, under two registry names)."""
    try:
        st = os.stat(path)
    except OSError:
        return ("path", os.path.realpath(path))
    return ("inode", st.st_dev, st.st_ino)


def _val_trained_on(r) -> list[str]:
    """A data.val file that data.train also reads: training on the records its validation scores would measure
    memory, not the task, with nothing to say so (directly, through `all`, or one file under two names). Refused:
    val_fraction is the way to validate on part of a training file."""
    trained = {}
    for d in r.data.train:
        trained.setdefault(_file_key(d.annotation_path), d)
    errors = []
    for j, v in enumerate(r.data.val):
        d = trained.get(_file_key(v.annotation_path))
        if d is None:
            continue
        what = (f"dataset {v.name!r} is in data.train too" if v.name and v.name == d.name else
                f"{repr(v.name) + ' reads ' if v.name else ''}{v.annotation_path}, which data.train also reads"
                + (f" (as {d.name!r})" if d.name else ""))
        errors.append(f"data.val.{j}: {what}: its validation scores would be of records the model trains on; "
                      "remove it from data.val or data.train, or validate on part of it with val_fraction on its "
                      "data.train entry")
    return errors
