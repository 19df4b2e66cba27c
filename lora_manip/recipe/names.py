"""The names a recipe may use for things training computes: the metrics `train.best_metric` may name (and which way
each improves) and the rewards `grpo.rewards` may give each task kind. They live in the schema's layer so a recipe
with a misspelt name is refused when it is loaded, before anything heavy is imported; training reads the same
tables (train/evaluate.py for the direction, train/rewards.py implements each reward). Also the defaults training's
eval shares with the eval commands (point threshold, answer length, batch size, backend), each stated once here.

A metric name is `kind.metric` as the scorer's summary spells it (lora_manip/eval/score.py, `summary["all"][kind]`):
`box.acc@0.1`, `choice.accuracy`, `trajectory.dtw`. Distances, errors and `parse_failure_rate` improve downwards;
accuracies, IoU and BLEU upwards. The direction is decided here, by name, once.
"""

from __future__ import annotations

# The tasks `lora-manip data synth` renders (lora_manip/data/synth.py), here so a recipe's
# `data.create_synthetic_if_missing.tasks` is checked when the recipe is loaded.
SYNTH_TASKS: tuple[str, ...] = (
    "current_bbox", "final_bbox", "contact_bbox", "gripper_bbox", "contact_point", "future_traj", "choice", "yesno",
)

# Defaults training's eval and the eval commands (`lora-manip eval`, `predict`, `score`) share, each stated once: the
# schema, eval/run.py's EvalSettings and the CLI's options read them from here (this module imports nothing, so the
# CLI can, and `--help` stays instant).
# The scorer's point hit threshold in normalised image units: it names the metric (`point.acc@0.05`).
POINT_THRESHOLD = 0.05
# Longest answer `eval` / `predict` generate, in tokens: RoboInter's eval scripts generate up to 512
# (eval_manip/scripts/eval.sh, evaluation_intermediate.py), so a long answer is scored as upstream scores it.
MAX_NEW_TOKENS = 512
# Training's eval (train.eval_max_new_tokens) runs every eval_steps on a small subset and needs only the answer's
# shape: a 10-point trajectory is ~150 tokens. Kept at 256 so a run's logged metrics and the demo's numbers stay.
TRAIN_EVAL_MAX_NEW_TOKENS = 256
EVAL_BATCH_SIZE = 8  # prompts generated together (of similar length)
EVAL_BACKENDS = ("hf", "vllm")  # the first is the default: transformers, batched; vLLM needs a GPU machine

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

# reward name -> the task kinds it applies to (train/rewards.py: REWARDS holds the functions).
REWARD_KINDS: dict[str, tuple[str, ...]] = {
    "iou": ("box",),
    "iou_bonus": ("box",),
    "distance": ("point",),
    "in_mask": ("pointing",),
    "dtw": ("trajectory",),
    "frechet": ("trajectory",),
    "accuracy": ("choice", "yesno"),
    "bleu": ("planning",),
    "format": ("box", "point", "pointing", "trajectory", "choice", "yesno", "planning"),
}


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


def check_reward_table(table: dict[str, dict[str, float]]) -> list[str]:
    """Problems with a recipe's ``grpo.rewards`` table, each naming its key path (empty when fine)."""
    errors = []
    for kind, rewards in table.items():
        if not any(kind in kinds for kinds in REWARD_KINDS.values()):
            errors.append(f"grpo.rewards.{kind}: unknown task kind; one of box, point, pointing, trajectory, "
                          "choice, yesno, planning")
            continue
        for name in rewards:
            if name not in REWARD_KINDS:
                errors.append(f"grpo.rewards.{kind}.{name}: unknown reward; one of {', '.join(REWARD_KINDS)}")
            elif kind not in REWARD_KINDS[name]:
                fits = [n for n, kinds in REWARD_KINDS.items() if kind in kinds]
                errors.append(f"grpo.rewards.{kind}.{name}: does not apply to {kind} answers; {kind} has "
                              f"{', '.join(fits)}")
    return errors
