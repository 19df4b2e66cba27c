"""Streaming merge: the same weights as PEFT's merge_and_unload (LoRA, rsLoRA, DoRA, rank/alpha patterns, LoRA on
the vision tower, full projector, image_newline), QLoRA adapters onto the unquantised base or (--base-as-trained)
onto the 4-bit weights they were trained against, the base's own tensor names and processor files in the output
(hub layout and transformers-5 layout bases, hub and ChatML templates), sharded output that transformers loads,
and bad inputs that fail with a clear message and write nothing."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from lora_manip.checkpoints.merge import merge_adapter
from lora_manip.checkpoints.tensors import Checkpoint, read_tensor
from lora_manip.checkpoints.verify import MergeCheckFailed, logits_of, probe_inputs
from lora_manip.cli import app
from lora_manip.errors import UserError
from lora_manip.model.layouts import canonical
from tests.conftest import saved_run_recipe

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
    (out / "recipe.yaml").write_text(saved_run_recipe(lora={"r": 4, "alpha": 8}))
    return pm


def merged_state(folder: Path) -> dict[str, torch.Tensor]:
    ckpt = Checkpoint(folder)
    return {r.name: read_tensor(r) for r in ckpt.tensors()}


def reference_state(pm) -> dict[str, torch.Tensor]:
    """PEFT's merge_and_unload, in the key layout transformers writes."""
    from lora_manip.model.layouts import hub_name

    merged = pm.merge_and_unload(safe_merge=True)
    return {hub_name(n): t.detach().clone() for n, t in merged.state_dict().items()}


def tree_hash(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json", "video_preprocessor_config.json",
                   "chat_template.json", "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "added_tokens.json", "special_tokens_map.json")


def assert_same_processor(out: Path, source: Path) -> None:
    """The hub's processor files, byte for byte as the source has them (processor_class LlavaOnevisionProcessor,
    video processor config, the same chat template)."""
    for name in PROCESSOR_FILES:
        assert (out / name).read_bytes() == (source / name).read_bytes(), name
    assert json.loads((out / "processor_config.json").read_text())["processor_class"] == "LlavaOnevisionProcessor"


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
        assert not torch.equal(got["vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight"],
                               original["vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight"])
    # sharded with an index, loadable by transformers as is, same logits as PEFT's merged model
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and not (out / "model.safetensors").exists()
    reloaded = _load_tiny(out)
    torch.testing.assert_close(logits_of(reloaded, inputs), logits_of(pm.eval(), inputs), rtol=1e-4, atol=1e-4)
    assert {"config.json", "generation_config.json", "README.md", "recipe.yaml"} <= {p.name for p in out.iterdir()}
    assert_same_processor(out, base)
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


# --- the output keeps the base's formats ---------------------------------------------------------------------------


def test_output_keeps_the_base_layout_in_memory_names(base, lora_adapter, tmp_path, processor):
    """A base saved under transformers 5's in-memory names (model.language_model.*, model.vision_tower.*, lm_head)
    merges to a folder with exactly those names, and the same weights as the merge of the hub-layout base."""
    model = _load_tiny(base)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    assert any(k.startswith("model.language_model.") for k in state) and "lm_head.weight" in state
    t5 = tmp_path / "t5-base"
    shutil.copytree(base, t5)
    save_file(state, str(t5 / "model.safetensors"), metadata={"format": "pt"})

    out, diff = merge_adapter(str(lora_adapter), base=str(t5), out=str(tmp_path / "m5"))
    hub, _ = merge_adapter(str(lora_adapter), base=str(base), out=str(tmp_path / "mh"), verify=False)
    assert diff is not None and diff < 1e-4
    got, hub_state = merged_state(out), merged_state(hub)
    assert set(got) == set(state)
    assert set(hub_state) == set(load_file(base / "model.safetensors"))
    assert {canonical(k) for k in got} == {canonical(k) for k in hub_state}
    by_canonical = {canonical(k): v for k, v in hub_state.items()}
    for key, t in got.items():
        assert torch.equal(t, by_canonical[canonical(key)]), key
    assert_same_processor(out, t5)


def test_processor_files_come_from_the_adapter_when_it_has_them(base, lora_adapter, tmp_path):
    """The trainer copies the base's processor files into the adapter folder; the merge takes those, verbatim."""
    from lora_manip.model.tiny import CHATML_TEMPLATE

    adapter = _copy(lora_adapter, tmp_path / "a")
    for name in PROCESSOR_FILES:
        shutil.copyfile(base / name, adapter / name)
    (adapter / "chat_template.json").write_text(json.dumps({"chat_template": CHATML_TEMPLATE}, indent=1))
    out, diff = merge_adapter(str(adapter), out=str(tmp_path / "m"))
    assert diff is not None  # the self-check ran with the adapter's (string-content) template
    assert_same_processor(out, adapter)
    assert (out / "chat_template.json").read_bytes() != (base / "chat_template.json").read_bytes()
    assert (out / "recipe.yaml").read_text() == (lora_adapter / "recipe.yaml").read_text()


def test_chatml_template_base(tmp_path):
    """A base with lmms-lab's string-content ChatML template merges and self-checks like the hub-template one."""
    from lora_manip.model.tiny import write_tiny_model

    chatml = write_tiny_model(tmp_path / "chatml", template="chatml")
    adapter = tmp_path / "a"
    make_adapter(chatml, adapter)
    out, diff = merge_adapter(str(adapter), out=str(tmp_path / "m"))
    assert diff is not None and diff < 1e-4
    assert_same_processor(out, chatml)


def test_probe_without_image_tokens_is_an_error(base, lora_adapter, tmp_path):
    """A template that drops the image would make the self-check compare two text-only runs: refused."""
    from lora_manip.data.processor import load_processor

    drops_images = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' }}{% for c in m['content'] %}"
                    "{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{{ '<|im_end|>\\n' }}"
                    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    bad = _copy(base, tmp_path / "bad")
    (bad / "chat_template.json").write_text(json.dumps({"chat_template": drops_images}))
    with pytest.raises(UserError, match="<image>"):
        probe_inputs(load_processor(bad))
    out = tmp_path / "m"
    with pytest.raises(UserError, match="<image>"):
        merge_adapter(str(lora_adapter), base=str(bad), out=str(out))
    assert nothing_written(out)


# --- QLoRA: --base-as-trained ---------------------------------------------------------------------------------------

QLORA_TARGETS = r"^(model\.language_model)\..*\.(q_proj|v_proj)$"  # the other LM Linears are quantised but untouched


def _qlora_adapter(base: Path, out: Path, quant_type: str = "nf4", double_quant: bool = True, recipe: bool = True):
    from peft import LoraConfig, get_peft_model

    from lora_manip.model.load import load_model
    from lora_manip.recipe import QuantCfg

    torch.manual_seed(3)
    q_model = load_model(str(base), dtype="float32", quantization=QuantCfg(
        quant_type=quant_type, double_quant=double_quant, compute_dtype="float32"))
    pm = get_peft_model(q_model, LoraConfig(r=4, lora_alpha=8, target_modules=QLORA_TARGETS, task_type=None))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    pm.save_pretrained(out)
    if recipe:
        (out / "recipe.yaml").write_text(saved_run_recipe(method="qlora", quantization={
            "bits": 4, "quant_type": quant_type, "double_quant": double_quant, "compute_dtype": "float32"}))
    return pm.eval()


@pytest.fixture(scope="module")
def qlora(base, tmp_path_factory):
    out = tmp_path_factory.mktemp("merge") / "qlora"
    return out, _qlora_adapter(base, out)


@pytest.mark.parametrize("quant_type,double_quant", [("nf4", True), ("fp4", False), ("nf4", False)])
def test_as_trained_weights_equal_bitsandbytes_dequantised(base, tmp_path, quant_type, double_quant):
    """quant.as_trained reproduces, bit for bit, the weights a model loaded with BitsAndBytesConfig computes with."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    from lora_manip.checkpoints.quant import QuantSpec, as_trained, quantised_in_training

    pm = _qlora_adapter(base, tmp_path / "a", quant_type, double_quant, recipe=False)
    spec = QuantSpec(quant_type, double_quant, "test")
    original = {canonical(k): v for k, v in load_file(base / "model.safetensors").items()}
    checked = 0
    for name, layer in pm.base_model.model.named_modules():
        if not isinstance(layer, bnb.nn.Linear4bit):  # bitsandbytes' own layer, not PEFT's wrapper of it
            continue
        key = name.replace(".base_layer", "") + ".weight"
        assert quantised_in_training(key, tuple(original[key].shape)), key
        theirs = bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
        assert torch.equal(as_trained(original[key], spec), theirs), key
        checked += 1
    assert checked == 14  # 7 Linear layers x 2 LM layers: exactly the ones quantised_in_training names
    assert sum(quantised_in_training(k, tuple(v.shape)) for k, v in original.items()) == 14


def test_base_as_trained_matches_the_4bit_model(base, qlora, tmp_path, processor):
    """The default merge differs from the 4-bit model + adapter by the nf4 error; --base-as-trained reproduces it."""
    from lora_manip.checkpoints.quant import QuantSpec, as_trained

    adapter, pm = qlora
    inputs = probe_inputs(processor)
    reference = logits_of(pm, inputs)

    trained, diff = merge_adapter(str(adapter), out=str(tmp_path / "as-trained"), base_as_trained=True)
    default, _ = merge_adapter(str(adapter), out=str(tmp_path / "default"))
    as_trained_diff = (logits_of(_load_tiny(trained), inputs) - reference).abs().max().item()
    default_diff = (logits_of(_load_tiny(default), inputs) - reference).abs().max().item()
    assert diff is not None and diff < 1e-4 and as_trained_diff < 1e-4
    assert default_diff > 1e-2 and default_diff > 100 * as_trained_diff

    got, original = merged_state(trained), load_file(base / "model.safetensors")
    spec = QuantSpec("nf4", True, "test")
    gate = "language_model.model.layers.0.mlp.gate_proj.weight"  # quantised in training, no LoRA on it
    assert torch.equal(got[gate], as_trained(original[gate], spec)) and not torch.equal(got[gate], original[gate])
    for key in ("language_model.lm_head.weight", "language_model.model.embed_tokens.weight",
                "multi_modal_projector.linear_1.weight", "vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight",
                "language_model.model.layers.0.self_attn.q_proj.bias", "language_model.model.norm.weight"):
        assert torch.equal(got[key], original[key]), key  # never quantised
    assert "as trained" in (trained / "README.md").read_text()

    # the same settings given explicitly for an adapter folder without recipe.yaml: the same bytes
    bare = _copy(adapter, tmp_path / "bare")
    (bare / "recipe.yaml").unlink()
    explicit, _ = merge_adapter(str(bare), out=str(tmp_path / "explicit"), base_as_trained=True, verify=False,
                                quantization="quant_type=nf4,double_quant=true")
    assert tree_hash(explicit)["model.safetensors"] == tree_hash(trained)["model.safetensors"]


def test_base_as_trained_bad_requests(base, lora_adapter, qlora, tmp_path):
    adapter, _ = qlora
    out = tmp_path / "m"
    cases = [
        ([str(lora_adapter), "--base-as-trained"], "method is lora, not qlora"),
        ([str(adapter), "--quantization", "nf4"], "pass both or neither"),
        ([str(adapter), "--base-as-trained", "--quantization", "bits=8"], "8-bit LLM.int8"),
        ([str(adapter), "--base-as-trained", "--quantization", "quant_type=nf5"], "quantization.quant_type"),
    ]
    bare = _copy(adapter, tmp_path / "bare")
    (bare / "recipe.yaml").unlink()
    cases.append(([str(bare), "--base-as-trained"], "recipe.yaml does not exist.*--quantization"))
    broken = _copy(adapter, tmp_path / "broken")
    (broken / "recipe.yaml").write_text(saved_run_recipe(method="qlora",
                                                         quantization={"bits": 4, "quant_type": "int4"}))
    cases.append(([str(broken), "--base-as-trained"], rf"{broken}/recipe.yaml: quantization.quant_type"))
    for args, message in cases:
        r = CliRunner().invoke(app, ["merge", *args, "--out", str(out)])
        assert r.exit_code == 2 and "Traceback" not in r.output, (args, r.output)
        assert re.search(message, " ".join(r.output.split())), (args, r.output)
        assert nothing_written(out)


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
    n = len(load_file(base / "model.safetensors"))
    with pytest.raises(UserError, match=rf"{n} adapter tensor\(s\) match no tensor of base"):
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
    assert r.exit_code == 2 and "did not make it" in r.output and (out / "keep.txt").is_file()  # not the kit's
    ours = tmp_path / "m2"
    for force in ([], ["--force"]):  # a merge of the kit's own is replaced with --force
        r = runner.invoke(app, ["merge", str(lora_adapter), "--out", str(ours), "--no-verify", *force])
        assert r.exit_code == 0, r.output
    assert (ours / "model.safetensors").is_file()
    for bad in (lora_adapter / "sub", base, base.parent):
        r = runner.invoke(app, ["merge", str(lora_adapter), "--out", str(bad), "--force"])
        assert r.exit_code == 2 and "would write into" in r.output, r.output
    r = runner.invoke(app, ["merge", str(lora_adapter), "--dtype", "int8"])
    assert r.exit_code == 2


def test_check_skipped_for_large_models_and_failing_check(lora_adapter, tmp_path, caplog, monkeypatch):
    with caplog.at_level(logging.WARNING, logger="lora_manip.checkpoints"):
        out, diff = merge_adapter(str(lora_adapter), out=str(tmp_path / "m"), verify_max_bytes=1000)
    assert diff is None and "merge check SKIPPED" in caplog.text
    import lora_manip.checkpoints.verify as merge_verify

    monkeypatch.setitem(merge_verify.TOLERANCE, "fp32", -1.0)
    with pytest.raises(MergeCheckFailed, match="differs from base"):
        merge_adapter(str(lora_adapter), out=str(tmp_path / "m2"))
    assert nothing_written(tmp_path / "m2")


def test_key_layouts():
    assert canonical("language_model.model.layers.0.mlp.up_proj.weight") == \
        "model.language_model.layers.0.mlp.up_proj.weight"
    assert canonical("language_model.lm_head.weight") == "lm_head.weight"
    assert canonical("vision_tower.vision_model.encoder.layers.3.mlp.fc1.bias") == \
        "model.vision_tower.encoder.layers.3.mlp.fc1.bias"
    assert canonical("model.multi_modal_projector.linear_1.weight") == "model.multi_modal_projector.linear_1.weight"
    assert canonical("image_newline") == "model.image_newline"
    assert canonical("model.layers.0.mlp.up_proj.weight") is None


def test_nan_in_adapter_is_an_error(lora_adapter, tmp_path):
    adapter = _copy(lora_adapter, tmp_path / "a")
    key = "base_model.model.model.language_model.layers.0.mlp.gate_proj.lora_B.weight"
    _edit_adapter(adapter, lambda s: s[key].__setitem__((0, 0), float("nan")))
    out = tmp_path / "m"
    with pytest.raises(UserError, match=rf"adapter_model.safetensors: tensor {key} has NaN/inf values"):
        merge_adapter(str(adapter), out=str(out))
    assert nothing_written(out)
