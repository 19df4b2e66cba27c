"""`lora-manip eval`: the whole evaluation of one model on one or more annotation files, with one model load.
Checks the request (the files, their images, the flags), loads the records, generates the answers not made yet
(generate.py, or vllm_backend.py) with one progress bar over every file, scores them (score.py) and writes
predictions.jsonl, metrics.json (per file and overall), scores.jsonl and overlays; `--table` adds a published table's
layout (table.py). `lora-manip predict` (`predict_one`: one image, one question) shares its loading, prompt and
generation.

The model is a merged/full checkpoint, an adapter folder (loaded onto its base) or a bare base model. With ``out_dir``
every batch's answers are appended to ``predictions.jsonl`` as soon as they exist (resume.py), so an interrupted run
continues where it stopped (``resume=True``); a run that fails before its first answer leaves nothing behind.
"""

from __future__ import annotations

import io
import logging
import os
import signal
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..answers.geometry import DEFAULT_COORDS
from ..data.encode import Chat, prompt_text
from ..data.records import Sample, load_samples
from ..errors import STOPPED_EXIT, UserError
from ..recipe.names import EVAL_BACKENDS, EVAL_BATCH_SIZE, MAX_NEW_TOKENS, POINT_THRESHOLD
from .generate import UNSET, eval_record, load_for_inference, predict_samples, resolve_system_prompt

log = logging.getLogger(__name__)

EVAL_OUTPUTS = ("predictions.jsonl", "predictions.meta.json", "metrics.json", "scores.jsonl")
# Signals that stop an eval as Ctrl-C does (the answers made kept, one line, --resume): SIGTERM (a scheduler, `kill`),
# SIGHUP (a closed ssh session) and SIGUSR1 (SLURM's warning before a time limit, on which training stops too).
STOP_SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGHUP", "SIGUSR1") if hasattr(signal, n))
_FULL_DISK = ("the answers made so far are kept in predictions.jsonl: free space and continue with --resume (the "
              "same command plus --resume)")


def write_overlays(out_dir: str, pairs: list[tuple[dict, Sample]], k: int = 16) -> Path | None:
    """PNG overlays (ground truth green, prediction red) for the first `k` grounding records, plus a contact sheet."""
    from ..data.images import load_image
    from ..outputs import RESULTS, atomic_dir
    from .draw import contact_sheet, draw_overlay

    picked = [(r, s) for r, s in pairs if r["kind"] in ("box", "point", "trajectory") and s.images][:k]
    if not picked:
        return None
    folder = Path(out_dir) / "overlays"
    with atomic_dir(folder, force=True, kind=RESULTS) as tmp:
        images = []
        for r, s in picked:
            img = draw_overlay(load_image(s.images[0]), r["kind"], r["gt"], r.get("pred"))
            img.save(tmp / f"{_safe(r['id'])}.png")
            images.append(img)
        contact_sheet(images).save(tmp / "contact_sheet.png")
    return folder


def _safe(name) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(name))[:100]


@dataclass(frozen=True)
class EvalSettings:
    """How `lora-manip eval` (and `predict`) generate and read answers: one field per command-line option, with the
    same defaults (each stated once, in recipe/names.py and answers/geometry.py)."""

    limit: int | None = None  # evaluate only the first N records of each file
    batch_size: int = EVAL_BATCH_SIZE
    max_new_tokens: int = MAX_NEW_TOKENS
    system_prompt: Any = UNSET  # UNSET: the run's own (see resolve_system_prompt); None: no system turn
    base: str | None = None  # base model of an adapter (default: the one its adapter_config.json names)
    upstream_compatible: bool = False  # score as RoboInter's / RoboPoint's scripts do
    task_map: dict | None = None  # {task name: kind}, over the built-in names
    coords: str = DEFAULT_COORDS  # units of the predicted coordinates
    point_threshold: float = POINT_THRESHOLD
    backend: str = EVAL_BACKENDS[0]
    resume: bool = False  # continue the eval in out_dir (same model and settings)
    force: bool = False  # start over in an out_dir that holds an eval (predict: replace the --draw file)
    progress: bool = True  # a progress bar while generating
    table: str | None = None  # also a published table's layout (table.py's TABLES), both scorers side by side


def run_eval(model_path: str, data: str | list[str], data_root: str | None = None, out_dir: str | None = None,
             settings: EvalSettings | None = None, split: str | None = None, registry: str | None = None):
    """Generate answers for one or more annotation files with one model load and score them. Returns (rows,
    summary).

    `data`: annotation files or dataset names of the registry (`registry`, else LORA_MANIP_REGISTRY); `split`: also
    every registry dataset named ``*_<split>`` (sources.py). `data_root`: the folder every file's image paths start
    at (default: a registry dataset's data_path, a file's own folder). With `out_dir`: ``predictions.jsonl``
    (appended per batch), ``predictions.meta.json``, ``metrics.json``, ``scores.jsonl`` and ``overlays/``. An
    existing eval there is refused unless `settings.resume` (continue it; the model and settings must match) or
    `settings.force` (start over). A stop signal (STOP_SIGNALS) ends it as Ctrl-C does: the answers made are kept
    (exit STOPPED_EXIT, continue with --resume), or, before the first, nothing is left behind (exit 128 + signal).
    """
    try:
        with _stop_on_signals():
            return _run_eval(model_path, data, data_root, out_dir, settings, split, registry)
    except Stopped as e:
        raise _stopped(e, out_dir) from None


def _run_eval(model_path: str, data: str | list[str], data_root: str | None, out_dir: str | None,
              settings: EvalSettings | None, split: str | None, registry: str | None):
    from ..outputs import check_results, results_folder
    from .safety import check_model
    from .sources import missing_images, resolve_data
    from .table import table_problem

    cfg = settings or EvalSettings()
    model_path = os.path.expanduser(model_path)  # the shell leaves `~` in quotes and after `--opt=`; hub ids have none
    if cfg.resume and not out_dir:
        raise UserError("--resume continues the eval in --out; pass --out DIR")
    if cfg.backend not in EVAL_BACKENDS:
        raise UserError(f"--backend {cfg.backend}: choose one of {', '.join(EVAL_BACKENDS)}")
    from .score import settings_problem

    problem = settings_problem(cfg.upstream_compatible, cfg.point_threshold, cfg.coords) or table_problem(cfg.table)
    if problem:
        raise UserError(problem)
    if cfg.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {cfg.batch_size}")
    if cfg.limit is not None and cfg.limit < 1:  # a slice would drop records (-1) or keep them all (0)
        raise UserError(f"--limit must be at least 1 (the number of records to evaluate), got {cfg.limit}")
    if cfg.backend == "vllm":
        from .vllm_backend import require_vllm

        require_vllm()
    check_model(model_path)
    sources = resolve_data([data] if isinstance(data, str) else list(data), split, registry, data_root)
    files = [src.path for src in sources]
    if out_dir:  # resolved once; refused before any work when it is a file, the model, not a results folder
        out_dir = str(check_results(out_dir, EVAL_OUTPUTS, folders={"model folder": model_path}, files=files))
    samples = []
    for src in sources:
        got, problems = load_samples(src.path, src.root)
        if problems:
            raise UserError(f"{len(problems)} bad record(s) in {src.path}, first: {problems[0]}")
        if not got:
            raise UserError(f"{src.path}: no records to evaluate (the annotation file is empty)")
        samples.append(got[:cfg.limit] if cfg.limit else got)
    missing = missing_images(sources, samples)  # before the model loads: a wrong root costs seconds, not a load
    if missing:
        raise UserError(missing)
    if cfg.backend == "vllm":  # before any output is made: a record vLLM would tile unlike training is refused
        from .vllm_backend import check_single_image

        check_single_image([s for group in samples for s in group])
    prompt, prompt_from = resolve_system_prompt(model_path, cfg.system_prompt)
    log.info("system prompt (from %s): %r", prompt_from, prompt)
    owner = results_folder(out_dir, "lora-manip eval", EVAL_OUTPUTS, ("overlays",), _FULL_DISK,
                           keep=("predictions.jsonl",)) if out_dir else nullcontext()
    with owner:
        return _generate_and_score(model_path, sources, out_dir, samples, prompt_from,
                                   replace(cfg, system_prompt=prompt))


def _generate_and_score(model_path: str, sources: list, out_dir: str | None, groups: list[list[Sample]],
                        prompt_from: str, cfg: EvalSettings):
    """The eval once its request is checked; `cfg.system_prompt` is resolved (`prompt_from` says from where)."""
    from ..answers.kinds import task_from_filename
    from ..outputs import check_results
    from .report import write_outputs
    from .resume import PredictionLog, record_keys, run_identity
    from .score import score_records, table_summary

    prompt, max_new_tokens, backend = cfg.system_prompt, cfg.max_new_tokens, cfg.backend
    samples = [s for group in groups for s in group]
    origin = [(src, task_from_filename(src.path)) for src, group in zip(sources, groups) for _ in group]
    plog = None
    if out_dir:
        check_results(out_dir, EVAL_OUTPUTS, files=[src.path for src in sources])  # again, holding the folder
        meta = run_identity(model_path, [(src.name, src.path) for src in sources], samples, base=cfg.base,
                            limit=cfg.limit, system_prompt=prompt, system_prompt_from=prompt_from,
                            max_new_tokens=max_new_tokens, backend=backend)
    keys = record_keys((src.name, s.id) for (src, _), s in zip(origin, samples))
    if out_dir:
        plog = PredictionLog(out_dir, meta, resume=cfg.resume, force=cfg.force,
                             images_of={k: s.images for k, s in zip(keys, samples)})
    done_keys = set(record_keys((r.get("dataset"), r["id"]) for r in plog.records)) if plog else set()
    todo = [i for i, k in enumerate(keys) if k not in done_keys]
    made: list[dict] = []

    def keep(idx: list[int], answers: list[str]) -> None:
        batch = [eval_record(samples[todo[i]], a, origin[todo[i]][0].name, origin[todo[i]][1])
                 for i, a in zip(idx, answers)]
        (plog.append if plog else made.extend)(batch)

    if todo:
        t0 = time.perf_counter()
        try:
            if backend == "vllm":
                from .vllm_backend import generate_vllm

                generate_vllm(model_path, [samples[i] for i in todo], prompt, max_new_tokens, keep, cfg.progress,
                              len(samples) - len(todo))
            else:
                model, processor = load_for_inference(model_path, cfg.base)
                predict_samples(model, Chat(processor, prompt), [samples[i] for i in todo], cfg.batch_size,
                                max_new_tokens, cfg.progress, keep, len(samples) - len(todo))
        except BaseException as e:  # a bad image, Ctrl-C, out of memory: say that the answers made are not lost
            if plog is None or not plog.records:
                raise
            kept = (f"{len(plog.records)} of {len(samples)} answers are kept in {plog.path}: continue with the same "
                    "command plus --resume")
            if isinstance(e, UserError):
                raise UserError(f"{e}; {kept}") from None
            if isinstance(e, Stopped):
                raise _exit_error(f"stopped by {e}; {kept}", STOPPED_EXIT) from None
            log.warning("stopped (%s); %s", type(e).__name__, kept)
            raise
        dt = time.perf_counter() - t0
        log.info("generated %d answers in %.1f s (%.2f records/s, %s backend)", len(todo), dt, len(todo) / dt, backend)
    if plog:
        plog.close()
    have = plog.records if plog else made
    by_key = dict(zip(record_keys((r.get("dataset"), r["id"]) for r in have), have))
    records = [by_key[k] for k in keys]
    if plog:
        plog.put_in_order(records)  # the data's order, so that `score` of the file sums as below
    roots = list(dict.fromkeys(src.root for src in sources))
    kwargs = dict(point_threshold=cfg.point_threshold, task_map=cfg.task_map, coords=cfg.coords, mask_roots=roots,
                  files={src.name: src.path for src in sources})  # which val file a record is of (identity.py)
    try:
        rows, summary = score_records(records, cfg.upstream_compatible, **kwargs)
        if cfg.table:
            summary["table"] = table_summary(cfg.table, records, rows, summary, **kwargs)
    except ValueError as e:
        raise UserError(str(e)) from None
    prompts = {k: r.get("prompt", "") for k, r in zip(keys, records)}
    row_keys = record_keys((r["dataset"], r["id"]) for r in rows)
    for row, k in zip(rows, row_keys):
        row["prompt"] = prompts.get(k, "")
    summary.update(model=str(model_path), system_prompt=prompt, system_prompt_from=prompt_from, backend=backend,
                   max_new_tokens=max_new_tokens, datasets={
                       src.name: {"annotation_path": src.path, "data_root": src.root, "records": len(group)}
                       for src, group in zip(sources, groups)})
    if out_dir:
        write_outputs(out_dir, rows, summary)
        sample_by_key = dict(zip(keys, samples))
        write_overlays(out_dir, [(r, sample_by_key[k]) for r, k in zip(rows, row_keys) if k in sample_by_key])
    return rows, summary


class Stopped(BaseException):
    """A stop signal, raised in the main thread as Ctrl-C raises KeyboardInterrupt, so that every cleanup runs (the
    answers made so far stay, a folder made for a run with no answer yet is taken back)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextmanager
def _stop_on_signals():
    """STOP_SIGNALS raise Stopped while the block runs (once: a second signal must not cut the cleanup short); a
    signal ignored when eval starts (`nohup` ignores SIGHUP) stays ignored."""
    if threading.current_thread() is not threading.main_thread():  # handlers can only be set there
        yield
        return
    fired = []

    def stop(signum, frame):
        if not fired:
            fired.append(signum)
            raise Stopped(signum)

    previous = {s: signal.signal(s, stop) for s in STOP_SIGNALS if signal.getsignal(s) is not signal.SIG_IGN}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)


def _exit_error(message: str, code: int) -> UserError:
    err = UserError(message)
    err.exit_code = code  # the CLI prints the line and exits with it
    return err


def _stopped(e: Stopped, out_dir: str | None) -> UserError:
    """A stop outside generation (loading, scoring, writing): answers kept if --out holds some, else nothing."""
    preds = Path(os.path.expanduser(out_dir)) / "predictions.jsonl" if out_dir else None
    if preds is not None and preds.is_file() and preds.stat().st_size:
        return _exit_error(f"stopped by {e}; the answers in {preds} are kept: continue with the same command plus "
                           "--resume", STOPPED_EXIT)
    return _exit_error(f"stopped by {e} before the first answer; nothing is kept: run the same command again",
                       128 + e.signum)


def predict_one(model_path: str, image: str, question: str, draw: str | None = None,
                settings: EvalSettings | None = None) -> str:
    """The model's answer. Of the settings it reads `max_new_tokens`, `system_prompt` (as `eval`: the run's
    recipe.yaml, else the default), `coords` (how the answer's coordinates are read when drawing it) and `force`
    (replace an existing `draw` file)."""
    from PIL import Image

    from ..answers.geometry import COORDS
    from ..answers.kinds import classify_task
    from ..answers.parse import parse_answer
    from ..data.images import load_image
    from ..outputs import check_file, write_file
    from .draw import draw_overlay
    from .generate import generate
    from .safety import check_model

    cfg = settings or EvalSettings()
    model_path, image = os.path.expanduser(model_path), os.path.expanduser(image)
    coords = cfg.coords
    if coords not in COORDS:
        raise UserError(f"--coords {coords}: choose one of {', '.join(COORDS)}")
    target = check_file(draw, cfg.force, flag="--draw", inputs={"input image": image}) if draw else None
    img = load_image(image)  # the kit's one image reader: upright, 8-bit, size-guarded; one line when unreadable
    check_model(model_path)
    prompt, source = resolve_system_prompt(model_path, cfg.system_prompt)
    log.info("system prompt (from %s): %r", source, prompt)
    model, processor = load_for_inference(model_path)
    text = question if "<image>" in question else f"<image>\n{question}"
    chat = Chat(processor, prompt)
    answer, = generate(model, processor, [prompt_text(chat, [{"role": "user", "content": text}])], [[img]],
                       cfg.max_new_tokens)
    if draw:
        kind = classify_task(None, answer).kind
        parsed = parse_answer(answer, kind, coords, img.size) if kind in ("box", "point", "trajectory") else None
        if parsed is None or parsed.error:
            raise UserError(f"answer {answer!r} is not a box, point or trajectory; nothing to draw")
        out = draw_overlay(img, kind, None, parsed.value)
        buf = io.BytesIO()  # the format the file's name asks for (out.jpg is a JPEG), PNG for unknown names
        out.save(buf, format=Image.registered_extensions().get(Path(draw).suffix.lower(), "PNG"))
        write_file(target, buf.getvalue(), "predict")
    return answer
