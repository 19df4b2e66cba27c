"""The arithmetic of a merge, one output tensor at a time, in fp32 row chunks (shards.row_producer).

For a base tensor W: LoRA W + s * B @ A (s = alpha / r, alpha / sqrt(r) with rsLoRA); `lora_bias`
bias + s * lora_B.bias; DoRA m / ||W + s B A|| * (W + s B A) with the norm over each output row (dim 1 of the
[out, in] weight), exactly as PEFT's DoraLinearLayer.get_weight_norm and merge. With `--base-as-trained`, W is
first replaced by the 4-bit weights the QLoRA training saw (quant.as_trained).
"""

from __future__ import annotations

import torch

from ..errors import UserError
from .quant import QuantSpec, as_trained
from .shards import row_producer
from .tensors import TensorRef, read_tensor


def merged_producer(name: str, ref: TensorRef, code: str, kinds: list[str], loras: list, scales: list[float],
                    quant: QuantSpec | None = None):
    """Bytes of W with its LoRA deltas folded in, computed in fp32 one row chunk at a time (the adapter's A and B
    for this tensor are read when its turn comes, not before). With `quant`, W as the 4-bit training saw it: that
    needs the whole tensor at once (double quantisation centres the block scales on their mean over the tensor), so
    it is computed on the first chunk and held until the last (at 7B the largest is 18944 x 3584: 270 MB in fp32)."""
    ops: list = []
    trained: list[torch.Tensor] = []

    def broken(what: str) -> UserError:
        return UserError(f"{what} has NaN/inf values: merging it into {name} (base {ref.file.name}: {ref.name}) "
                         "would break the model; nothing written")

    def load(r: TensorRef) -> torch.Tensor:
        t = read_tensor(r).float()
        # A sum is ~20x cheaper than isfinite() and non-finite whenever an element is (or, in theory, on overflow,
        # which the exact check then rules out). PEFT's safe_merge checks the merged weights instead; checking the
        # adapter's tensors covers the same failure (a diverged adapter) without a pass over every base weight.
        if not torch.isfinite(t.sum()) and not torch.isfinite(t).all():
            raise broken(f"{r.file}: tensor {r.name}")
        return t

    def fold(w: torch.Tensor, r0: int, r1: int) -> None:
        if quant is not None:
            if not trained:
                trained.append(as_trained(read_tensor(ref), quant).reshape(ref.shape[0], -1))
            w.copy_(trained[0][r0:r1])
        if not ops:
            for kind, lora, s in zip(kinds, loras, scales):
                if kind == "lora":
                    m = load(lora.magnitude).reshape(-1) if lora.magnitude is not None else None
                    ops.append((kind, load(lora.A), load(lora.B), m, s))
                else:
                    ops.append((kind, load(lora.bias).reshape(-1), None, None, s))
        for kind, A, B, m, s in ops:
            if kind == "lora_bias":
                w.view(-1).add_(A[r0:r1], alpha=s)
                continue
            w.addmm_(B[r0:r1], A, alpha=s)
            if m is not None:  # DoRA: rescale each output row to its learnt magnitude
                factor = m[r0:r1] / torch.linalg.vector_norm(w, dim=1)
                if not torch.isfinite(factor).all():
                    raise broken(f"the DoRA scale (magnitude / row norm) of rows {r0}..{r1}")
                w.mul_(factor.unsqueeze(1))
        if r1 == (ref.shape[0] if ref.shape else 1):
            ops.clear()  # done with this tensor: let its A/B (and dequantised weights) go
            trained.clear()

    return row_producer(ref, code, fold)
