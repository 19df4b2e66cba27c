"""Answers from a model: load it for inference (a merged/full checkpoint, an adapter folder on its base, or a hub
id), the system prompt it was trained with, and greedy batched generation.

Prompts are sorted by length (text plus image tokens) so a batch pads little, padded on the left so every prompt ends
where its answer starts, and a batch never mixes image and text-only samples. The eval workflow around this is
run.py; vllm_backend.py generates the same answers with vLLM.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable

import torch

from ..data.encode import Chat, prompt_text
from ..data.files import size_fields
from ..data.records import Sample
from ..errors import UserError
from ..recipe import DataCfg
from ..recipe.load import RUN_RECIPE, read_run_recipe
from ..recipe.names import EVAL_BATCH_SIZE, MAX_NEW_TOKENS

log = logging.getLogger(__name__)

UNSET = object()  # "no system prompt given": take the run's own (None means: no system turn at all)


def resolve_system_prompt(model_path: str, explicit=UNSET) -> tuple[str | None, str]:
    """(system prompt, where it came from): `explicit` when given, else ``data.system_prompt`` of the training run's
    ``recipe.yaml`` in the model (or adapter) folder, else the recipe's default (``DataCfg.system_prompt``). A model
    is evaluated with the prompt it was trained with unless you say otherwise."""
    default = DataCfg.model_fields["system_prompt"].default
    if explicit is not UNSET:
        return explicit, "--system-prompt"
    recipe = read_run_recipe(model_path)
    if recipe is None:
        return default, "default"
    path = Path(model_path) / RUN_RECIPE
    if "system_prompt" in recipe.data.model_fields_set:
        return recipe.data.system_prompt, str(path)
    return recipe.data.system_prompt, f"{path} (the recipe default)"


def load_for_inference(model_path: str, base: str | None = None):
    """(model, processor) for a merged/full checkpoint, an adapter folder or a hub id."""
    from ..model.adapters import is_adapter_dir, load_with_adapter
    from ..model.load import compute_dtype, load_model
    from ..data.processor import apply_image_grid, cap_image_tiles, load_processor

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
    """`data.<key>` of the training run's recipe.yaml in the model (or adapter) folder, or None without one."""
    recipe = read_run_recipe(model_path)
    return None if recipe is None else getattr(recipe.data, key)


def load_images(sample: Sample) -> list:
    from ..data.images import ImageError, load_image

    out = []
    for p in sample.images:
        try:
            out.append(load_image(p))
        except ImageError as e:
            raise UserError(f"{sample.source} id={sample.id!r} field `images`: {e}") from None
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
    """The sizes batches are planned with. Only the order of the samples depends on them (a batch's answers equal
    one-at-a-time answers), so a record's pictures are taken to share its first one's size: a video's frames or a
    choice's candidates do, and RoboInter's val files hold ~300k frames whose headers need not be read one by one."""
    from ..data.images import image_size

    size = stated_size(s)
    if size and len(s.images) == 1:  # stated in the record: no header to read
        return [(int(size[0]), int(size[1]))]
    try:
        first = image_size(s.images[0])  # reads the header only
    except UserError:
        first = (384, 384)  # unreadable: load_images reports it when the batch is built
    return [first] * len(s.images)


def plan_batches(processor, samples: list[Sample], prompts: list[str], batch_size: int) -> list[list[int]]:
    """Indices of `samples` in batches of similar length (text + image tokens), each with one image count."""
    from ..data.processor import image_token_counts

    lengths = processor.tokenizer(prompts, add_special_tokens=False)["input_ids"]
    counts: dict[tuple, int] = {}  # a data set has few image sizes: each is counted once, not once per record
    keys = []
    for i, s in enumerate(samples):
        sizes = tuple(_image_sizes(s)) if s.images else ()
        if sizes not in counts:
            try:
                counts[sizes] = sum(image_token_counts(processor, list(sizes))) if sizes else 0
            except Exception:  # an odd processor: group by text length alone rather than fail the run
                counts[sizes] = 0
        keys.append((len(s.images), len(lengths[i]) + counts[sizes], i))
    batches: list[list[int]] = []
    for n_img, _, i in sorted(keys):
        if batches and len(batches[-1]) < batch_size and len(samples[batches[-1][0]].images) == n_img:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def predict_samples(model, chat: Chat, samples: list[Sample], batch_size: int = EVAL_BATCH_SIZE,
                    max_new_tokens: int = MAX_NEW_TOKENS, progress: bool = True,
                    on_batch: Callable[[list[int], list[str]], None] | None = None, done: int = 0) -> list[str]:
    """Answers for `samples` in their order; `on_batch(indices, answers)` is called after every batch. The next
    batch's images are read while the model answers this one (a task-planning record has 8 frames to decode)."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm.auto import tqdm

    processor = chat.processor
    log.info("preparing %d prompts and their batches", len(samples))  # about a minute for RoboInter's val files
    prompts = [prompt_text(chat, s.messages) for s in samples]
    preds: dict[int, str] = {}
    bar = tqdm(total=done + len(samples), initial=done, desc="generating", unit="rec", disable=not progress)
    start = time.perf_counter()
    batches = plan_batches(processor, samples, prompts, batch_size)
    read = lambda idx: [load_images(samples[i]) for i in idx]  # noqa: E731
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(read, batches[0]) if batches else None
        for k, idx in enumerate(batches):
            images = pending.result()  # an unreadable image: its one-line error, raised here
            pending = pool.submit(read, batches[k + 1]) if k + 1 < len(batches) else None
            answers = generate(model, processor, [prompts[i] for i in idx], images, max_new_tokens)
            preds.update(zip(idx, answers))
            if on_batch:
                on_batch(idx, answers)
            bar.update(len(idx))
            bar.set_postfix(rec_s=f"{len(preds) / (time.perf_counter() - start):.2f}")
    bar.close()
    return [preds[i] for i in range(len(samples))]


def stated_size(s: Sample) -> tuple[float, float] | None:
    """(width, height) of the image as the record states it: `width` / `height` (the kit's records), else `w` / `h`
    (RoboInter's), else None."""
    keys = size_fields(s.extra)
    return (s.extra[keys[0]], s.extra[keys[1]]) if keys and all(s.extra.get(k) is not None for k in keys) else None


def eval_record(s: Sample, pred: str, dataset: str, task: str | None = None) -> dict:
    """The record the scorer reads: the last answer of the conversation is the ground truth; the image size the
    record states (either spelling) as `w` / `h`, so distances are also reported in pixels."""
    rec = {"id": s.id, "pred": pred, "gt": s.messages[-1]["content"], "dataset": dataset,
           "prompt": s.messages[-2]["content"] if len(s.messages) > 1 else ""}
    task = s.extra.get("task") or task
    if task:
        rec["task"] = task
    size = stated_size(s)
    if size:
        rec["w"], rec["h"] = size
    return rec
