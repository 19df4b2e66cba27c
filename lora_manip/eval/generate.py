"""Batched greedy generation with a merged/full checkpoint, an adapter folder (loaded onto its base) or a bare base
model, and `lora-manip eval` = generation followed by scoring (eval/score.py)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..data.encode import prompt_text
from ..data.records import Sample, load_samples
from ..errors import UserError

log = logging.getLogger(__name__)


def load_for_inference(model_path: str, base: str | None = None):
    """(model, processor) for a merged/full checkpoint, an adapter folder or a hub id."""
    from ..model.adapters import is_adapter_dir, load_with_adapter
    from ..model.load import compute_dtype, load_model
    from ..model.processor import load_processor

    if is_adapter_dir(model_path):
        model, base = load_with_adapter(model_path, base, dtype="bfloat16")
        has_proc = (Path(model_path) / "processor_config.json").is_file()
        processor = load_processor(model_path if has_proc else base)
    else:
        model = load_model(model_path, dtype="bfloat16")
        processor = load_processor(model_path)
    if torch.cuda.is_available():
        model.to("cuda")
    model.eval()
    log.info("inference dtype %s", compute_dtype("bfloat16"))
    return model, processor


def _images(sample: Sample):
    from PIL import Image

    out = []
    for p in sample.images:
        try:
            with Image.open(p) as im:
                out.append(im.convert("RGB"))
        except (OSError, ValueError) as e:
            raise UserError(f"{sample.source} id={sample.id!r} field `images`: cannot read {p} ({e})") from None
    return out


@torch.no_grad()
def generate(model, processor, prompts: list[str], images: list[list], max_new_tokens: int) -> list[str]:
    """Greedy answers for one batch; every sample of a batch has images or none does."""
    kwargs = dict(text=prompts, padding=True, return_tensors="pt")
    if images and images[0]:
        kwargs["images"] = images
    inputs = processor(**kwargs).to(model.device)
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=processor.tokenizer.pad_token_id)
    new = out[:, inputs["input_ids"].shape[1]:]
    return [t.strip() for t in processor.batch_decode(new, skip_special_tokens=True)]


def predict_samples(model, processor, samples: list[Sample], system_prompt: str | None, batch_size: int = 8,
                    max_new_tokens: int = 256, progress: bool = True) -> list[str]:
    from tqdm.auto import tqdm

    preds: dict[int, str] = {}
    # Batches never mix image and text-only samples (the processor takes one layout per call).
    order = sorted(range(len(samples)), key=lambda i: (not samples[i].images, len(samples[i].images)))
    bar = tqdm(total=len(samples), desc="generating", disable=not progress)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        groups: dict[int, list[int]] = {}
        for i in idx:
            groups.setdefault(len(samples[i].images), []).append(i)
        for group in groups.values():
            prompts = [prompt_text(processor, samples[i].messages, system_prompt) for i in group]
            answers = generate(model, processor, prompts, [_images(samples[i]) for i in group], max_new_tokens)
            preds.update(zip(group, answers))
        bar.update(len(idx))
    bar.close()
    return [preds[i] for i in range(len(samples))]


def eval_records(samples: list[Sample], preds: list[str], dataset: str) -> list[dict]:
    """The records the scorer reads: the last answer of each conversation is the ground truth."""
    out = []
    for s, p in zip(samples, preds):
        rec = {"id": s.id, "pred": p, "gt": s.messages[-1]["content"], "dataset": dataset,
               "prompt": s.messages[-2]["content"] if len(s.messages) > 1 else ""}
        if "task" in s.extra:
            rec["task"] = s.extra["task"]
        if "width" in s.extra and "height" in s.extra:
            rec["w"], rec["h"] = s.extra["width"], s.extra["height"]
        out.append(rec)
    return out


def write_overlays(out_dir: str, rows: list[dict], samples: list[Sample], k: int = 16) -> Path | None:
    """PNG overlays (ground truth green, prediction red) for the first `k` grounding records, plus a contact sheet."""
    from PIL import Image

    from ..fsutil import atomic_dir
    from .draw import contact_sheet, draw_overlay

    picked = [(r, s) for r, s in zip(rows, samples) if r["kind"] in ("box", "point", "trajectory") and s.images][:k]
    if not picked:
        return None
    folder = Path(out_dir) / "overlays"
    with atomic_dir(folder, force=True) as tmp:
        images = []
        for r, s in picked:
            with Image.open(s.images[0]) as im:
                img = draw_overlay(im.convert("RGB"), r["kind"], r["gt"], r["pred"])
            img.save(tmp / f"{_safe(r['id'])}.png")
            images.append(img)
        contact_sheet(images).save(tmp / "contact_sheet.png")
    return folder


def _safe(name) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(name))[:100]


def run_eval(model_path: str, data: str, data_root: str | None = None, out_dir: str | None = None,
             limit: int | None = None, batch_size: int = 8, max_new_tokens: int = 256,
             system_prompt: str | None = "You are a helpful assistant.", upstream_compatible: bool = False,
             base: str | None = None):
    """Generate answers for an annotation file and score them. Returns (rows, summary)."""
    from .score import score_records, write_outputs

    samples, problems = load_samples(data, data_root or str(Path(data).parent))
    if problems:
        raise UserError(f"{len(problems)} bad record(s) in {data}, first: {problems[0]}")
    samples = samples[:limit] if limit else samples
    model, processor = load_for_inference(model_path, base)
    preds = predict_samples(model, processor, samples, system_prompt, batch_size, max_new_tokens)
    records = eval_records(samples, preds, Path(data).stem)
    try:
        rows, summary = score_records(records, upstream_compatible=upstream_compatible)
    except ValueError as e:
        raise UserError(f"{data}: {e}") from None
    for row, rec in zip(rows, records):
        row["prompt"] = rec["prompt"]
    summary["model"] = str(model_path)
    if out_dir:
        write_outputs(out_dir, rows, summary)
        write_overlays(out_dir, rows, samples)
    return rows, summary
