"""One comparison for packing, on any attention backend: each sample's logits alone vs the same sample's logits
inside a packed row, behind the samples packed before it. Whole-batch losses hide attention that crosses samples
(a loss tolerance of 0.18 let through a crossing that moved the loss by 0.006); per-sample logits do not: a sample
that sees its predecessors gets different logits at every position.

The CPU suite runs it with sdpa against deliberately broken rows (tests/data/test_batching.py), the GPU check with
flash-attention's variable-length kernels (tests/gpu/test_gpu.py), so the tolerance that passes the real packing is
shown, on the same backend and dtype, to fail a row whose attention crosses samples."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PackingCheck:
    diffs: list[float]  # per sample: max |logit alone - logit packed| / max |logit alone|
    tolerance: float

    @property
    def ok(self) -> bool:
        return max(self.diffs) <= self.tolerance

    def describe(self) -> str:
        return (f"per-sample max relative logit diff {max(self.diffs):.2e} (samples: "
                f"{', '.join(f'{d:.1e}' for d in self.diffs)}), tolerance {self.tolerance:.0e}")


def break_row(batch: dict, how: str) -> dict:
    """A packed batch made wrong on purpose. "positions": positions run on across samples instead of restarting,
    so no backend can see the sample boundaries; "mask": the positions restart but an all-ones attention mask is
    passed, which sdpa / eager turn into one causal mask over the whole row."""
    out = dict(batch)
    if how == "positions":
        out["position_ids"] = torch.arange(batch["input_ids"].shape[1]).unsqueeze(0)
    elif how == "mask":
        out["attention_mask"] = torch.ones_like(batch["input_ids"])
    else:
        raise ValueError(how)
    return out


@torch.no_grad()
def compare_packed(model, processor, items: list[dict], tolerance: float, broken: str | None = None,
                   device: str = "cpu", dtype: torch.dtype | None = None) -> PackingCheck:
    """Logits of every sample of `items` (ManipDataset items) alone vs inside one packed row (the kit's Collator),
    optionally with the row broken (`break_row`)."""
    from lora_manip.data.collate import Collator

    def logits(batch: dict) -> torch.Tensor:
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        batch.pop("labels", None)
        if dtype is not None and "pixel_values" in batch:
            batch["pixel_values"] = batch["pixel_values"].to(dtype)
        return model(**batch).logits[0].float()

    alone = [logits(Collator(processor)([item])) for item in items]
    row = Collator(processor, packing=True)(items)
    if broken:
        row = break_row(row, broken)
    packed = logits(row)
    diffs, start = [], 0
    for a in alone:
        p = packed[start:start + a.shape[0]]
        start += a.shape[0]
        diffs.append(float((a - p).abs().max() / a.abs().max().clamp_min(1e-6)))
    assert start == packed.shape[0], "the packed row is not the samples back to back"
    return PackingCheck(diffs, tolerance)


# Largest per-sample relative logit difference accepted, by compute dtype: fp32 agrees to ~5e-7, bf16 to ~5e-3 on the
# tiny model (sdpa and eager, CPU); attention that crosses samples moves the later samples' logits by ~0.8.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2}
