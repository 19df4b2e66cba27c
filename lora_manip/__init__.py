"""lora-manip: fine-tune LLaVA-OneVision for robot-manipulation VQA (full, LoRA, QLoRA), merge, evaluate."""

__version__ = "0.1.0"
