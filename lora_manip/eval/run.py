"""`lora-manip eval`: the whole evaluation of one model on one annotation file. Checks the request, loads the
records, generates the answers not made yet (generate.py, or vllm_backend.py), scores them (score.py) and writes
predictions.jsonl, metrics.json, scores.jsonl and overlays.

The model is a merged/full checkpoint, an adapter folder (loaded onto its base) or a bare base model. With ``out_dir``
every batch's answers are appended to ``predictions.jsonl`` as soon as they exist (resume.py), so an interrupted run
continues where it stopped (``resume=True``).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from contextlib import nullcontext
from pathlib import Path

from ..data.records import Sample, load_samples
from ..errors import UserError
from .generate import UNSET, eval_record, load_for_inference, predict_samples, resolve_system_prompt

log = logging.getLogger(__name__)

BACKENDS = ("hf", "vllm")
EVAL_OUTPUTS = ("predictions.jsonl", "predictions.meta.json", "metrics.json", "scores.jsonl")
_FULL_DISK = ("the answers made so far are kept in predictions.jsonl: free space and continue with --resume (the "
              "same command plus --resume)")


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

    if resume and not out_dir:
        raise UserError("--resume continues the eval in --out; pass --out DIR")
    if backend not in BACKENDS:
        raise UserError(f"--backend {backend}: choose one of {', '.join(BACKENDS)}")
    from .score import settings_problem

    problem = settings_problem(upstream_compatible, point_threshold, coords)
    if problem:
        raise UserError(problem)
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
