"""The parts of `lora-manip merge` (lora_manip/merge.py is the entry point): plan.py matches adapter tensors to base
tensors and checks them, fold.py computes each merged tensor, quant.py reproduces a QLoRA base for
`--base-as-trained`, verify.py runs the self-check."""
