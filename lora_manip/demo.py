"""`lora-manip demo`: the whole job on the embedded default, offline, on CPU in minutes:
tiny LLaVA-OneVision + synthetic manipulation data -> LoRA train -> merge -> evaluate before and after."""

from __future__ import annotations

from pathlib import Path

# The rows of the before/after comparison: (kind, metric, higher is better).
HEADLINE = [("box", "mean_iou", True), ("box", "acc@0.1", True), ("point", "mean_distance", False),
            ("trajectory", "dtw", False), ("choice", "accuracy", True), ("yesno", "accuracy", True)]


def compare(before: dict, after: dict) -> str:
    lines = [f"{'metric':<26}{'before':>10}{'after':>10}", "-" * 46]
    for kind, metric, _ in HEADLINE + [(k, "parse_failure_rate", False) for k in ("box", "choice")]:
        b = before["all"].get(kind, {}).get(metric)
        a = after["all"].get(kind, {}).get(metric)
        fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
        lines.append(f"{kind + ' ' + metric:<26}{fmt(b):>10}{fmt(a):>10}")
    return "\n".join(lines)


def run_demo(recipe_path: Path, overrides: list[str], limit: int) -> str:
    from .eval.run import EvalSettings, run_eval
    from .eval.report import format_table
    from .checkpoints.merge import merge_adapter
    from .recipe import load_recipe
    from .train.workflow import run_training

    recipe = load_recipe(recipe_path, overrides)
    adapter = run_training(recipe)
    merged, diff = merge_adapter(str(adapter))
    val = recipe.data.val[0] if recipe.data.val else recipe.data.train[0]
    common = dict(data=val.annotation_path, data_root=val.data_path,
                  settings=EvalSettings(limit=limit, system_prompt=recipe.data.system_prompt,
                                        max_new_tokens=recipe.train.eval_max_new_tokens))
    _, before = run_eval(recipe.model.path, out_dir=str(Path(adapter) / "eval-before"), **common)
    _, after = run_eval(str(merged), out_dir=str(Path(adapter) / "eval-after"), **common)
    return "\n\n".join([
        f"adapter: {adapter}\nmerged:  {merged} (max |logit diff| vs base+adapter: "
        f"{'check skipped' if diff is None else f'{diff:.2g}'})",
        "after fine-tuning:\n" + format_table(after),
        f"before vs after fine-tuning ({after['count']} validation records):\n" + compare(before, after),
    ])
