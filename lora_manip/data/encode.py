"""Samples -> token ids + labels (+ the images to process), through the checkpoint's own chat template.

Written by hand because neither transformers nor TRL gives exact assistant-only labels for an arbitrary chat
template with anyres image expansion: `return_assistant_tokens_mask` needs `{% generation %}` markers that real
LLaVA-OneVision templates lack. Instead the template renders the conversation, assistant spans are found by
rendering prefixes of it (a template that is not prefix-stable is refused), and the text is tokenised span by span
so each token's label is known exactly. Supervised: every assistant turn's content and its closing `<|im_end|>`.

Templates differ in the message form they accept: the llava-hf checkpoints' template wants `content` as a LIST of
typed parts ({"type": "image"}, {"type": "text"}) and renders string content as an empty turn; lmms-lab's ChatML
wants strings. The form is found once per processor by rendering probes (`template_style`), records (which keep
`<image>` placeholders inline, LLaVA style) are converted to it (`for_template`), and every render is checked:
each message's text must appear in it and it must hold one `<image>` per image, so a template the kit cannot
render faithfully is an error naming the checkpoint, never an empty prompt.

`token_lengths` measures the same thing without encoding (what the scan records for every record, so batching and
the `model_max_length` filter know each sample's length before training reads it): it renders and cuts the text
exactly as `encode` does, which is why it lives here; ManipDataset checks every encoded sample against it.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

from ..errors import UserError
from .records import IMAGE_PLACEHOLDER, Sample, system_prompt_error

# .processor (image token counts) is imported where it is used: it imports transformers, and a Chat without a
# processor (`data check` without a model) must not pay for it.

IGNORE = -100
END_OF_TURN = "<|im_end|>"
_PROBE = "lora-manip probe 7f3a"
_STYLES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_COUNTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _apply(processor, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return processor.tokenizer.apply_chat_template(
        messages, chat_template=processor.chat_template, tokenize=False,
        add_generation_prompt=add_generation_prompt)


def _checkpoint(processor) -> str:
    return getattr(processor.tokenizer, "name_or_path", None) or "the checkpoint"


def template_style(processor) -> str:
    """"string" or "list": the message-content form the processor's chat template renders."""
    style = _STYLES.get(processor)
    if style is not None:
        return style

    def renders(content) -> str:
        try:
            return _apply(processor, [{"role": "user", "content": content}])
        except Exception:  # noqa: BLE001 - a template that cannot take this form raises anything jinja can raise
            return ""

    if _PROBE in renders(_PROBE):
        style = "string"
    elif _PROBE in renders([{"type": "text", "text": _PROBE}]):
        style = "list"
        if renders([{"type": "image"}, {"type": "text", "text": _PROBE}]).count(IMAGE_PLACEHOLDER) != 1:
            raise UserError(f"the chat template of {_checkpoint(processor)} does not render an image part as one "
                            f"{IMAGE_PLACEHOLDER}; the kit cannot place image tokens with it")
    else:
        raise UserError(f"the chat template of {_checkpoint(processor)} renders neither string nor list "
                        "(typed parts) message content; pass a checkpoint whose template the kit can render")
    _STYLES[processor] = style
    return style


def for_template(processor, messages: list[dict]) -> list[dict]:
    """Messages with string content and inline `<image>` placeholders, in the form the template wants. For list
    templates each placeholder becomes an image part, in order; the newline after a placeholder is dropped, as
    LLaVA's `<image>\\n` convention and the hub template (which writes `<image>\\n` itself) agree."""
    if template_style(processor) == "string":
        return messages
    out = []
    for m in messages:
        parts: list[dict] = []
        for k, piece in enumerate(m["content"].split(IMAGE_PLACEHOLDER)):
            if k:
                parts.append({"type": "image"})
                piece = piece[1:] if piece.startswith("\n") else piece
            if piece:
                parts.append({"type": "text", "text": piece})
        out.append({"role": m["role"], "content": parts})
    return out


def render(processor, messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The template's text for string-content messages, checked: every message's text is in it, and it holds
    exactly one `<image>` per placeholder."""
    text = _apply(processor, for_template(processor, messages), add_generation_prompt)
    want = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in messages)
    if text.count(IMAGE_PLACEHOLDER) != want:
        raise UserError(f"the chat template of {_checkpoint(processor)} rendered {text.count(IMAGE_PLACEHOLDER)} "
                        f"{IMAGE_PLACEHOLDER} for {want} image(s)")
    for m in messages:
        for piece in m["content"].split(IMAGE_PLACEHOLDER):
            if piece.strip() and piece.strip() not in text:
                raise UserError(f"the chat template of {_checkpoint(processor)} dropped the text of a {m['role']} "
                                f"turn ({piece.strip()[:60]!r}); the kit cannot train or prompt with it")
    return text


@dataclass(frozen=True, eq=False)
class Chat:
    """How a checkpoint turns conversations into text and tokens: its processor (chat template, tokenizer, image
    processor) and the system prompt a conversation gets when it has none (None: no system turn). The two always
    travel together: what training encodes, what the scan measures and what eval prompts with must be one text.
    `processor` may be None where records are only checked (`data check` without a model): nothing is measured."""

    processor: Any
    system_prompt: str | None


def with_system(messages: list[dict], system_prompt: str | None) -> list[dict]:
    if system_prompt is None or (messages and messages[0]["role"] == "system"):
        return messages
    problem = system_prompt_error(system_prompt, "the system prompt")
    if problem:  # its <image> would take the place of a sample's image tokens
        raise UserError(problem)
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


def encode(sample: Sample, chat: Chat, image_sizes: list[tuple[int, int]]) -> dict:
    """{"input_ids", "labels"} for one sample; `image_sizes` are the (width, height) of its images in order."""
    from .processor import image_token_counts

    processor = chat.processor
    tok = processor.tokenizer
    if tok.convert_tokens_to_ids(END_OF_TURN) in (None, tok.unk_token_id):
        raise UserError(f"the tokenizer has no {END_OF_TURN} token; the kit expects Qwen ChatML (LLaVA-OneVision)")
    full, spans = supervised_spans(processor, with_system(sample.messages, chat.system_prompt))
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
    expanded = sum(image_token_counts(processor, image_sizes))
    if input_ids.count(processor.image_token_id) != expanded:
        raise UserError(f"{sample.source} id={sample.id!r}: encoded {input_ids.count(processor.image_token_id)} image "
                        f"tokens for {expanded} the processor expands its images to")
    return {"input_ids": input_ids, "labels": labels}


def prompt_text(chat: Chat, messages: list[dict]) -> str:
    """The generation prompt for the conversation up to (not including) its last answer."""
    msgs = with_system(messages, chat.system_prompt)
    if msgs[-1]["role"] == "assistant":
        msgs = msgs[:-1]
    return render(chat.processor, msgs, add_generation_prompt=True)


def _image_tokens(processor, sizes: list[tuple[int, int]]) -> int:
    """Total image tokens of one sample's images; memoised per processor (a data set has few distinct sizes)."""
    from .processor import image_token_counts

    cache = _COUNTS.setdefault(processor, {})
    # the grid is part of the key: data.max_image_tiles changes a processor's pinpoints after loading
    key = (tuple(tuple(z) for z in sizes), tuple(map(tuple, processor.image_processor.image_grid_pinpoints)))
    if key not in cache:
        if len(cache) > 100_000:
            cache.clear()
        cache[key] = sum(image_token_counts(processor, list(key[0])))
    return cache[key]


def token_lengths(chat: Chat, items: list[tuple[Sample, list[tuple[int, int]]]]) -> list[int]:
    """Exact `len(encode(sample)["input_ids"])` for many (sample, image sizes) at once: the same template render
    and segmentation as encode, one batched tokenizer call, and each `<image>` token counted as the image tokens
    the processor expands it to."""
    processor = chat.processor
    tok = processor.tokenizer
    segments, owner, out = [], [], []
    for k, (s, sizes) in enumerate(items):
        full, spans = supervised_spans(processor, with_system(s.messages, chat.system_prompt))
        cuts = [0] + [c for span in spans for c in span] + [len(full)]
        for a, b in zip(cuts, cuts[1:]):
            if b > a:
                segments.append(full[a:b])
                owner.append(k)
        out.append(_image_tokens(processor, sizes))
    if segments:
        image_id = processor.image_token_id
        for k, ids in zip(owner, tok(segments, add_special_tokens=False)["input_ids"]):
            out[k] += len(ids) - ids.count(image_id)  # each placeholder token is replaced by the image's tokens
    return out
