"""The metric names `train.best_metric` accepts, which way each improves, and the recipe checks of eval during
training (pure Python: the recipe validates these before anything heavy is imported).

A name is `kind.metric` as the scorer's summary spells it (lora_manip/eval/score.py, `summary["all"][kind]`):
`box.acc@0.1`, `choice.accuracy`, `trajectory.dtw`. Distances, errors and `parse_failure_rate` improve downwards;
accuracies, IoU and BLEU upwards. The direction is decided here, by name, once.
"""

from __future__ import annotations

# The scorer's point hit threshold in normalised image units: it names the metric (`point.acc@0.05`).
POINT_THRESHOLD = 0.05

_TRAJ = ("dtw", "frechet", "hausdorff", "endpoint_error")
# kind -> {metric: higher is better}. `*_px` distances exist only when records state the image size (w, h).
METRICS: dict[str, dict[str, bool]] = {
    "box": {"mean_iou": True, "acc@0.1": True, "acc@0.5": True},
    "point": {"mean_distance": False, "mean_distance_px": False, f"acc@{POINT_THRESHOLD:g}": True},
    "trajectory": {**dict.fromkeys(_TRAJ + tuple(f"{m}_px" for m in _TRAJ), False),
                   "trace_rmse": False, "trace_mae": False},
    "choice": {"accuracy": True},
    "yesno": {"accuracy": True},
    "pointing": {"accuracy": True},
    "planning": {"bleu": True},
}
for _metrics in METRICS.values():
    _metrics["parse_failure_rate"] = False


def higher_is_better(name: str) -> bool:
    kind, metric = name.split(".", 1)
    return METRICS[kind][metric]


def check_metric_name(name: str) -> str | None:
    """None when `name` is a known `kind.metric`, else what is wrong (without the key path)."""
    kind, _, metric = name.partition(".")
    if kind not in METRICS:
        return (f"{name!r} is not kind.metric; kinds: {', '.join(METRICS)} (e.g. box.acc@0.1, choice.accuracy, "
                "trajectory.dtw)")
    if metric not in METRICS[kind]:
        return f"{name!r}: {kind} has no metric {metric!r}; choose one of {', '.join(METRICS[kind])}"
    return None


def check_train_eval(recipe) -> list[str]:
    """The recipe cross-checks of train.eval_steps / train.best_metric, each line naming its key."""
    t, errors = recipe.train, []
    has_val = bool(recipe.data.val) or any(d.val_fraction for d in recipe.data.train)
    if t.eval_steps and recipe.objective != "sft":
        errors.append(f"train.eval_steps: applies to objective sft; objective {recipe.objective} scores its "
                      "validation set with its rewards (grpo.eval_at_start)")
    elif t.eval_steps and not has_val:
        errors.append("train.eval_steps: needs validation data to generate on; add data.val entries or a "
                      "val_fraction to a data.train entry")
    if t.best_metric is not None:
        problem = check_metric_name(t.best_metric)
        if problem:
            errors.append(f"train.best_metric: {problem}")
        elif not t.eval_steps:
            errors.append("train.best_metric: needs train.eval_steps (the metric comes from the evals during "
                          "training)")
    return errors
