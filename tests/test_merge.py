"""Streaming merge: the same weights as PEFT's merge_and_unload (LoRA, rsLoRA, DoRA, rank/alpha patterns, LoRA on
the vision tower, full projector, image_newline), QLoRA adapters onto the unquantised base, sharded output that
transformers loads, and bad inputs that fail with a clear message and write nothing."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from lora_manip.checkpoint_io import Checkpoint, hf_canonical, read_tensor
from lora_manip.cli import app
from lora_manip.errors import UserError
from lora_manip.merge import MergeCheckFailed, logits_of, merge_adapter, probe_inputs

LM_TARGETS = r"^(model\.language_model)\..*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$"
LM_AND_VISION = r"^(model\.language_model|model\.vision_tower)\..*\.(q_proj|v_proj|down_proj|fc1)$"


def _load_tiny(path):
    from transformers import LlavaOnevisionForConditionalGeneration

    return LlavaOnevisionForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()


def make_adapter(base_dir: Path, out: Path, seed: int = 0, model=None, **lora) -> object:
    """A PEFT adapter as `lora-manip train` saves one (adapter + image_newline + recipe), with random non-zero
    deltas everywhere; returns the PeftModel (with image_newline set) for reference computations."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = model if model is not None else _load_tiny(base_dir)
    cfg = LoraConfig(r=lora.pop("r", 4), lora_alpha=lora.pop("lora_alpha", 8),
                     target_modules=lora.pop("target_modules", LM_TARGETS),
                     modules_to_save=lora.pop("modules_to_save", ["multi_modal_projector"]), task_type=None, **lora)
    pm = get_peft_model(model, cfg)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name or ("modules_to_save" in name and p.dtype.is_floating_point):
                p.add_(torch.randn_like(p) * 0.05)
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + 0.1 * torch.rand_like(p))
        newline = pm.base_model.model.model.image_newline
        newline.add_(torch.randn_like(newline))
    pm.save_pretrained(out)
    save_file({"model.image_newline": newline.detach().clone()}, str(out / "extra_trainables.safetensors"))
    (out / "recipe.yaml").write_text("method: lora\nlora: {r: 4, alpha: 8}\n")
    return pm


def merged_state(folder: Path) -> dict[str, torch.Tensor]:
    ckpt = Checkpoint(folder)
    return {r.name: read_tensor(r) for r in ckpt.tensors()}


def reference_state(pm) -> dict[str, torch.Tensor]:
    """PEFT's merge_and_unload, in the key layout transformers writes."""
    from lora_manip.checkpoint_io import hf_saved_name

    merged = pm.merge_and_unload(safe_merge=True)
    return {hf_saved_name(n): t.detach().clone() for n, t in merged.state_dict().items()}


def tree_hash(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def nothing_written(out: Path) -> bool:
    return not out.exists() and not list(out.parent.glob(f".{out.name}.*"))


@pytest.fixture(scope="module")
def base(tiny_model_dir, tmp_path_factory):
    """A private copy of the tiny model (tests corrupt copies of it, and must not touch the shared one)."""
    dst = tmp_path_factory.mktemp("merge") / "base"
    shutil.copytree(tiny_model_dir, dst)
    return dst


@pytest.fixture(scope="module")
def lora_adapter(base, tmp_path_factory):
    out = tmp_path_factory.mktemp("merge") / "lora"
    make_adapter(base, out)
    return out


VARIANTS = {
    "lora": dict(rank_pattern={"down_proj": 2}, alpha_pattern={"v_proj": 3}),
    "lora_bias": dict(lora_bias=True, target_modules=r"^model\.language_model\..*\.(q_proj|k_proj|v_proj)$"),
    "rslora": dict(use_rslora=True, r=8, lora_alpha=4, target_modules=LM_AND_VISION),
    "dora": dict(use_dora=True, target_modules=LM_AND_VISION),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_streaming_merge_equals_peft_merge_and_unload(variant, base, tmp_path, processor):
    adapter = tmp_path / "adapter"
    pm = make_adapter(base, adapter, seed=len(variant), **dict(VARIANTS[variant]))
    inputs = probe_inputs(processor)
    before = {"base": tree_hash(base), "adapter": tree_hash(adapter)}

    out, diff = merge_adapter(str(adapter), out=str(tmp_path / "merged"), max_shard_size=150_000)
    reference = reference_state(pm)
    got = merged_state(out)

    assert diff is not None and diff < 1e-4
    assert set(got) == set(reference) == set(load_file(base / "model.safetensors"))  # transformers' key layout
    original = load_file(base / "model.safetensors")
    changed = 0
    for key, ref in reference.items():
        torch.testing.assert_close(got[key], ref, rtol=1e-5, atol=1e-6, msg=lambda m: f"{key}: {m}")
        changed += not torch.equal(got[key], original[key])
    # q_proj/v_proj of both LM layers, the projector, image_newline at least
    assert changed >= 9
    if "vision_tower" in VARIANTS[variant].get("target_modules", ""):
        assert not torch.equal(got["vision_tower.encoder.layers.0.mlp.fc1.weight"],
                               original["vision_tower.encoder.layers.0.mlp.fc1.weight"])
    # sharded with an index, loadable by transformers as is, same logits as PEFT's merged model
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and not (out / "model.safetensors").exists()
    reloaded = _load_tiny(out)
    torch.testing.assert_close(logits_of(reloaded, inputs), logits_of(pm.eval(), inputs), rtol=1e-4, atol=1e-4)
    assert {"config.json", "generation_config.json", "tokenizer.json", "chat_template.jinja", "processor_config.json",
            "README.md"} <= {p.name for p in out.iterdir()}
    # the inputs were only read
    assert before == {"base": tree_hash(base), "adapter": tree_hash(adapter)}


def test_bf16_output_config_and_card(base, lora_adapter, tmp_path):
    out, diff = merge_adapter(str(lora_adapter), out=str(tmp_path / "m"), dtype="bf16")
    assert diff is not None  # checked within the bf16 tolerance
    assert {r.dtype for r in Checkpoint(out).tensors()} == {"BF16"}
    assert (out / "model.safetensors").is_file() and not (out / "model.safetensors.index.json").exists()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["dtype"] == "bfloat16" and "quantization_config" not in cfg
    card = (out / "README.md").read_text()
    assert f"base_model: {base}" in card and str(lora_adapter) in card and "method: lora" in card


def test_qlora_adapter_merges_onto_unquantised_base(base, tmp_path):
    """An adapter trained on the 4-bit model is folded into the full-precision base weights (not into the nf4
    ones), and no quantization_config reaches the output, even if the base config carries one."""
    from peft import LoraConfig, get_peft_model

    from lora_manip.model.load import load_model
    from lora_manip.recipe import QuantCfg

    q_model = load_model(str(base), dtype="float32", quantization=QuantCfg(compute_dtype="float32"))
    assert type(q_model.model.language_model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    adapter = tmp_path / "qlora"
    pm = get_peft_model(q_model, LoraConfig(r=4, lora_alpha=8, target_modules=LM_TARGETS, task_type=None))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    pm.save_pretrained(adapter)
    dequantised = pm.base_model.model.model.language_model.layers[0].self_attn.q_proj.base_layer
    import bitsandbytes.functional as bnbf

    nf4 = bnbf.dequantize_4bit(dequantised.weight.data, dequantised.weight.quant_state).float()

    qbase = tmp_path / "base-with-qcfg"
    shutil.copytree(base, qbase)
    cfg = json.loads((qbase / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (qbase / "config.json").write_text(json.dumps(cfg))

    out, diff = merge_adapter(str(adapter), base=str(qbase), out=str(tmp_path / "m"))
    assert diff is not None and diff < 1e-3
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    w = load_file(base / "model.safetensors")["language_model.model.layers.0.self_attn.q_proj.weight"]
    ad = load_file(adapter / "adapter_model.safetensors")
    key = "base_model.model.model.language_model.layers.0.self_attn.q_proj"
    expect = w + 2.0 * ad[f"{key}.lora_B.weight"] @ ad[f"{key}.lora_A.weight"]
    got = merged_state(out)["language_model.model.layers.0.self_attn.q_proj.weight"]
    torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-6)
    assert (got - (nf4 + (expect - w))).abs().max() > 1e-3  # not the 4-bit weights


def test_quantised_base_checkpoint_is_refused(base, lora_adapter, tmp_path):
    qbase = tmp_path / "qbase"
    shutil.copytree(base, qbase)
    state = load_file(qbase / "model.safetensors")
    state["language_model.model.layers.0.self_attn.q_proj.weight.absmax"] = torch.ones(4)
    save_file(state, str(qbase / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "m"
    with pytest.raises(UserError, match="quantised checkpoint.*absmax"):
        merge_adapter(str(lora_adapter), base=str(qbase), out=str(out))
    assert nothing_written(out)


# --- bad input: a clear error naming file and tensor, nothing written ---------------------------------------------


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_adapter(adapter: Path, fn) -> None:
    path = adapter / "adapter_model.safetensors"
    state = load_file(path)
    fn(state)
    save_file(state, str(path), metadata={"format": "pt"})


def test_leftover_adapter_tensors_are_listed(lora_adapter, tmp_path):
    adapter = _copy(lora_adapter, tmp_path / "a")
    stray = "base_model.model.model.language_model.layers.7.self_attn.q_proj.lora_A.weight"
    stray2 = "base_model.model.model.language_model.layers.0.mlp.down_proj.weight"  # full tensor, not saved module
    _edit_adapter(adapter, lambda s: s.update({stray: torch.zeros(4, 64), stray2: torch.zeros(64, 128)}))
    out = tmp_path / "m"
    with pytest.raises(UserError) as e:
        merge_adapter(str(adapter), out=str(out))
    assert stray in str(e.value) and stray2 in str(e.value) and "2 adapter tensor(s)" in str(e.value)
    assert nothing_written(out)


def test_shape_mismatch_names_the_tensor(lora_adapter, tmp_path):
    adapter = _copy(lora_adapter, tmp_path / "a")
    key = "base_model.model.model.language_model.layers.1.mlp.up_proj.lora_A.weight"
    _edit_adapter(adapter, lambda s: s.update({key: torch.zeros(4, 96)}))
    out = tmp_path / "m"
    with pytest.raises(UserError, match=r"layers\.1\.mlp\.up_proj\.lora_A\.weight \[4, 96\].*up_proj\.weight"):
        merge_adapter(str(adapter), out=str(out))
    assert nothing_written(out)
    key = "base_model.model.model.multi_modal_projector.linear_2.weight"
    adapter2 = _copy(lora_adapter, tmp_path / "b")
    _edit_adapter(adapter2, lambda s: s.update({key: torch.zeros(64, 32)}))
    with pytest.raises(UserError, match=r"linear_2\.weight has shape \[64, 32\].*\[64, 64\]"):
        merge_adapter(str(adapter2), out=str(out))
    assert nothing_written(out)


def test_truncated_or_corrupt_safetensors(base, lora_adapter, tmp_path):
    out = tmp_path / "m"
    broken = _copy(base, tmp_path / "truncated")
    path = broken / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(UserError, match=rf"{path} is truncated: tensor \S+ needs bytes"):
        merge_adapter(str(lora_adapter), base=str(broken), out=str(out))
    assert nothing_written(out)

    garbage = _copy(base, tmp_path / "garbage")
    (garbage / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}" + b"\0" * 64)
    with pytest.raises(UserError, match=rf"{garbage / 'model.safetensors'}: corrupt safetensors header"):
        merge_adapter(str(lora_adapter), base=str(garbage), out=str(out))
    assert nothing_written(out)

    adapter = _copy(lora_adapter, tmp_path / "a")
    apath = adapter / "adapter_model.safetensors"
    apath.write_bytes(apath.read_bytes()[:-10])
    with pytest.raises(UserError, match=rf"{apath} is truncated: tensor base_model\.model\.\S+ needs bytes"):
        merge_adapter(str(adapter), out=str(out))
    assert nothing_written(out)


def test_base_not_found_and_full_checkpoint_as_adapter(base, lora_adapter, tmp_path):
    out = tmp_path / "m"
    adapter = _copy(lora_adapter, tmp_path / "a")
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(tmp_path / "gone")
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match=r"gone \(named by .*adapter_config.json; pass --base.*does not exist"):
        merge_adapter(str(adapter), out=str(out))
    cfg["base_model_name_or_path"] = "no-such-org/no-such-model-xyz"
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="nor in the local Hugging Face cache"):
        merge_adapter(str(adapter), out=str(out))
    merge_adapter(str(adapter), base=str(base), out=str(out), verify=False)  # --base overrides the config
    assert (out / "model.safetensors").is_file()
    with pytest.raises(UserError, match="not an adapter folder.*full model"):
        merge_adapter(str(base), out=str(tmp_path / "m2"))
    assert nothing_written(tmp_path / "m2")
    # a full checkpoint's weights under an adapter config: every tensor is a leftover
    fake = _copy(lora_adapter, tmp_path / "fake")
    shutil.copyfile(base / "model.safetensors", fake / "adapter_model.safetensors")
    with pytest.raises(UserError, match=r"80 adapter tensor\(s\) match no tensor of base"):
        merge_adapter(str(fake), out=str(tmp_path / "m3"))
    assert nothing_written(tmp_path / "m3")


def test_existing_output_and_protected_folders(base, lora_adapter, tmp_path):
    runner = CliRunner()
    out = tmp_path / "m"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    r = runner.invoke(app, ["merge", str(lora_adapter), "--out", str(out), "--no-verify"])
    assert r.exit_code == 2 and "already exists" in r.output and (out / "keep.txt").is_file()
    r = runner.invoke(app, ["merge", str(lora_adapter), "--out", str(out), "--no-verify", "--force"])
    assert r.exit_code == 0, r.output
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    for bad in (lora_adapter / "sub", base, base.parent):
        r = runner.invoke(app, ["merge", str(lora_adapter), "--out", str(bad), "--force"])
        assert r.exit_code == 2 and "would write into" in r.output, r.output
    r = runner.invoke(app, ["merge", str(lora_adapter), "--dtype", "int8"])
    assert r.exit_code == 2


def test_check_skipped_for_large_models_and_failing_check(lora_adapter, tmp_path, caplog, monkeypatch):
    with caplog.at_level(logging.WARNING, logger="lora_manip.merge"):
        out, diff = merge_adapter(str(lora_adapter), out=str(tmp_path / "m"), verify_max_bytes=1000)
    assert diff is None and "merge check SKIPPED" in caplog.text
    import lora_manip.merge as merge

    monkeypatch.setitem(merge._TOLERANCE, "fp32", -1.0)
    with pytest.raises(MergeCheckFailed, match="differs from base"):
        merge_adapter(str(lora_adapter), out=str(tmp_path / "m2"))
    assert nothing_written(tmp_path / "m2")


def test_key_layouts():
    assert hf_canonical("language_model.model.layers.0.mlp.up_proj.weight") == \
        "model.language_model.layers.0.mlp.up_proj.weight"
    assert hf_canonical("language_model.lm_head.weight") == "lm_head.weight"
    assert hf_canonical("vision_tower.vision_model.encoder.layers.3.mlp.fc1.bias") == \
        "model.vision_tower.encoder.layers.3.mlp.fc1.bias"
    assert hf_canonical("model.multi_modal_projector.linear_1.weight") == "model.multi_modal_projector.linear_1.weight"
    assert hf_canonical("image_newline") == "model.image_newline"
    assert hf_canonical("model.layers.0.mlp.up_proj.weight") is None


def test_nan_in_adapter_is_an_error(lora_adapter, tmp_path):
    adapter = _copy(lora_adapter, tmp_path / "a")
    key = "base_model.model.model.language_model.layers.0.mlp.gate_proj.lora_B.weight"
    _edit_adapter(adapter, lambda s: s[key].__setitem__((0, 0), float("nan")))
    out = tmp_path / "m"
    with pytest.raises(UserError, match=rf"adapter_model.safetensors: tensor {key} has NaN/inf values"):
        merge_adapter(str(adapter), out=str(out))
    assert nothing_written(out)
