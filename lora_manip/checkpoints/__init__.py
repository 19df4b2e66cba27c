"""Checkpoints after training: safetensors I/O and the two commands built on it.

tensors.py reads a checkpoint folder's shards and headers and one tensor at a time; shards.py writes bounded-size
shards from producers (copy, cast, fp32 row-chunk transforms). `lora-manip merge` is merge.py: plan.py matches
adapter tensors to base tensors and checks them, fold.py computes each merged tensor, quant.py reproduces a QLoRA
base for `--base-as-trained`, verify.py runs the self-check. `lora-manip convert` is convert.py (tensor names),
with next_config.py for the LLaVA-NeXT config and processor. Tensor names come from model/layouts.py.
"""
