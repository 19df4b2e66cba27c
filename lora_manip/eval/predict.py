"""`lora-manip predict`: one image, one question, one answer (optionally drawn on the image)."""

from __future__ import annotations

import io
import logging
from pathlib import Path

from ..errors import UserError
from ..fsutil import atomic_write_bytes
from .generate import UNSET

log = logging.getLogger(__name__)


def predict_one(model_path: str, image: str, question: str, draw: str | None = None, max_new_tokens: int = 128,
                system_prompt=UNSET, coords: str = "normalized", force: bool = False) -> str:
    """The model's answer. `system_prompt`: as `eval` (the run's recipe.yaml, else the default); `coords`: how the
    answer's coordinates are read when drawing it; `force`: replace an existing `draw` file."""
    from PIL import Image

    from ..data.encode import prompt_text
    from .draw import draw_overlay
    from .generate import generate, load_for_inference, resolve_system_prompt
    from ..answers.geometry import COORDS
    from ..answers.kinds import classify_task
    from ..answers.parse import parse_answer
    from .safety import check_model

    if coords not in COORDS:
        raise UserError(f"--coords {coords}: choose one of {', '.join(COORDS)}")
    if draw and Path(draw).expanduser().resolve() == Path(image).expanduser().resolve():
        raise UserError(f"--draw {draw} is the input image; choose another file (the input is never overwritten)")
    if draw and Path(draw).is_dir():
        raise UserError(f"--draw {draw} is a folder; give the image file to write")
    if draw and Path(draw).exists() and not force:
        raise UserError(f"--draw {draw} already exists; pass --force to replace it, or choose another file")
    try:
        with Image.open(image) as im:
            img = im.convert("RGB")
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read image {image} ({e})") from None
    check_model(model_path)
    prompt, source = resolve_system_prompt(model_path, system_prompt)
    log.info("system prompt (from %s): %r", source, prompt)
    model, processor = load_for_inference(model_path)
    text = question if "<image>" in question else f"<image>\n{question}"
    answer, = generate(model, processor, [prompt_text(processor, [{"role": "user", "content": text}], prompt)],
                       [[img]], max_new_tokens)
    if draw:
        kind = classify_task(None, answer).kind
        parsed = parse_answer(answer, kind, coords, img.size) if kind in ("box", "point", "trajectory") else None
        if parsed is None or parsed.error:
            raise UserError(f"answer {answer!r} is not a box, point or trajectory; nothing to draw")
        out = draw_overlay(img, kind, None, parsed.value)
        buf = io.BytesIO()  # the format the file's name asks for (out.jpg is a JPEG), PNG for unknown names
        out.save(buf, format=Image.registered_extensions().get(Path(draw).suffix.lower(), "PNG"))
        atomic_write_bytes(draw, buf.getvalue())
    return answer
