"""Token ids and labels: expansion identical to the processor's, supervision exactly the answers."""

import json

import pytest
from PIL import Image

from lora_manip.data.collate import Collator
from lora_manip.data.dataset import ManipDataset
from lora_manip.data.encode import IGNORE, Chat, encode
from lora_manip.data.records import load_samples
from lora_manip.data.processor import image_token_counts

from tests.conftest import assert_ids_match_processor, write_two_images

SYSTEM = "You are a helpful assistant."


@pytest.fixture()
def records(tmp_path):
    write_two_images(tmp_path)
    recs = [
        {"id": "single", "images": ["img/a.png"], "conversations": [
            {"from": "human", "value": "<image>\nWhere is the cube?"},
            {"from": "gpt", "value": '{"current_bbox": [[0.1, 0.2], [0.3, 0.4]]}'}]},
        {"id": "multi", "images": ["img/a.png", "img/b.png"], "conversations": [
            {"from": "human", "value": "<image>\n<image>\nWhich frame is later?"},
            {"from": "gpt", "value": "The second."},
            {"from": "human", "value": "Is the gripper open?"},
            {"from": "gpt", "value": "Yes"}]},
        {"id": "text", "image": [], "conversations": [
            {"from": "system", "value": "Plan robot tasks."},
            {"from": "user", "value": "How to put the cup away?"},
            {"from": "assistant", "value": "1. grasp the cup 2. place it"}]},
    ]
    (tmp_path / "a.json").write_text(json.dumps(recs))
    samples, problems = load_samples(tmp_path / "a.json", tmp_path)
    assert problems == []
    return samples


def _supervised_text(processor, enc):
    return processor.tokenizer.decode([t for t, lab in zip(enc["input_ids"], enc["labels"]) if lab != IGNORE])


def test_labels_are_exactly_the_answers(any_processor, records):
    processor = any_processor
    expected = ['{"current_bbox": [[0.1, 0.2], [0.3, 0.4]]}<|im_end|>',
                "The second.<|im_end|>Yes<|im_end|>",
                "1. grasp the cup 2. place it<|im_end|>"]
    for s, want in zip(records, expected):
        sizes = [Image.open(p).size for p in s.images]
        enc = encode(s, Chat(processor, SYSTEM), sizes)
        assert _supervised_text(processor, enc) == want
        # every supervised token is contiguous with its answer: no image or prompt token is supervised
        image_id = processor.image_token_id
        assert all(lab == IGNORE for t, lab in zip(enc["input_ids"], enc["labels"]) if t == image_id)


def test_ids_equal_the_processors_own_expansion(any_processor, records):
    assert_ids_match_processor(any_processor, records, SYSTEM)


def test_record_system_turn_wins(any_processor, records):
    enc = encode(records[2], Chat(any_processor, SYSTEM), [])
    text = any_processor.tokenizer.decode(enc["input_ids"])
    assert "Plan robot tasks." in text and SYSTEM not in text


def test_collator_pads_per_batch_and_model_accepts_batch(processor, records, tiny_model_dir):
    from transformers import LlavaOnevisionForConditionalGeneration

    ds = ManipDataset(records, Chat(processor, SYSTEM), max_length=10_000)
    batch = Collator(processor)([ds[0], ds[1], ds[2]])
    assert batch["input_ids"].shape[1] == max(ds.lengths)
    assert batch["batch_num_images"].tolist() == [1, 2]
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE).all()
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(tiny_model_dir)
    assert model(**batch).loss.isfinite()


def test_too_long_samples_are_dropped_and_counted(processor, records):
    ds = ManipDataset(records, Chat(processor, SYSTEM), max_length=100)
    assert len(ds) + sum(ds.dropped.values()) == 3
    assert sum(ds.dropped.values()) >= 1 and all(n <= 100 for n in ds.lengths)


def test_prompts_hold_question_image_and_answer_with_either_template(any_processor, records):
    """What the hub template silently empties when given strings: question, image and answer must all be there,
    and the measured length (the sampler's) must equal the encoded one."""
    from lora_manip.data.encode import token_lengths

    processor = any_processor
    s = records[0]
    sizes = [Image.open(p).size for p in s.images]
    enc = encode(s, Chat(processor, SYSTEM), sizes)
    text = processor.tokenizer.decode(enc["input_ids"])
    assert "Where is the cube?" in text and '"current_bbox"' in text and SYSTEM in text
    assert enc["input_ids"].count(processor.image_token_id) == sum(image_token_counts(processor, sizes))
    assert token_lengths(Chat(processor, SYSTEM), [(s, sizes)]) == [len(enc["input_ids"])]
    text_only = encode(records[2], Chat(processor, SYSTEM), [])
    assert sum(lab != IGNORE for lab in text_only["labels"]) > 3  # a text-only record trains on its answer


def test_template_styles_are_detected(processor, chatml_processor):
    from lora_manip.data.encode import template_style

    assert template_style(processor) == "list" and template_style(chatml_processor) == "string"


def _with_template(processor, template):
    from lora_manip.data.processor import ImageOnlyOnevisionProcessor

    return ImageOnlyOnevisionProcessor(image_processor=processor.image_processor, tokenizer=processor.tokenizer,
                                       num_image_tokens=processor.num_image_tokens,
                                       vision_feature_select_strategy="full", chat_template=template)


@pytest.mark.parametrize("template, message", [
    ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n<|im_end|>\n{% endfor %}", "renders neither"),
    # renders the image parts but drops every text part
    ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}{% if c['type'] == 'image' %}"
     "<image>\n{% elif c['text'] == 'lora-manip probe 7f3a' %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
     "{% endfor %}", "dropped the text"),
    # keeps text, drops images
    ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}{% if c['type'] == 'text' %}"
     "{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}", "image part"),
])
def test_unfaithful_templates_are_refused_by_name(processor, records, template, message):
    from lora_manip.errors import UserError

    bad = _with_template(processor, template)
    with pytest.raises(UserError, match=message) as err:
        encode(records[0], Chat(bad, SYSTEM), [Image.open(p).size for p in records[0].images])
    assert "chat template of" in str(err.value)


def test_an_encoding_that_differs_from_its_measured_length_is_an_error(processor, records):
    from lora_manip.errors import UserError

    ds = ManipDataset(records, Chat(processor, SYSTEM), max_length=10_000)
    ds.lengths[0] += 1
    with pytest.raises(UserError, match="measured"):
        ds[0]
