"""Samples -> token ids + labels (+ the images to process), through the checkpoint's own chat template.

Written by hand because neither transformers nor TRL gives exact assistant-only labels for an arbitrary chat
template with anyres image expansion: `return_assistant_tokens_mask` needs `{% generation %}` markers that real
LLaVA-OneVision templates lack. Instead the template renders the conversation, assistant spans are found by
rendering prefixes of it (a template that is not prefix-stable is refused), and the text is tokenised span by span
so each token's label is known exactly. Supervised: every assistant turn's content and its closing `<|im_end|>`.
"""

from __future__ import annotations

from .records import IMAGE_PLACEHOLDER, Sample
from ..errors import UserError
from ..model.processor import image_token_counts

IGNORE = -100
END_OF_TURN = "<|im_end|>"


def render(processor, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return processor.tokenizer.apply_chat_template(
        messages, chat_template=processor.chat_template, tokenize=False,
        add_generation_prompt=add_generation_prompt)


def with_system(messages: list[dict], system_prompt: str | None) -> list[dict]:
    if system_prompt is None or (messages and messages[0]["role"] == "system"):
        return messages
    return [{"role": "system", "content": system_prompt}] + messages


def supervised_spans(processor, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text and the [start, end) character spans of every assistant answer + its END_OF_TURN."""
    full = render(processor, messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render(processor, messages[:i], add_generation_prompt=True)
        # the conversation up to its last message is the whole one: reuse that render (one fewer per sample)
        upto = full if i == len(messages) - 1 else render(processor, messages[: i + 1])
        end = upto.rfind(END_OF_TURN)
        if not full.startswith(before) or not full.startswith(upto) or end < len(before):
            raise UserError("the chat template is not prefix-stable (rendering a conversation's first turns does "
                            "not give a prefix of the whole); cannot locate answers for the loss mask")
        spans.append((len(before), end + len(END_OF_TURN)))
    return full, spans


def encode(sample: Sample, processor, system_prompt: str | None, image_sizes: list[tuple[int, int]]) -> dict:
    """{"input_ids", "labels"} for one sample; `image_sizes` are the (width, height) of its images in order."""
    tok = processor.tokenizer
    if tok.convert_tokens_to_ids(END_OF_TURN) in (None, tok.unk_token_id):
        raise UserError(f"the tokenizer has no {END_OF_TURN} token; the kit expects Qwen ChatML (LLaVA-OneVision)")
    full, spans = supervised_spans(processor, with_system(sample.messages, system_prompt))
    counts = iter(image_token_counts(processor, image_sizes))
    cuts = [0] + [c for span in spans for c in span] + [len(full)]
    input_ids: list[int] = []
    labels: list[int] = []
    for k in range(len(cuts) - 1):
        segment = full[cuts[k]:cuts[k + 1]]
        if IMAGE_PLACEHOLDER in segment:
            pieces = segment.split(IMAGE_PLACEHOLDER)
            segment = pieces[0] + "".join(IMAGE_PLACEHOLDER * next(counts) + p for p in pieces[1:])
        ids = tok(segment, add_special_tokens=False)["input_ids"]
        input_ids += ids
        labels += ids if k % 2 == 1 else [IGNORE] * len(ids)
    return {"input_ids": input_ids, "labels": labels}


def prompt_text(processor, messages: list[dict], system_prompt: str | None) -> str:
    """The generation prompt for the conversation up to (not including) its last answer."""
    msgs = with_system(messages, system_prompt)
    if msgs[-1]["role"] == "assistant":
        msgs = msgs[:-1]
    return render(processor, msgs, add_generation_prompt=True)
