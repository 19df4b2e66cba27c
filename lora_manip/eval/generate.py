"""`lora-manip eval`: generate answers with a merged/full checkpoint, an adapter folder (loaded onto its base) or a
bare base model, then score them (score.py).

Generation is greedy and batched: prompts are sorted by length (text plus image tokens) so a batch pads little,
padded on the left so every prompt ends where its answer starts, and never mix image and text-only samples. With
``out_dir`` every batch's answers are appended to ``predictions.jsonl`` as soon as they exist (resume.py), so an
interrupted run continues where it stopped (``resume=True``). ``backend="vllm"`` hands generation to vLLM instead and
writes the same file.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

import torch

from ..data.encode import prompt_text
from ..data.records import Sample, load_samples
from ..errors import UserError

log = logging.getLogger(__name__)

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
UNSET = object()  # "no system prompt given": take the run's own (None means: no system turn at all)
BACKENDS = ("hf", "vllm")
EVAL_OUTPUTS = ("predictions.jsonl", "predictions.meta.json", "metrics.json", "scores.jsonl")
_FULL_DISK = ("the answers made so far are kept in predictions.jsonl: free space and continue with --resume (the "
              "same command plus --resume)")


def resolve_system_prompt(model_path: str, explicit=UNSET) -> tuple[str | None, str]:
    """(system prompt, where it came from): `explicit` when given, else ``data.system_prompt`` of the training run's
    ``recipe.yaml`` in the model (or adapter) folder, else the LLaVA-OneVision default. A model is evaluated with
    the prompt it was trained with unless you say otherwise."""
    if explicit is not UNSET:
        return explicit, "--system-prompt"
    recipe = Path(model_path) / "recipe.yaml"
    if recipe.is_file():
        import yaml

        try:
            data = (yaml.safe_load(recipe.read_text(encoding="utf-8")) or {}).get("data") or {}
        except (OSError, yaml.YAMLError, AttributeError) as e:
            raise UserError(f"{recipe}: cannot read the training run's recipe ({e}); pass --system-prompt") from None
        if "system_prompt" in data:
            return data["system_prompt"], str(recipe)
        return DEFAULT_SYSTEM_PROMPT, f"{recipe} (the recipe default)"
    return DEFAULT_SYSTEM_PROMPT, "default"


def load_for_inference(model_path: str, base: str | None = None):
    """(model, processor) for a merged/full checkpoint, an adapter folder or a hub id."""
    from ..model.adapters import is_adapter_dir, load_with_adapter
    from ..model.load import compute_dtype, load_model
    from ..model.processor import apply_image_grid, cap_image_tiles, load_processor

    if is_adapter_dir(model_path):
        from .safety import adapter_fit_error

        try:
            model, base = load_with_adapter(model_path, base, dtype="bfloat16")
        except UserError as e:
            raise adapter_fit_error(e, model_path) from None
        has_proc = (Path(model_path) / "processor_config.json").is_file()
        processor = load_processor(model_path if has_proc else base)
    else:
        model = load_model(model_path, dtype="bfloat16")
        processor = load_processor(model_path)
    tiles = run_data_setting(model_path, "max_image_tiles")
    if tiles:  # trained with capped anyres: generate with the same grid
        cap_image_tiles(processor, tiles)
        apply_image_grid(model, processor)
        log.info("anyres capped at %d tiles per image (data.max_image_tiles of %s/recipe.yaml)", tiles, model_path)
    if torch.cuda.is_available():
        model.to("cuda")
    model.eval()
    log.info("inference dtype %s", compute_dtype("bfloat16"))
    return model, processor


def run_data_setting(model_path: str, key: str):
    """`data.<key>` of the training run's recipe.yaml in the model (or adapter) folder, or None."""
    import yaml

    recipe = Path(model_path) / "recipe.yaml"
    if not recipe.is_file():
        return None
    try:
        data = (yaml.safe_load(recipe.read_text(encoding="utf-8")) or {}).get("data") or {}
    except (yaml.YAMLError, UnicodeDecodeError, AttributeError) as e:
        raise UserError(f"{recipe}: not a readable recipe ({str(e).splitlines()[0]})") from None
    return data.get(key) if isinstance(data, dict) else None


def load_images(sample: Sample) -> list:
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
    """Greedy answers for one batch; every sample of a batch has the same number of images."""
    processor.tokenizer.padding_side = "left"  # right padding would put pad tokens between a prompt and its answer
    kwargs = dict(text=prompts, padding=True, return_tensors="pt")
    if images and images[0]:
        kwargs["images"] = images
    inputs = processor(**kwargs).to(model.device)
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                         pad_token_id=processor.tokenizer.pad_token_id)
    new = out[:, inputs["input_ids"].shape[1]:]
    return [t.strip() for t in processor.batch_decode(new, skip_special_tokens=True)]


def _image_sizes(s: Sample) -> list[tuple[int, int]]:
    from PIL import Image

    if s.size and len(s.images) == 1:
        return [tuple(s.size)]
    sizes = []
    for p in s.images:
        try:
            with Image.open(p) as im:  # reads the header only
                sizes.append(im.size)
        except (OSError, ValueError):
            sizes.append((384, 384))  # unreadable: load_images reports it when the batch is built
    return sizes


def plan_batches(processor, samples: list[Sample], prompts: list[str], batch_size: int) -> list[list[int]]:
    """Indices of `samples` in batches of similar length (text + image tokens), each with one image count."""
    from ..model.processor import image_token_counts

    lengths = processor.tokenizer(prompts, add_special_tokens=False)["input_ids"]
    keys = []
    for i, s in enumerate(samples):
        try:
            n_image = sum(image_token_counts(processor, _image_sizes(s))) if s.images else 0
        except Exception:  # an odd processor: group by text length alone rather than fail the run
            n_image = 0
        keys.append((len(s.images), len(lengths[i]) + n_image, i))
    batches: list[list[int]] = []
    for n_img, _, i in sorted(keys):
        if batches and len(batches[-1]) < batch_size and len(samples[batches[-1][0]].images) == n_img:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def predict_samples(model, processor, samples: list[Sample], system_prompt: str | None, batch_size: int = 8,
                    max_new_tokens: int = 256, progress: bool = True,
                    on_batch: Callable[[list[int], list[str]], None] | None = None, done: int = 0) -> list[str]:
    """Answers for `samples` in their order; `on_batch(indices, answers)` is called after every batch."""
    from tqdm.auto import tqdm

    prompts = [prompt_text(processor, s.messages, system_prompt) for s in samples]
    preds: dict[int, str] = {}
    bar = tqdm(total=done + len(samples), initial=done, desc="generating", unit="rec", disable=not progress)
    start = time.perf_counter()
    for idx in plan_batches(processor, samples, prompts, batch_size):
        answers = generate(model, processor, [prompts[i] for i in idx], [load_images(samples[i]) for i in idx],
                           max_new_tokens)
        preds.update(zip(idx, answers))
        if on_batch:
            on_batch(idx, answers)
        bar.update(len(idx))
        bar.set_postfix(rec_s=f"{len(preds) / (time.perf_counter() - start):.2f}")
    bar.close()
    return [preds[i] for i in range(len(samples))]


def eval_record(s: Sample, pred: str, dataset: str, task: str | None = None) -> dict:
    """The record the scorer reads: the last answer of the conversation is the ground truth."""
    rec = {"id": s.id, "pred": pred, "gt": s.messages[-1]["content"], "dataset": dataset,
           "prompt": s.messages[-2]["content"] if len(s.messages) > 1 else ""}
    task = s.extra.get("task") or task
    if task:
        rec["task"] = task
    if "width" in s.extra and "height" in s.extra:
        rec["w"], rec["h"] = s.extra["width"], s.extra["height"]
    return rec


def eval_records(samples: list[Sample], preds: list[str], dataset: str, task: str | None = None) -> list[dict]:
    return [eval_record(s, p, dataset, task) for s, p in zip(samples, preds)]


def write_overlays(out_dir: str, pairs: list[tuple[dict, Sample]], k: int = 16) -> Path | None:
    """PNG overlays (ground truth green, prediction red) for the first `k` grounding records, plus a contact sheet."""
    from PIL import Image

    from ..fsutil import atomic_dir
    from .draw import contact_sheet, draw_overlay

    picked = [(r, s) for r, s in pairs if r["kind"] in ("box", "point", "trajectory") and s.images][:k]
    if not picked:
        return None
    folder = Path(out_dir) / "overlays"
    with atomic_dir(folder, force=True) as tmp:
        images = []
        for r, s in picked:
            with Image.open(s.images[0]) as im:
                img = draw_overlay(im.convert("RGB"), r["kind"], r["gt"], r.get("pred"))
            img.save(tmp / f"{_safe(r['id'])}.png")
            images.append(img)
        contact_sheet(images).save(tmp / "contact_sheet.png")
    return folder


def _safe(name) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(name))[:100]


def _keyed(ids: list[str]) -> list[tuple[str, int]]:
    """(id, occurrence) for every id: resume and matching work even when a data set repeats an id."""
    seen: Counter = Counter()
    out = []
    for i in ids:
        out.append((i, seen[i]))
        seen[i] += 1
    return out


def run_eval(model_path: str, data: str, data_root: str | None = None, out_dir: str | None = None,
             limit: int | None = None, batch_size: int = 8, max_new_tokens: int = 256, system_prompt=UNSET,
             upstream_compatible: bool = False, base: str | None = None, *, task_map: dict | None = None,
             coords: str = "normalized", point_threshold: float = 0.05, backend: str = "hf", resume: bool = False,
             force: bool = False, progress: bool = True):
    """Generate answers for an annotation file and score them. Returns (rows, summary).

    With `out_dir`: ``predictions.jsonl`` (appended per batch), ``predictions.meta.json``, ``metrics.json``,
    ``scores.jsonl`` and ``overlays/``. An existing eval there is refused unless `resume` (continue it; the model
    and settings must match) or `force` (start over). `system_prompt`: see `resolve_system_prompt`.
    """
    from .safety import check_model, check_out_folder, results_folder

    if backend not in BACKENDS:
        raise UserError(f"--backend {backend}: choose one of {', '.join(BACKENDS)}")
    from ..answers.geometry import COORDS

    if coords not in COORDS:
        raise UserError(f"--coords {coords}: choose one of {', '.join(COORDS)}")
    if upstream_compatible and coords != "normalized":
        raise UserError("--coords applies to the strict scorer; --upstream-compatible reads coordinates as upstream "
                        "does")
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    if limit is not None and limit < 1:  # a slice would drop records (-1) or keep them all (0)
        raise UserError(f"--limit must be at least 1 (the number of records to evaluate), got {limit}")
    if backend == "vllm":
        from .vllm_backend import require_vllm

        require_vllm()
    check_model(model_path)
    if out_dir:
        check_out_folder(out_dir, inputs={"model folder": model_path})
    samples, problems = load_samples(data, data_root or str(Path(data).parent))
    if problems:
        raise UserError(f"{len(problems)} bad record(s) in {data}, first: {problems[0]}")
    if not samples:
        raise UserError(f"{data}: no records to evaluate (the annotation file is empty)")
    samples = samples[:limit] if limit else samples
    prompt, prompt_from = resolve_system_prompt(model_path, system_prompt)
    log.info("system prompt (from %s): %r", prompt_from, prompt)
    owner = results_folder(out_dir, "lora-manip eval", EVAL_OUTPUTS, ("overlays",), _FULL_DISK) if out_dir \
        else nullcontext()
    with owner:
        return _generate_and_score(model_path, data, data_root, out_dir, samples, prompt, prompt_from, limit=limit,
                                   batch_size=batch_size, max_new_tokens=max_new_tokens,
                                   upstream_compatible=upstream_compatible, base=base, task_map=task_map,
                                   coords=coords, point_threshold=point_threshold, backend=backend, resume=resume,
                                   force=force, progress=progress)


def _generate_and_score(model_path, data, data_root, out_dir, samples, prompt, prompt_from, *, limit, batch_size,
                        max_new_tokens, upstream_compatible, base, task_map, coords, point_threshold, backend,
                        resume, force, progress):
    from ..answers.kinds import task_from_filename
    from .report import check_outputs, write_outputs
    from .resume import PredictionLog, model_identity
    from .score import score_records

    dataset, file_task = Path(data).stem, task_from_filename(str(data))
    model_id, fingerprint = model_identity(model_path)
    plog = None
    if out_dir:
        check_outputs(out_dir, True, inputs=[data], names=("predictions.jsonl", "metrics.json", "scores.jsonl"))
        meta = {"model": model_id, "model_fingerprint": fingerprint, "base": base, "data": str(Path(data).resolve()),
                "limit": limit, "system_prompt": prompt, "system_prompt_from": prompt_from,
                "max_new_tokens": max_new_tokens, "backend": backend}
        plog = PredictionLog(out_dir, meta, resume=resume, force=force)
    keys = _keyed([s.id for s in samples])
    done_keys = set(_keyed([str(r["id"]) for r in plog.records])) if plog else set()
    todo = [s for s, k in zip(samples, keys) if k not in done_keys]
    made: list[dict] = []

    def keep(batch: list[dict]) -> None:
        (plog.append if plog else made.extend)(batch)

    if todo:
        t0 = time.perf_counter()
        if backend == "vllm":
            from .vllm_backend import generate_vllm

            generate_vllm(model_path, todo, prompt, max_new_tokens, lambda idx, ans: keep(
                [eval_record(todo[i], a, dataset, file_task) for i, a in zip(idx, ans)]), progress, len(done_keys))
        else:
            model, processor = load_for_inference(model_path, base)
            predict_samples(model, processor, todo, prompt, batch_size, max_new_tokens, progress,
                            lambda idx, ans: keep([eval_record(todo[i], a, dataset, file_task)
                                                   for i, a in zip(idx, ans)]), len(done_keys))
        dt = time.perf_counter() - t0
        log.info("generated %d answers in %.1f s (%.2f records/s, %s backend)", len(todo), dt, len(todo) / dt, backend)
    if plog:
        plog.close()
    by_key = dict(zip(_keyed([str(r["id"]) for r in (plog.records if plog else made)]),
                      plog.records if plog else made))
    records = [by_key[k] for k in keys]
    try:
        rows, summary = score_records(records, upstream_compatible, point_threshold, task_map, coords,
                                      [data_root or Path(data).parent])
    except ValueError as e:
        raise UserError(str(e)) from None
    prompts = {k: r.get("prompt", "") for k, r in zip(keys, records)}
    row_keys = _keyed([str(r["id"]) for r in rows])
    for row, k in zip(rows, row_keys):
        row["prompt"] = prompts.get(k, "")
    summary.update(model=str(model_path), system_prompt=prompt, system_prompt_from=prompt_from, backend=backend,
                   max_new_tokens=max_new_tokens)
    if out_dir:
        write_outputs(out_dir, rows, summary)
        sample_by_key = dict(zip(keys, samples))
        write_overlays(out_dir, [(r, sample_by_key[k]) for r, k in zip(rows, row_keys) if k in sample_by_key])
    return rows, summary
