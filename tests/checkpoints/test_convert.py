"""`lora-manip convert`: an original LLaVA-NeXT (llava_qwen) checkpoint built from the tiny model converts to a
transformers LLaVA-OneVision with identical logits, the hub's tensor names and the hub's processor files; the vision
config comes from the tower mm_vision_tower names when it is available locally; hf -> llava-next -> hf is bit-exact
from either transformers layout and with either template style; unknown keys are listed."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from lora_manip.cli import app
from lora_manip.checkpoints.convert import convert_checkpoint
from lora_manip.checkpoints.tensors import Checkpoint, read_tensor
from lora_manip.checkpoints.verify import logits_of, probe_inputs
from lora_manip.errors import UserError

runner = CliRunner()


def upstream_name(key: str) -> str | None:
    """The tiny model's keys (as transformers saves them) in LLaVA-NeXT's llava_qwen names, written out here
    independently of lora_manip.model.layouts. LLaVA-NeXT replaces SigLIP's head by Identity: no head tensors."""
    if key.startswith("vision_tower.head."):
        return None
    for hf, nxt in (("language_model.model.", "model."), ("language_model.lm_head.", "lm_head."),
                    ("vision_tower.vision_model.", "model.vision_tower.vision_tower.vision_model."),
                    ("multi_modal_projector.linear_1.", "model.mm_projector.0."),
                    ("multi_modal_projector.linear_2.", "model.mm_projector.2."),
                    ("image_newline", "model.image_newline")):
        if key.startswith(hf):
            return nxt + key[len(hf):]
    raise AssertionError(key)


@pytest.fixture(scope="module")
def upstream(tiny_model_dir, tmp_path_factory):
    """The tiny model as an original LLaVA-NeXT checkpoint: two shards, a llava_qwen config.json with the Qwen2
    fields at the top level and LLaVA-NeXT's mm_* fields, pinpoints as a grid string, a rotary inv_freq buffer,
    the tokenizer files only (no processor), and the SigLIP shapes in a separate JSON (upstream has no place for
    them)."""
    root = tmp_path_factory.mktemp("convert")
    src = root / "llava-next"
    src.mkdir()
    tiny = load_file(tiny_model_dir / "model.safetensors")
    state = {upstream_name(k): v for k, v in tiny.items() if upstream_name(k)}
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    keys = sorted(state)
    half = len(keys) // 2
    shards = {"model-00001-of-00002.safetensors": keys[:half], "model-00002-of-00002.safetensors": keys[half:]}
    for name, ks in shards.items():
        save_file({k: state[k] for k in ks}, str(src / name), metadata={"format": "pt"})
    (src / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: n for n, ks in shards.items() for k in ks}}))
    hf = json.loads((tiny_model_dir / "config.json").read_text())
    text = hf["text_config"]
    cfg = {"architectures": ["LlavaQwenForCausalLM"], "model_type": "llava",
           **{k: text[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                   "num_key_value_heads", "vocab_size", "max_position_embeddings", "rms_norm_eps",
                                   "hidden_act", "eos_token_id", "pad_token_id", "attention_dropout", "use_cache",
                                   "sliding_window", "use_sliding_window", "max_window_layers", "bos_token_id",
                                   "initializer_range")},
           "rope_theta": text["rope_parameters"]["rope_theta"], "rope_scaling": None, "tie_word_embeddings": False,
           "torch_dtype": "float32", "mm_vision_tower": "google/siglip-so400m-patch14-384", "mm_hidden_size": 32,
           "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch",
           "mm_patch_merge_type": "spatial_unpad", "image_aspect_ratio": "anyres_max_9",
           "image_grid_pinpoints": "(1x1),...,(3x3)", "mm_newline_position": "one_token", "use_mm_proj": True,
           "mm_use_im_start_end": False, "mm_use_im_patch_token": False}
    (src / "config.json").write_text(json.dumps(cfg, indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copyfile(tiny_model_dir / name, src / name)
    vision = {**hf["vision_config"], "vision_use_head": False}
    (root / "siglip.json").write_text(json.dumps(vision))
    return src


def all_tensors(folder: Path) -> dict[str, torch.Tensor]:
    return {r.name: read_tensor(r) for r in Checkpoint(folder).tensors()}


def test_llava_next_to_hf_gives_the_same_logits(upstream, tiny_model_dir, processor, tmp_path):
    from transformers import LlavaOnevisionForConditionalGeneration as Model

    from lora_manip.data.processor import load_processor

    out = tmp_path / "hf"
    code = runner.invoke(app, ["convert", str(upstream), str(out), "--from", "llava-next", "--to", "hf",
                               "--vision-config", str(upstream.parent / "siglip.json")])
    assert code.exit_code == 0, code.output
    # the names transformers' conversion writes (the hub layout, `vision_tower.vision_model.*`), no buffer
    assert set(all_tensors(out)) == set(load_file(tiny_model_dir / "model.safetensors"))
    assert any(k.startswith("vision_tower.vision_model.encoder.") for k in all_tensors(out))
    cfg = json.loads((out / "config.json").read_text())
    tiny = json.loads((tiny_model_dir / "config.json").read_text())
    assert cfg["image_grid_pinpoints"] == tiny["image_grid_pinpoints"]  # "(1x1),...,(3x3)" expanded with 56-px tiles
    assert cfg["vision_config"]["num_hidden_layers"] == 2 and cfg["vision_config"]["vision_use_head"] is False
    assert cfg["vision_feature_layer"] == -1 and cfg["vision_feature_select_strategy"] == "full"
    assert cfg["text_config"]["rope_parameters"] == tiny["text_config"]["rope_parameters"]
    inputs = probe_inputs(processor)
    converted = Model.from_pretrained(out, dtype=torch.float32).eval()
    original = Model.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    assert torch.equal(logits_of(converted, inputs), logits_of(original, inputs))
    # the processor built for it: the tokenizer's <image>/<video>, SigLIP normalisation, 16 tokens per 56-px tile
    built = load_processor(out)
    assert built.tokenizer.convert_tokens_to_ids("<image>") == cfg["image_token_index"] == tiny["image_token_index"]
    assert built.num_image_tokens == 16 and list(built.image_processor.image_mean) == [0.5, 0.5, 0.5]
    mine = probe_inputs(built)
    assert torch.equal(mine["input_ids"], inputs["input_ids"])  # same image-token expansion and chat template
    assert torch.isfinite(logits_of(converted, mine)).all()
    # written as the hub folders hold it: LlavaOnevisionProcessor, a video processor config, the official template
    from lora_manip.model.tiny import HUB_CHAT_TEMPLATE

    assert json.loads((out / "processor_config.json").read_text())["processor_class"] == "LlavaOnevisionProcessor"
    assert json.loads((out / "video_preprocessor_config.json").read_text())["processor_class"] == \
        "LlavaOnevisionProcessor"
    assert json.loads((out / "chat_template.json").read_text())["chat_template"] == HUB_CHAT_TEMPLATE
    assert built.chat_template == HUB_CHAT_TEMPLATE


PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json", "video_preprocessor_config.json",
                   "chat_template.json", "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "added_tokens.json", "special_tokens_map.json", "generation_config.json")


@pytest.mark.parametrize("template", ["hub", "chatml"])
def test_hf_to_llava_next_to_hf_is_bit_exact(tiny_model_dir, tmp_path, template):
    from lora_manip.model.tiny import write_tiny_model

    if template == "chatml":
        tiny_model_dir = write_tiny_model(tmp_path / "chatml", template="chatml")
    nxt, back = tmp_path / "next", tmp_path / "back"
    convert_checkpoint(str(tiny_model_dir), str(nxt), "hf", "llava-next", max_shard_size=200_000)
    state = all_tensors(nxt)
    assert len(list(nxt.glob("model-*.safetensors"))) > 1
    assert {"model.mm_projector.0.weight", "model.mm_projector.2.bias", "model.image_newline", "lm_head.weight",
            "model.embed_tokens.weight", "model.layers.1.mlp.down_proj.weight", "model.norm.weight",
            "model.vision_tower.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight"} <= set(state)
    cfg = json.loads((nxt / "config.json").read_text())
    assert cfg["architectures"] == ["LlavaQwenForCausalLM"] and cfg["hidden_size"] == 64
    assert cfg["mm_projector_type"] == "mlp2x_gelu" and cfg["mm_hidden_size"] == 32
    assert cfg["image_aspect_ratio"] == "anyres_max_9" and cfg["mm_vision_tower"].startswith("google/siglip")
    assert (nxt / "vocab.json").is_file() and (nxt / "merges.txt").is_file()  # for slow-tokenizer loaders

    convert_checkpoint(str(nxt), str(back), "llava-next", "hf")
    original = load_file(tiny_model_dir / "model.safetensors")
    again = all_tensors(back)
    assert set(again) == set(original)
    for key, t in original.items():
        assert again[key].dtype == t.dtype and torch.equal(again[key].view(torch.uint8), t.view(torch.uint8)), key
    strip = {"transformers_version"}
    assert {k: v for k, v in json.loads((back / "config.json").read_text()).items() if k not in strip} == \
        {k: v for k, v in json.loads((tiny_model_dir / "config.json").read_text()).items() if k not in strip}
    for name in PROCESSOR_FILES:  # the source's processor, byte for byte, both ways
        assert (nxt / name).read_bytes() == (tiny_model_dir / name).read_bytes(), name
        assert (back / name).read_bytes() == (tiny_model_dir / name).read_bytes(), name


def test_unknown_keys_are_listed_and_nothing_written(upstream, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(upstream, src)
    shard = src / "model-00002-of-00002.safetensors"
    state = load_file(shard)
    state.update({"model.mm_projector.4.weight": torch.zeros(2), "model.vision_resampler.pool.weight": torch.zeros(2)})
    save_file(state, str(shard), metadata={"format": "pt"})
    index = json.loads((src / "model.safetensors.index.json").read_text())
    index["weight_map"].update({k: shard.name for k in ("model.mm_projector.4.weight",
                                                        "model.vision_resampler.pool.weight")})
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    out = tmp_path / "out"
    r = runner.invoke(app, ["convert", str(src), str(out), "--from", "llava-next", "--to", "hf", "--vision-config",
                            str(upstream.parent / "siglip.json")])
    assert r.exit_code == 2
    assert "2 tensor(s)" in r.output and "model.mm_projector.4.weight" in r.output
    assert "model.vision_resampler.pool.weight" in r.output
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


def test_bad_conversions(upstream, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    out = tmp_path / "out"
    # no vision config: SigLIP-so400m defaults do not fit the tiny tower, and the error says which tensor
    with pytest.raises(UserError, match=r"patch_embedding.weight is \[32, 3, 14, 14\].*--vision-config"):
        convert_checkpoint(str(upstream), str(out), "llava-next", "hf")
    with pytest.raises(UserError, match="nothing to convert"):
        convert_checkpoint(str(upstream), str(out), "hf", "hf")
    with pytest.raises(UserError, match="expects a transformers LLaVA-OneVision"):
        convert_checkpoint(str(upstream), str(out), "hf", "llava-next")
    with pytest.raises(UserError, match="expects an original LLaVA-NeXT"):
        convert_checkpoint(str(tiny_model_dir), str(out), "llava-next", "hf")
    assert not out.exists()
    out.mkdir()
    with pytest.raises(UserError, match="already exists"):
        convert_checkpoint(str(tiny_model_dir), str(out), "hf", "llava-next")
    r = runner.invoke(app, ["convert", str(tiny_model_dir), str(out), "--from", "hf", "--to", "gguf"])
    assert r.exit_code == 2 and "choose hf or llava-next" in r.output
    r = runner.invoke(app, ["convert", str(tiny_model_dir), str(tiny_model_dir / "x"), "--from", "hf", "--to",
                            "llava-next"])
    assert r.exit_code == 2 and "source folder" in r.output


def test_from_hf_reads_the_in_memory_layout(tiny_model_dir, tmp_path):
    """A transformers-5 folder saved under the in-memory names converts like the hub layout; back in hf it has the
    hub names, bit for bit the same tensors."""
    from transformers import LlavaOnevisionForConditionalGeneration as Model

    state = {k: v.contiguous() for k, v in Model.from_pretrained(tiny_model_dir).state_dict().items()}
    src = tmp_path / "t5"
    shutil.copytree(tiny_model_dir, src)
    save_file(state, str(src / "model.safetensors"), metadata={"format": "pt"})
    assert "model.language_model.embed_tokens.weight" in state
    convert_checkpoint(str(src), str(tmp_path / "next"), "hf", "llava-next")
    convert_checkpoint(str(tmp_path / "next"), str(tmp_path / "back"), "llava-next", "hf")
    original, again = load_file(tiny_model_dir / "model.safetensors"), all_tensors(tmp_path / "back")
    assert set(again) == set(original)
    for key, t in original.items():
        assert torch.equal(again[key].view(torch.uint8), t.view(torch.uint8)), key


def _siglip_config(hidden=32, layers=3, kind="siglip") -> dict:
    vision = {"hidden_size": hidden, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": layers,
              "image_size": 56, "patch_size": 14}
    if kind == "siglip":  # a full SiglipConfig as on the hub: text + vision blocks
        return {"model_type": "siglip", "architectures": ["SiglipModel"], "text_config": {"hidden_size": 48},
                "vision_config": vision}
    return {"model_type": "siglip_vision_model", **vision}


def _with_tower(upstream: Path, dst: Path, tower: str) -> Path:
    shutil.copytree(upstream, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["mm_vision_tower"] = tower
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("kind,where", [("siglip", "absolute"), ("siglip_vision_model", "relative")])
def test_vision_config_from_a_local_tower_folder(upstream, tiny_model_dir, tmp_path, caplog, kind, where):
    """mm_vision_tower naming a local SigLIP folder (non-default widths, 3 layers): its config, minus the last layer
    and head as LLaVA-NeXT does, gives the tiny model's 2-layer tower; no --vision-config needed."""
    src = tmp_path / "src"
    tower = (src / "tower") if where == "relative" else (tmp_path / "my-siglip")
    src = _with_tower(upstream, src, "tower" if where == "relative" else str(tower))
    tower.mkdir()
    (tower / "config.json").write_text(json.dumps(_siglip_config(kind=kind)))
    out = tmp_path / "hf"
    with caplog.at_level(logging.INFO, logger="lora_manip.checkpoints"):
        convert_checkpoint(str(src), str(out), "llava-next", "hf")
    assert f"vision config from the mm_vision_tower folder {tower}" in caplog.text
    assert "3 layers; LLaVA-NeXT drops the last one" in caplog.text
    vision = json.loads((out / "config.json").read_text())["vision_config"]
    tiny = json.loads((tiny_model_dir / "config.json").read_text())["vision_config"]
    for key in ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "image_size",
                "patch_size", "vision_use_head"):
        assert vision[key] == tiny[key], key
    assert vision["num_hidden_layers"] == 2 and vision["vision_use_head"] is False
    for key, t in load_file(tiny_model_dir / "model.safetensors").items():
        assert torch.equal(all_tensors(out)[key], t), key


def test_vision_config_from_the_hub_cache(upstream, tmp_path, caplog, monkeypatch):
    cache = tmp_path / "hub"
    snap = cache / "models--my-org--siglip-tiny" / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    (snap / "config.json").write_text(json.dumps(_siglip_config()))
    (cache / "models--my-org--siglip-tiny" / "refs").mkdir()
    (cache / "models--my-org--siglip-tiny" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    src = _with_tower(upstream, tmp_path / "src", "my-org/siglip-tiny")
    with caplog.at_level(logging.INFO, logger="lora_manip.checkpoints"):
        convert_checkpoint(str(src), str(tmp_path / "hf"), "llava-next", "hf")
    assert "vision config from mm_vision_tower my-org/siglip-tiny in the local Hugging Face cache" in caplog.text
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["vision_config"]["num_hidden_layers"] == 2


def test_tower_folder_that_does_not_fit(upstream, tmp_path, monkeypatch, caplog):
    tower = tmp_path / "tower"
    tower.mkdir()
    (tower / "config.json").write_text(json.dumps(_siglip_config(layers=2)))  # 2 - 1 = 1 layer, the tensors have 2
    src = _with_tower(upstream, tmp_path / "src", str(tower))
    out = tmp_path / "hf"
    with pytest.raises(UserError, match=r"2 encoder layers, the vision config \(the mm_vision_tower folder .*drops "
                                        r"the last one and the head, leaving 1\)\) says 1"):
        convert_checkpoint(str(src), str(out), "llava-next", "hf")
    (tower / "config.json").write_text(json.dumps({"model_type": "clip_vision_model", "hidden_size": 32}))
    with pytest.raises(UserError, match=rf"{tower}/config.json: model_type 'clip_vision_model'.*SigLIP"):
        convert_checkpoint(str(src), str(out), "llava-next", "hf")
    (tower / "config.json").unlink()
    with pytest.raises(UserError, match=r"has no config.json"):
        convert_checkpoint(str(src), str(out), "llava-next", "hf")
    assert not out.exists()
    # neither a folder nor cached: the so400m defaults, and the log says so
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    src2 = _with_tower(upstream, tmp_path / "src2", "google/siglip-so400m-patch14-384")
    with caplog.at_level(logging.INFO, logger="lora_manip.checkpoints"), \
            pytest.raises(UserError, match="patch_embedding"):
        convert_checkpoint(str(src2), str(out), "llava-next", "hf")
    assert "neither a local folder nor in the local Hugging Face cache" in caplog.text
    assert "vision config from SigLIP-so400m defaults" in caplog.text
