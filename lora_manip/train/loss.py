"""Causal-LM loss that computes logits only where a label exists.

An anyres LLaVA-OneVision sample is mostly image and prompt tokens (a 640x480 frame alone is ~2,900 tokens) and
carries 20-60 supervised answer tokens. The stock forward with `labels` materialises [batch, seq, 151,936] float
logits (and their gradient) for every position: ~4 GB per 7k-token sequence in fp32. Passing the positions that
precede a label as `logits_to_keep` (a transformers forward argument) makes the model project only those hidden
states through lm_head; the loss below then equals the stock one (same shift, same reduction).

`per_sample` weighs samples instead of tokens: the stock (token) mean gives a 40-token box answer 20 times the
weight of a one-letter choice answer (the letter and its end-of-turn token), so in a grounding-heavy mixture the
short understanding answers barely move the model. transformers has no such reduction, hence this one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


def positions_to_keep(labels: torch.Tensor) -> torch.Tensor:
    """Sequence positions t whose next label labels[:, t+1] is supervised in any row of the batch (1-D, sorted)."""
    nxt = labels[:, 1:] != IGNORE
    keep = nxt.any(dim=0).nonzero().flatten()
    if keep.numel() == 0:  # a batch without labels still needs a graph for DeepSpeed / DDP: keep one position
        keep = torch.zeros(1, dtype=torch.long, device=labels.device)
    return keep


def supervised_rows(labels: torch.Tensor) -> torch.Tensor:
    """[B] bool: which samples have at least one supervised (shifted) label."""
    return (labels[:, 1:] != IGNORE).any(dim=1)


def loss_at_positions(logits: torch.Tensor, labels: torch.Tensor, keep: torch.Tensor,
                      num_items_in_batch: torch.Tensor | int | None = None, per_sample: bool = False
                      ) -> torch.Tensor:
    """Cross-entropy of `logits` [B, len(keep), V] (the logits at positions `keep`) against labels[:, keep + 1].

    Reduction as transformers' ForCausalLMLoss: sum / num_items_in_batch when given (gradient accumulation across
    batches counts tokens, not batches), else the mean over supervised tokens. Upcast to fp32 like it does.
    per_sample: each sample's mean token loss is summed instead, and num_items_in_batch counts samples."""
    target = labels[:, keep + 1].to(logits.device)
    token_loss = F.cross_entropy(logits.float().flatten(0, 1), target.flatten(), ignore_index=IGNORE,
                                 reduction="none").view(target.shape)
    counts = (target != IGNORE).sum(dim=1)
    if per_sample:
        loss, items = (token_loss.sum(dim=1) / counts.clamp(min=1)).sum(), (counts > 0).sum()
    else:
        loss, items = token_loss.sum(), counts.sum()
    if num_items_in_batch is None:
        return loss / items.clamp(min=1)
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch
