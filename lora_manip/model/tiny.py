"""A tiny randomly initialised LLaVA-OneVision (SigLIP + projector + Qwen2) with tokenizer, chat template and
processor, saved in the standard Hugging Face layout. Tests and the offline demo point recipes at it exactly as at
`llava-hf/llava-onevision-qwen2-7b-ov-hf`; nothing else in the kit knows it is tiny.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..fsutil import atomic_dir

# Qwen ChatML, as LLaVA-OneVision's qwen_1_5 conversation: a default system turn, <image> placeholders kept where
# the text puts them (string content) or emitted in order (list content). {% generation %} marks what an assistant
# mask would cover, for tools (TRL) that read it.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] }}{% endgeneration %}"
    "{% else %}{{ message['content'] }}{% endif %}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<image>\\n' }}"
    "{% elif message['role'] == 'assistant' %}{% generation %}{{ item['text'] }}{% endgeneration %}"
    "{% else %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]

TILE = 56  # px per anyres tile; 4x4 patches of 14 px -> 16 image tokens per tile
PATCH = 14

# Text the tiny BPE is trained on: the words and number shapes of manipulation VQA, so a sample is ~3x shorter
# than with raw bytes. Any text still encodes (byte-level fallback).
_CORPUS = """
You are a helpful assistant. The task is "put the red cube on the plate". What is the bounding box of the object to
be manipulated? Where will the object be at the end of the task? Which region will the gripper fingers touch?
Where is the gripper? What are the contact points? Predict the future trajectory of the gripper as 10 waypoints.
Answer as {"current_bbox": [[x1, y1], [x2, y2]]} {"final_bbox": [[0.125, 0.5]]} {"contact_bbox": [[0.9, 0.75]]}
{"gripper_bbox": [[0.333, 0.667]]} {"contact_point": [[0.25, 0.5], [0.75, 0.5]]} {"future_traj": [[0.1, 0.2]]}
with coordinates normalised to [0, 1]. Which object is closest to the gripper? Which object is on the left of the
plate? What colour is the object? A. red cube B. green ball C. blue cup D. yellow cube Answer with the option's
letter from the given choices directly. Is the red cube to the left of the blue ball? Yes No yes no
red green blue yellow purple white grey cube ball cup block bowl plate table gripper robot arm pick place move push
open close grasp lift put on in into left right above below near far first then finally step plan
0 1 2 3 4 5 6 7 8 9 0.0 0.1 0.2 0.3 0.4 0.5 0.6 0.7 0.8 0.9 1.0 ], [ ]] [[ , . ? : " { }
"""


def build_tokenizer(vocab_size: int = 512):
    """A byte-level BPE with Qwen's special tokens at the end of the vocabulary, in Qwen's order."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    bpe.train_from_iterator([line for line in _CORPUS.splitlines() if line] * 20, trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    # eos/pad passed to the constructor would be added first and shift the ids; add the specials, then name them.
    tok = Qwen2Tokenizer(vocab=model["vocab"], merges=merges, unk_token=None, bos_token=None, eos_token=None,
                         pad_token=None)
    tok.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS})
    tok.eos_token = "<|im_end|>"
    tok.pad_token = "<|endoftext|>"
    tok.model_max_length = 32768
    return tok


def build_processor(tokenizer):
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    from .processor import ImageOnlyOnevisionProcessor

    pinpoints = [[TILE * i, TILE * j] for i in range(1, 4) for j in range(1, 4)]
    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": TILE, "width": TILE}, crop_size={"height": TILE, "width": TILE},
        image_grid_pinpoints=pinpoints, do_pad=True)
    return ImageOnlyOnevisionProcessor(
        image_processor=image_processor, tokenizer=tokenizer, num_image_tokens=(TILE // PATCH) ** 2,
        vision_feature_select_strategy="full", chat_template=CHAT_TEMPLATE, vision_aspect_ratio="anyres_max_9")


def build_config(tokenizer):
    from transformers import LlavaOnevisionConfig

    return LlavaOnevisionConfig(
        vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=2, image_size=TILE, patch_size=PATCH),
        text_config=dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tokenizer),
                         max_position_embeddings=32768, tie_word_embeddings=False,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=[[TILE * i, TILE * j] for i in range(1, 4) for j in range(1, 4)],
        vision_feature_select_strategy="full", vision_feature_layer=-1, vision_aspect_ratio="anyres_max_9",
        tie_word_embeddings=False)


def write_tiny_model(out: str | os.PathLike, seed: int = 0, force: bool = False) -> Path:
    """Write a tiny random LLaVA-OneVision checkpoint + processor to `out` (atomically)."""
    import torch
    from transformers import GenerationConfig, LlavaOnevisionForConditionalGeneration

    tokenizer = build_tokenizer()
    processor = build_processor(tokenizer)
    config = build_config(tokenizer)
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(config)
    # With the default std-0.02 init, |logit| stays below ~1 whatever the hidden state, so a LoRA on the frozen body
    # could never make any token likely (loss stuck near ln(vocab)). Pretrained heads are far from that; a wider
    # random head gives the tiny model the same room to become confident.
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 0.2)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, do_sample=False)
    out = Path(out)
    with atomic_dir(out, force=force) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
    return out
