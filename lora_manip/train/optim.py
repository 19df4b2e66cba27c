"""Optimizer parameter groups: one learning rate per model part, no weight decay on biases and norms.

The Trainer's own create_optimizer knows one learning rate; upstream LLaVA-NeXT trains the vision tower ~5x
slower than the rest, so groups are built here and the optimizer class still comes from the Trainer's registry
(adamw_torch, adamw_8bit, paged_adamw_8bit...). The LR scheduler scales every group from its own initial rate.
"""

from __future__ import annotations

import re

from ..model.layouts import PARTS, part_of

_NO_DECAY = re.compile(r"(bias|norm|image_newline|position_embedding)", re.IGNORECASE)


def param_groups(model, recipe) -> list[dict]:
    groups: dict[tuple[str, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        part = part_of(name)
        # ZeRO-3 partitions parameters to empty tensors at load time; ds_shape keeps the real shape.
        decay = not _NO_DECAY.search(name) and len(getattr(p, "ds_shape", p.shape)) >= 2
        key = (part, decay)
        if key not in groups:
            groups[key] = {"params": [], "lr": getattr(recipe.parts, part).lr,
                           "weight_decay": recipe.train.weight_decay if decay else 0.0,
                           "group_name": f"{part}{'' if decay else '/no_decay'}"}
        groups[key]["params"].append(p)
    order = {part: i for i, part in enumerate(PARTS)}
    return [groups[k] for k in sorted(groups, key=lambda k: (order[k[0]], not k[1]))]
