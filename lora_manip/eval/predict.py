"""`lora-manip predict`: one image, one question, one answer (optionally drawn on the image)."""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError


def predict_one(model_path: str, image: str, question: str, draw: str | None = None,
                max_new_tokens: int = 128, system_prompt: str | None = "You are a helpful assistant.") -> str:
    from PIL import Image

    from ..data.encode import prompt_text
    from .draw import draw_overlay
    from .generate import generate, load_for_inference
    from .parse import infer_task, parse_answer

    try:
        with Image.open(image) as im:
            img = im.convert("RGB")
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read image {image} ({e})") from None
    model, processor = load_for_inference(model_path)
    text = question if "<image>" in question else f"<image>\n{question}"
    prompt = prompt_text(processor, [{"role": "user", "content": text}], system_prompt)
    answer, = generate(model, processor, [prompt], [[img]], max_new_tokens)
    if draw:
        kind = infer_task(answer)
        parsed = parse_answer(answer, kind)
        if kind not in ("box", "point", "trajectory") or parsed.error:
            raise UserError(f"answer {answer!r} is not a box, point or trajectory; nothing to draw")
        out = draw_overlay(img, kind, None, parsed.value)
        tmp = Path(draw).with_name(f".{Path(draw).name}.tmp.png")
        out.save(tmp)
        tmp.replace(draw)
    return answer
