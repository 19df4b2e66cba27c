"""The `lora-manip` command. Each command parses its arguments and calls one function; heavy imports happen inside
the commands so `--help` is instant (importing this module imports no torch: tests/core/test_cli_import.py). The
choices and defaults an option shows are read from the tables they describe (dtypes, answers, recipe/names, the tiny
model's), never restated here. Known errors (UserError) print one line and exit 2; no tracebacks."""

from __future__ import annotations

import functools
import logging
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from .answers.geometry import COORDS, DEFAULT_COORDS
from .answers.kinds import KINDS
from .dtypes import WEIGHT_NAMES, WEIGHT_SHORT_NAMES
from .eval.table import TABLE_NAMES
from .errors import UserError
from .fsutil import home_paths
from .model.tiny import GEOMETRIES, TEMPLATES
from .recipe.names import EVAL_BACKENDS, EVAL_BATCH_SIZE, MAX_NEW_TOKENS, POINT_THRESHOLD, SYNTH_TASKS

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Fine-tune LLaVA-OneVision for robot-manipulation VQA: train (full / LoRA / QLoRA), merge, "
                       "evaluate.")
data_app = typer.Typer(no_args_is_help=True, help="Data sets: check, normalise coordinates, generate synthetic data.")
app.add_typer(data_app, name="data")


def _setup_logging() -> None:
    rank = int(os.environ.get("RANK", 0))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "filelock", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def command(fn):
    """Paths with `~` expanded; UserError mapped to one line and an exit code (2: bad input; a self-check may use 1)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        _setup_logging()
        try:
            return fn(*args, **{k: home_paths(v) for k, v in kwargs.items()})  # `~` in every path argument
        except UserError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(getattr(e, "exit_code", 2)) from None
    return wrapper


SetOpt = typer.Option(None, "--set", help="Override a recipe key: --set lora.r=8 (repeatable).")


def _one_of(choices) -> str:
    return " | ".join(choices)


@app.command("tiny-model")
@command
def tiny_model(out: Path = typer.Argument(..., help="Folder to write the checkpoint to."),
               seed: int = typer.Option(0, help="Initialisation seed."),
               force: bool = typer.Option(False, help="Replace an existing folder."),
               template: str = typer.Option("hub", help=f"{_one_of(TEMPLATES)}. hub: the llava-hf checkpoints' "
                                            "list-content chat template; chatml: lmms-lab's string-content Qwen "
                                            "ChatML."),
               geometry: str = typer.Option("tiny", help=f"{_one_of(GEOMETRIES)}. tiny: seconds per step on a CPU; "
                                            "ov-0.5b: LLaVA-OneVision-0.5B's widths, tiles and vocabulary, one layer "
                                            "each."),
               dtype: str = typer.Option("float32", help=f"{_one_of(WEIGHT_NAMES)}: dtype of the saved weights (the "
                                         "hub's are bfloat16).")):
    """Write a random LLaVA-OneVision (SigLIP + Qwen2 + projector) laid out as the llava-hf hub folders are: hub
    tensor names, processor files and chat template."""
    from .model.tiny import write_tiny_model

    if dtype not in WEIGHT_NAMES:
        raise UserError(f"--dtype {dtype}: choose one of {', '.join(WEIGHT_NAMES)}")
    typer.echo(f"wrote {write_tiny_model(out, seed=seed, force=force, template=template, geometry=geometry, dtype=dtype)}")


@data_app.command("synth")
@command
def data_synth(out: Path = typer.Argument(..., help="Folder for images/, train.json, val.json."),
               n: int = typer.Option(400, "--n", help="Number of records (train + val)."),
               seed: int = typer.Option(0, "--seed"),
               val_fraction: float = typer.Option(0.1, help="Share of records in val.json."),
               tasks: str | None = typer.Option(None, help="Only these tasks, comma-separated (default: all of "
                                                f"{', '.join(SYNTH_TASKS)}).")):
    """Render a synthetic manipulation VQA data set (boxes, contact points, trajectories, choice, yes/no)."""
    from .data.synth import write_synth_dataset

    if n < 2:
        raise UserError("--n must be at least 2")
    summary = write_synth_dataset(out, n=n, seed=seed, val_fraction=val_fraction,
                                  tasks=[t.strip() for t in tasks.split(",")] if tasks is not None else None)
    typer.echo(f"wrote {summary['train']} train + {summary['val']} val records to {out}; tasks: {summary['tasks']}")


@data_app.command("check")
@command
def data_check(target: Path = typer.Argument(..., help="A recipe (.yaml: all its train and val datasets, whole "
                                              "files) or one annotation file (.json / .jsonl)."),
               model: Optional[str] = typer.Option(None, help="Processor for token lengths (default: the recipe's "
                                                   "model.path; without one, lengths are not computed)."),
               data_root: Optional[Path] = typer.Option(None, help="For a file: folder its image paths are "
                                                        "relative to (default: the file's folder)."),
               max_length: Optional[int] = typer.Option(None, help="Default: the recipe's "
                                                        "data.model_max_length (for a file: that field's default)."),
               batch_size: Optional[int] = typer.Option(None, help="Batch size for the padding efficiency "
                                                        "(default: the recipe's per_device_batch_size, else 8)."),
               min_traj_points: Optional[int] = typer.Option(None, help="Fewest points a trajectory may have "
                                                             "(default: the recipe's, else 2)."),
               set_: Optional[List[str]] = SetOpt,
               json_out: bool = typer.Option(False, "--json", help="Print the full report as JSON."),
               show: int = typer.Option(5, help="Problems listed per reason (--json lists all).")):
    """Read every record; report each problem (file, line/index, id, field, reason) and statistics; exit 1 if any."""
    import json

    from .data.check import run_check
    from .data.report import format_report

    report = run_check(str(target), model=model, data_root=str(data_root) if data_root else None,
                       max_length=max_length, batch_size=batch_size, min_traj_points=min_traj_points,
                       overrides=set_ or [])
    typer.echo(json.dumps(report, indent=2) if json_out else format_report(report, show))
    if not report["ok"]:
        raise typer.Exit(1)


@data_app.command("normalize")
@command
def data_normalize(src: Path = typer.Argument(..., help="Annotation file (.json / .jsonl) with pixel coordinates, or a "
                                              "lab's labels: a CSV (columns image, task, question, answer; id, "
                                              "width, height optional) or a COCO-style JSON."),
                   out: Path = typer.Argument(..., help="New file to write (.json array or .jsonl, by suffix)."),
                   from_: str = typer.Option("pixels", "--from", help="pixels (of the original image) | resized "
                                             "(pixels of the Qwen2-VL smart-resized image) | thousand (0..1000)."),
                   data_root: Optional[Path] = typer.Option(None, help="Folder image paths are relative to "
                                                            "(default: the input's folder)."),
                   decimals: int = typer.Option(3, help="Decimals kept in normalised coordinates."),
                   factor: int = typer.Option(28, help="--from resized: side multiple (patch 14 x merge 2)."),
                   min_pixels: int = typer.Option(56 * 56, help="--from resized: smallest resized area."),
                   max_pixels: int = typer.Option(28 * 28 * 16384, help="--from resized: largest resized area."),
                   force: bool = typer.Option(False, help="Replace OUT if it exists (never the input)."),
                   keypoints: str = typer.Option("points", help="COCO keypoints: points | trajectory (in keypoint "
                                                 "order)."),
                   json_out: bool = typer.Option(False, "--json", help="Print the full report (every row) as JSON.")):
    """Convert grounding coordinates to [0, 1], using each record's image size; CSV and COCO labels become the kit's
    records. Says per row what it did. The input is never modified; nothing is written when a row is refused."""
    import json

    from .data.normalize import format_summary, normalize_file

    s = normalize_file(src, out, from_, data_root, decimals, factor, min_pixels, max_pixels, force, keypoints)
    typer.echo(json.dumps(s, indent=2) if json_out else format_summary(s), err=bool(s["problems"]) and not json_out)
    if s["problems"]:
        raise typer.Exit(1)


@app.command()
@command
def train(recipe: Path = typer.Argument(..., help="Recipe YAML (see recipes/)."),
          set_: Optional[List[str]] = SetOpt,
          overwrite: bool = typer.Option(False, help="Replace the run in the output folder (moved aside first, never "
                                         "mixed with the new one; put back if the start fails)."),
          resume: bool = typer.Option(False, help="Continue from the newest complete checkpoint. `--resume auto`: "
                                      "start, continue or (run complete) exit 0, as the folder says."),
          auto: Optional[str] = typer.Argument(None, hidden=True, metavar="", help="`auto` after --resume."),
          max_restarts: Optional[int] = typer.Option(None, min=0, help="torchrun restarts of failed processes."),
          dry_run: bool = typer.Option(False, help="Validate, build the model on the meta device, print the plan.")):
    """Train as the recipe says (full, LoRA, QLoRA); torchrun for N > 1 processes or nodes; 75: preempted, saved."""
    from .train.launch import finish, launch_training
    if str(recipe) == "auto" and auto:  # `--resume auto RECIPE`: the parser took `auto` for the recipe
        recipe, auto = Path(auto), "auto"
    if auto is not None and not resume:  # the hidden slot takes a value only after --resume
        raise UserError(f"unexpected argument {auto!r} after the recipe (did you mean `--resume auto`?)")
    code, message = launch_training(recipe, set_ or [], overwrite=overwrite, resume=auto or resume, dry_run=dry_run,
                                    max_restarts=max_restarts)
    raise typer.Exit(finish(code, message))


@app.command()
@command
def merge(adapter_dir: Path = typer.Argument(..., help="Adapter folder written by `lora-manip train`."),
          base: Optional[str] = typer.Option(None, help="Base model (default: the one the adapter names)."),
          out: Optional[Path] = typer.Option(None, help="Output folder (default: ADAPTER_DIR-merged)."),
          dtype: Optional[str] = typer.Option(None, help=f"{_one_of(WEIGHT_SHORT_NAMES)} (default: the base's "
                                              "dtype)."),
          force: bool = typer.Option(False, help="Replace an existing output folder."),
          verify: bool = typer.Option(True, help="Reload the output and compare logits with base + adapter."),
          base_as_trained: bool = typer.Option(False, "--base-as-trained", help="QLoRA adapter: fold it into the "
                                               "base's weights as the 4-bit training saw them (dequantised), not "
                                               "the full-precision ones; the check compares with the 4-bit model."),
          quantization: Optional[str] = typer.Option(None, help="With --base-as-trained, when the adapter folder "
                                                     "has no recipe.yaml: the 4-bit settings it was trained with, "
                                                     "e.g. quant_type=nf4,double_quant=true.")):
    """Fold an adapter (and fully trained projector / vision tower) into a full LLaVA-OneVision checkpoint."""
    from .checkpoints.merge import merge_adapter

    path, diff = merge_adapter(str(adapter_dir), base=base, out=str(out) if out else None, dtype=dtype,
                               force=force, verify=verify, base_as_trained=base_as_trained,
                               quantization=quantization)
    against = "4-bit base+adapter" if base_as_trained else "base+adapter"
    check = f"; max |logit diff| vs {against}: {diff:.3g}" if diff is not None else ""
    typer.echo(f"merged checkpoint written to {path}{check}")


TaskMapOpt = typer.Option(None, "--task-map", help=f"NAME=KIND: score task NAME as KIND ({', '.join(KINDS)}); "
                          "repeatable; beats the built-in RoboInter names.")
CoordsOpt = typer.Option(DEFAULT_COORDS, "--coords", help=f"How to read predicted coordinates: {_one_of(COORDS)}. "
                         "normalized: [0, 1]; thousand: 0-1000, Qwen2-VL; pixels: of the original image (needs w/h "
                         "or a mask).")
PointThresholdOpt = typer.Option(POINT_THRESHOLD, help="Contact-point hit radius (normalised units).")


TableOpt = typer.Option(None, "--table", help=f"Also print a published table's layout: {_one_of(TABLE_NAMES)} "
                        "(robointer: the paper's Table 3, column by column; robointer-files: upstream's scorer, one row per "
                        "val file), upstream-compatible and strict side by side; in metrics.json as `table`.")


def _echo_tables(summary: dict) -> None:
    from .eval.report import format_table
    from .eval.table import format_paper_table

    typer.echo(format_table(summary))
    if summary.get("table"):
        typer.echo("\n" + format_paper_table(summary["table"]))


def _exit_on_data_errors(summary: dict) -> None:
    if summary.get("data_errors"):
        raise typer.Exit(1)


SystemPromptOpt = typer.Option(None, "--system-prompt", help="System turn of every prompt (default: data.system_prompt "
                               "of the run's recipe.yaml in MODEL, else that field's default); '' for none.")


def _system_prompt(option: str | None):
    """--system-prompt as the eval settings take it: not given -> the run's own (UNSET); '' -> no system turn."""
    from .eval.generate import UNSET

    return UNSET if option is None else option or None


@app.command("eval")
@command
def eval_(model: str = typer.Argument(..., help="Merged/full checkpoint, adapter folder, or base model (path or hub id)."),
          data: Optional[List[str]] = typer.Option(None, "--data", metavar="FILE|NAME",
                                                   help="Annotation file (LLaVA JSON/JSONL) or a "
                                                   "dataset name of the registry; repeatable: every file in one run, "
                                                   "one model load, one row each."),
          split: Optional[str] = typer.Option(None, help="Also every registry dataset named *_SPLIT (e.g. val)."),
          registry: Optional[Path] = typer.Option(None, help="Dataset registry YAML of names and --split (default: "
                                                  "$LORA_MANIP_REGISTRY, as recipes)."),
          data_root: Optional[Path] = typer.Option(None, help="Folder every file's image paths are relative to "
                                                   "(default: a registry dataset's data_path, else the annotation "
                                                   "file's folder)."),
          out: Optional[Path] = typer.Option(None, help="Write predictions.jsonl (as answers come), metrics.json, "
                                             "scores.jsonl and overlays here."),
          limit: Optional[int] = typer.Option(None, help="Evaluate only the first N records of each file."),
          batch_size: int = typer.Option(EVAL_BATCH_SIZE, help="Generation batch size (prompts of similar length "
                                         "together)."),
          max_new_tokens: int = typer.Option(MAX_NEW_TOKENS, help="Longest answer generated (RoboInter's eval "
                                             "scripts: 512; a 10-point trajectory is ~150 tokens)."),
          base: Optional[str] = typer.Option(None, help="Base model for an adapter (default: the one it names)."),
          upstream_compatible: bool = typer.Option(False, help="Score as RoboInter's / RoboPoint's scripts do "
                                                   "(flaws included) and print upstream's per-file table."),
          task_map: Optional[List[str]] = TaskMapOpt,
          coords: str = CoordsOpt,
          point_threshold: float = PointThresholdOpt,
          system_prompt: Optional[str] = SystemPromptOpt,
          backend: str = typer.Option(EVAL_BACKENDS[0], help=f"{_one_of(EVAL_BACKENDS)}. hf: transformers, "
                                      "batched; vllm: needs vLLM (GPU machines)."),
          resume: bool = typer.Option(False, help="Continue the eval in --out: keep its answers, generate the rest "
                                      "(same model and settings, else refused)."),
          force: bool = typer.Option(False, help="Start over in an --out that already holds an eval."),
          table: Optional[str] = TableOpt):
    """Generate answers with MODEL on the --data files (and a registry --split) and score them (boxes, points,
    trajectories, choice, yes/no, BLEU, pointing), one row per file. Exit 1 when some records could not be scored
    (listed)."""
    from .answers.kinds import parse_task_map
    from .eval.run import EvalSettings, run_eval

    try:
        tmap = parse_task_map(task_map)
    except ValueError as e:
        raise UserError(str(e)) from None
    settings = EvalSettings(limit=limit, batch_size=batch_size, max_new_tokens=max_new_tokens,
                            system_prompt=_system_prompt(system_prompt), base=base,
                            upstream_compatible=upstream_compatible, task_map=tmap, coords=coords,
                            point_threshold=point_threshold, backend=backend, resume=resume, force=force, table=table)
    _, summary = run_eval(model, data or [], str(data_root) if data_root else None, str(out) if out else None,
                          settings, split=split, registry=str(registry) if registry else None)
    _echo_tables(summary)
    typer.echo(f"system prompt ({summary['system_prompt_from']}): {summary['system_prompt']!r}")
    if out:
        typer.echo(f"wrote {out}/predictions.jsonl, metrics.json, scores.jsonl and overlays")
    _exit_on_data_errors(summary)


@app.command()
@command
def score(predictions: List[Path] = typer.Argument(..., help="JSON/JSONL files of records with id, pred, gt (task, "
                                                    "w, h, mask optional); upstream's eval_details_<task>.json work "
                                                    "as they are."),
          out: Optional[Path] = typer.Option(None, help="Write metrics.json and scores.jsonl here."),
          upstream_compatible: bool = typer.Option(False, help="Score as RoboInter's / RoboPoint's scripts do "
                                                   "(flaws included) and print upstream's per-file table."),
          point_threshold: float = PointThresholdOpt,
          task_map: Optional[List[str]] = TaskMapOpt,
          coords: str = CoordsOpt,
          data_root: Optional[Path] = typer.Option(None, help="Folder `mask` paths are relative to (default: "
                                                   "each predictions file's folder)."),
          force: bool = typer.Option(False, help="Replace metrics.json / scores.jsonl in --out."),
          table: Optional[str] = TableOpt):
    """Score predictions made elsewhere (vLLM, upstream scripts) with the same metrics as `eval`. Exit 1 when some
    records could not be scored (listed with id, field and reason)."""
    from .answers.kinds import parse_task_map
    from .eval.score import score_files

    try:
        tmap = parse_task_map(task_map)
    except ValueError as e:
        raise UserError(str(e)) from None
    summary = score_files(predictions, out, force, upstream_compatible, point_threshold, tmap, coords, data_root,
                          table)
    _echo_tables(summary)
    if out:
        typer.echo(f"wrote {out}/metrics.json and {out}/scores.jsonl")
    _exit_on_data_errors(summary)


@app.command()
@command
def predict(model: str = typer.Argument(..., help="Merged/full checkpoint, adapter folder or base model."),
            image: Path = typer.Argument(..., help="Image file."),
            question: str = typer.Argument(..., help="The question (an <image> placeholder is added in front)."),
            draw: Optional[Path] = typer.Option(None, help="Save the image with a grounding answer drawn on it."),
            max_new_tokens: int = typer.Option(MAX_NEW_TOKENS, help="Longest answer generated."),
            system_prompt: Optional[str] = SystemPromptOpt,
            coords: str = typer.Option(DEFAULT_COORDS, "--coords", help="How to read the answer's coordinates for "
                                       f"--draw: {_one_of(COORDS)}."),
            force: bool = typer.Option(False, help="Replace an existing --draw file.")):
    """Answer one question about one image."""
    from .eval.run import EvalSettings, predict_one

    settings = EvalSettings(max_new_tokens=max_new_tokens, system_prompt=_system_prompt(system_prompt),
                            coords=coords, force=force)
    typer.echo(predict_one(model, str(image), question, str(draw) if draw else None, settings))


@app.command()
@command
def demo(recipe: Path = typer.Option(Path("recipes/tiny_cpu.yaml"), help="The demo recipe."),
         set_: Optional[List[str]] = SetOpt,
         limit: int = typer.Option(80, help="Validation records to evaluate.")):
    """The offline end-to-end demo: tiny model + synthetic data -> LoRA train -> merge -> eval before/after."""
    from .demo import run_demo

    typer.echo(run_demo(recipe, set_ or [], limit))


@app.command()
@command
def convert(src: Path = typer.Argument(..., help="Checkpoint folder to convert (never written to)."),
            out: Path = typer.Argument(..., help="Output folder (written to a temporary folder, then renamed)."),
            from_: str = typer.Option(..., "--from", help="Layout of SRC: llava-next (original LlavaQwenForCausalLM) "
                                      "| hf (transformers LLaVA-OneVision)."),
            to: str = typer.Option(..., "--to", help="Layout to write: hf | llava-next."),
            processor: Optional[Path] = typer.Option(None, help="--to hf: use the processor in this folder (default: "
                                                     "SRC's own processor files, else built from SRC's tokenizer "
                                                     "with SigLIP preprocessing)."),
            vision_config: Optional[Path] = typer.Option(None, help="--from llava-next: SiglipVisionConfig JSON of the "
                                                         "tower (default: SRC config's vision_config block, else "
                                                         "SigLIP-so400m-patch14-384)."),
            vision_tower: str = typer.Option("google/siglip-so400m-patch14-384", help="--to llava-next: the "
                                             "mm_vision_tower name to write."),
            max_shard_size: str = typer.Option("5GB", help="Largest output shard (e.g. 5GB, 500MB)."),
            force: bool = typer.Option(False, help="Replace an existing output folder.")):
    """Convert between the original LLaVA-NeXT llava_qwen layout and the transformers LLaVA-OneVision layout."""
    from .checkpoints.convert import convert_checkpoint

    path = convert_checkpoint(str(src), str(out), from_, to, force=force,
                              vision_config=str(vision_config) if vision_config else None,
                              processor=str(processor) if processor else None, vision_tower=vision_tower,
                              max_shard_size=max_shard_size)
    typer.echo(f"converted {src} ({from_}) to {path} ({to})")


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
