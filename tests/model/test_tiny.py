"""The tiny model is a faithful stand-in for the llava-hf hub checkpoints: same files, tensor names, processor
class, template style and token ids, so tests meet what users bring, not what the kit finds convenient."""

import json

import torch
from safetensors import safe_open
from transformers import LlavaOnevisionForConditionalGeneration

from lora_manip.model.tiny import HUB_CHAT_TEMPLATE

HUB_FILES = {"config.json", "generation_config.json", "model.safetensors", "chat_template.json",
             "processor_config.json", "preprocessor_config.json", "video_preprocessor_config.json", "tokenizer.json",
             "tokenizer_config.json", "vocab.json", "merges.txt", "added_tokens.json", "special_tokens_map.json"}
HUB_PREFIXES = ("language_model.model.", "language_model.lm_head.", "vision_tower.vision_model.",
                "multi_modal_projector.", "image_newline")


def test_files_and_processor_configs_are_the_hubs(tiny_model_dir):
    from lora_manip.outputs import MARKER

    assert {p.name for p in tiny_model_dir.iterdir()} == HUB_FILES | {MARKER}  # and the kit's ownership marker
    read = lambda name: json.loads((tiny_model_dir / name).read_text())  # noqa: E731
    proc = read("processor_config.json")
    assert proc["processor_class"] == "LlavaOnevisionProcessor" and proc["vision_aspect_ratio"] == "anyres_max_9"
    assert "image_processor" not in proc  # the hub keeps the image processor in its own file
    assert read("preprocessor_config.json")["image_processor_type"] == "LlavaOnevisionImageProcessor"
    assert read("video_preprocessor_config.json")["video_processor_type"] == "LlavaOnevisionVideoProcessor"
    assert read("chat_template.json") == {"chat_template": HUB_CHAT_TEMPLATE}
    assert read("added_tokens.json")["<image>"] == read("config.json")["image_token_index"]
    cfg = read("config.json")
    assert cfg["model_type"] == "llava_onevision" and cfg["vision_config"]["vision_use_head"] is False
    assert len(cfg["image_grid_pinpoints"]) == 9


def test_tensor_names_are_the_hubs(tiny_model_dir):
    with safe_open(str(tiny_model_dir / "model.safetensors"), "pt") as f:
        names = list(f.keys())
    assert all(n.startswith(HUB_PREFIXES) for n in names), [n for n in names if not n.startswith(HUB_PREFIXES)]
    assert any(n.startswith("vision_tower.vision_model.encoder.") for n in names)
    assert not any(".head." in n for n in names)  # the real SigLIP tower has no pooling head


def test_hub_template_empties_string_content(processor):
    """The trap the kit must avoid: the hub template renders string content as an empty turn."""
    text = processor.tokenizer.apply_chat_template([{"role": "user", "content": "Where is the cube?"}],
                                                   chat_template=processor.chat_template, tokenize=False)
    assert text == "<|im_start|>user\n<|im_end|>\n"


def test_loads_and_round_trips_with_identical_logits(tiny_model_dir, processor, tmp_path):
    from PIL import Image

    from lora_manip.data.encode import Chat, prompt_text

    model = LlavaOnevisionForConditionalGeneration.from_pretrained(tiny_model_dir)
    assert model.model.vision_tower.head is None if hasattr(model.model.vision_tower, "head") else True
    model.save_pretrained(tmp_path / "copy")
    again = LlavaOnevisionForConditionalGeneration.from_pretrained(tmp_path / "copy")
    text = prompt_text(Chat(processor, None), [{"role": "user", "content": "<image>\nWhere is the cube?"}])
    assert text == "<|im_start|>user\n<image>\nWhere is the cube?<|im_end|>\n<|im_start|>assistant\n"
    inputs = processor(images=[Image.new("RGB", (320, 180), (200, 30, 30))], text=[text], return_tensors="pt")
    assert (inputs["input_ids"] == processor.image_token_id).sum() > 16
    with torch.no_grad():
        a, b = model(**inputs).logits, again(**inputs).logits
    assert torch.equal(a, b)
    assert a.shape[-1] == len(processor.tokenizer)


def test_special_token_ids_match_config(tiny_model_dir, processor):
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    tok = processor.tokenizer
    assert tok.convert_tokens_to_ids("<image>") == cfg["image_token_index"]
    assert tok.eos_token == "<|im_end|>"
    # Qwen's order of the specials, at the end of the vocabulary
    ids = tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"])
    assert ids == sorted(ids) and ids[-1] == len(tok) - 1
