import json

import torch
from transformers import LlavaOnevisionForConditionalGeneration

from lora_manip.model.tiny import CHAT_TEMPLATE


def test_layout_is_standard_hf(tiny_model_dir):
    names = {p.name for p in tiny_model_dir.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "processor_config.json", "chat_template.jinja"} <= names
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    assert cfg["model_type"] == "llava_onevision"
    assert cfg["vision_config"]["model_type"] == "siglip_vision_model"
    assert cfg["text_config"]["model_type"] == "qwen2"
    assert len(cfg["image_grid_pinpoints"]) == 9


def test_round_trip_identical_logits_and_template(tiny_model_dir, processor, tmp_path):
    from PIL import Image

    from lora_manip.model.processor import load_processor

    model = LlavaOnevisionForConditionalGeneration.from_pretrained(tiny_model_dir)
    model.save_pretrained(tmp_path / "copy")
    processor.save_pretrained(tmp_path / "copy")
    again = LlavaOnevisionForConditionalGeneration.from_pretrained(tmp_path / "copy")
    proc2 = load_processor(tmp_path / "copy")
    assert proc2.chat_template == CHAT_TEMPLATE
    text = proc2.tokenizer.apply_chat_template([{"role": "user", "content": "<image>\nWhere is the cube?"}],
                                               chat_template=proc2.chat_template, tokenize=False,
                                               add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<image>")
    inputs = proc2(images=[Image.new("RGB", (320, 180), (200, 30, 30))], text=[text], return_tensors="pt")
    with torch.no_grad():
        a, b = model(**inputs).logits, again(**inputs).logits
    assert torch.equal(a, b)
    assert a.shape[-1] == len(proc2.tokenizer)


def test_special_token_ids_match_config(tiny_model_dir, processor):
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    tok = processor.tokenizer
    assert tok.convert_tokens_to_ids("<image>") == cfg["image_token_index"]
    assert tok.eos_token == "<|im_end|>"
    # Qwen's order of the specials, at the end of the vocabulary
    ids = tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"])
    assert ids == sorted(ids) and ids[-1] == len(tok) - 1
