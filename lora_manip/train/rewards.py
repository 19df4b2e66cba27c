"""Rewards for GRPO: the kit's own answer parsers and metrics (lora_manip/eval), each a plain function of one answer.

Every reward is ``fn(pred_text, gt, **context) -> float`` in [0, 1], 1 best; the answer is read with the same strict
parser `lora-manip eval` uses, so what the policy is rewarded for is what the evaluation counts. An answer that does
not parse gets 0.0, the lowest reward, never an exception (the parser never raises, and a metric that would is
caught). `gt` is the ground-truth answer text as the record has it (for pointing: unused; the record's mask is).

| reward      | kinds                 | value                                                                 |
|-------------|-----------------------|-----------------------------------------------------------------------|
| iou         | box                   | IoU of predicted and true box                                         |
| iou_bonus   | box                   | 1 when IoU > 0.5 (VLM-R1's threshold), else 0                         |
| distance    | point                 | exp(-d / scale), d = mean distance under the best point matching       |
| in_mask     | pointing              | mean mask value at the predicted points (Where2Place / RoboPoint)      |
| dtw         | trajectory            | exp(-DTW / (n_gt * scale)): DTW per ground-truth point, so the length  |
|             |                       | of the trajectory does not change the scale                            |
| frechet     | trajectory            | exp(-Fréchet / scale)                                                  |
| accuracy    | choice, yesno         | 1 when the letter / yes-no matches                                     |
| bleu        | planning              | sentence BLEU                                                          |
| format      | every kind            | 1 when the answer parses as its kind                                   |

Distances are in normalised image units ([0, 1] of width and height); `scale` (recipe `grpo.distance_scale`) is the
distance at which a reward falls to 1/e: 0.1 means a point 10% of the image off scores 0.37. Mapping through exp
keeps every parsed answer above a parse failure (0) and the reward in (0, 1].

`make_reward_funcs` turns the recipe's per-kind table ``{kind: {reward: weight}}`` into one TRL reward function per
reward name. A completion whose kind does not use that reward gets None (TRL ignores it in the weighted sum and in
that reward's logged mean), so a box answer is never scored by `accuracy` nor a choice answer by `iou`.
"""

from __future__ import annotations

import logging
import math
from functools import lru_cache
from typing import Callable

from ..eval.metrics import bleu, box_iou, discrete_frechet, dtw_distance, point_distance
from ..answers.parse import parse_answer
from ..answers.geometry import Parsed
from ..recipe.names import REWARD_KINDS

log = logging.getLogger(__name__)

DEFAULT_DISTANCE_SCALE = 0.1


def _parsed(text, kind: str) -> Parsed:
    return parse_answer(text if isinstance(text, str) else "", kind)


def _safe(fn: Callable[[], float]) -> float:
    """A metric that raises (a bug, or an input the parser let through) scores as a parse failure."""
    try:
        value = float(fn())
    except Exception as e:  # noqa: BLE001 - a reward must never stop a training run
        log.debug("reward raised %s: %s; scored 0", type(e).__name__, e)
        return 0.0
    return value if math.isfinite(value) else 0.0


def _gt_value(gt, kind: str):
    g = _parsed(gt, kind)
    return g.value if g.ok else None


def format_reward(pred: str, gt=None, kind: str = "planning", **_) -> float:
    """1.0 when `pred` parses as an answer of `kind`, else 0.0."""
    return 1.0 if _parsed(pred, kind).ok else 0.0


def iou_reward(pred: str, gt, **_) -> float:
    p, g = _parsed(pred, "box"), _gt_value(gt, "box")
    if not p.ok or g is None:
        return 0.0
    return _safe(lambda: box_iou(p.value, g))


def iou_bonus_reward(pred: str, gt, threshold: float = 0.5, **_) -> float:
    return 1.0 if iou_reward(pred, gt) > threshold else 0.0


def distance_reward(pred: str, gt, scale: float = DEFAULT_DISTANCE_SCALE, **_) -> float:
    p, g = _parsed(pred, "point"), _gt_value(gt, "point")
    if not p.ok or g is None:
        return 0.0
    return _safe(lambda: math.exp(-point_distance(p.value, g) / scale))


def dtw_reward(pred: str, gt, scale: float = DEFAULT_DISTANCE_SCALE, **_) -> float:
    p, g = _parsed(pred, "trajectory"), _gt_value(gt, "trajectory")
    if not p.ok or g is None:
        return 0.0
    return _safe(lambda: math.exp(-dtw_distance(p.value, g) / (len(g) * scale)))


def frechet_reward(pred: str, gt, scale: float = DEFAULT_DISTANCE_SCALE, **_) -> float:
    p, g = _parsed(pred, "trajectory"), _gt_value(gt, "trajectory")
    if not p.ok or g is None:
        return 0.0
    return _safe(lambda: math.exp(-discrete_frechet(p.value, g) / scale))


def accuracy_reward(pred: str, gt, kind: str = "choice", **_) -> float:
    p, g = _parsed(pred, kind), _gt_value(gt, kind)
    return 1.0 if p.ok and g is not None and p.value == g else 0.0


def bleu_reward(pred: str, gt, **_) -> float:
    p = _parsed(pred, "planning")
    return _safe(lambda: bleu(p.value, gt)) if p.ok and isinstance(gt, str) else 0.0


@lru_cache(maxsize=256)
def _mask(path: str):
    from ..eval.pointing import load_mask

    return load_mask(path)


def in_mask_reward(pred: str, gt=None, mask: str | None = None, **_) -> float:
    """Mean mask value at the predicted points; the mask's size converts [0, 1] units to pixels."""
    from ..eval.pointing import mask_accuracy

    p = _parsed(pred, "pointing")
    if not p.ok or not mask:
        return 0.0
    return _safe(lambda: mask_accuracy(p.value, _mask(mask)))


# reward name -> (function, kinds it applies to); the names and kinds are the schema's (recipe/names.py), which
# validates a recipe's `grpo.rewards` before anything loads
_FUNCTIONS: dict[str, Callable[..., float]] = {
    "iou": iou_reward, "iou_bonus": iou_bonus_reward, "distance": distance_reward, "in_mask": in_mask_reward,
    "dtw": dtw_reward, "frechet": frechet_reward, "accuracy": accuracy_reward, "bleu": bleu_reward,
    "format": format_reward,
}
REWARDS: dict[str, tuple[Callable[..., float], tuple[str, ...]]] = {
    name: (fn, REWARD_KINDS[name]) for name, fn in _FUNCTIONS.items()}


def completion_text(completion) -> str:
    """TRL hands conversational completions as [{"role": "assistant", "content": ...}]; the text is what counts."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion:
        content = completion[-1].get("content") if isinstance(completion[-1], dict) else None
        if isinstance(content, list):
            return "".join(p.get("text", "") for p in content if isinstance(p, dict))
        return content if isinstance(content, str) else ""
    return ""


def make_reward_funcs(table: dict[str, dict[str, float]], scale: float = DEFAULT_DISTANCE_SCALE) -> list[Callable]:
    """One TRL reward function per reward name used in `table`, carrying the per-kind weight. TRL calls each with
    ``prompts``, ``completions`` and the dataset's extra columns as lists (here ``gt``, ``kind``, ``mask``)."""
    names = [n for n in REWARDS if any(n in r for r in table.values())]

    def build(name: str) -> Callable:
        fn, _ = REWARDS[name]

        def reward(completions, gt, kind, mask=None, **_) -> list[float | None]:
            masks = mask if mask is not None else [None] * len(completions)
            out: list[float | None] = []
            for c, g, k, m in zip(completions, gt, kind, masks):
                weight = table.get(k, {}).get(name)
                if weight is None:
                    out.append(None)
                    continue
                out.append(weight * fn(completion_text(c), g, kind=k, scale=scale, mask=m))
            return out

        reward.__name__ = name  # TRL logs rewards/<__name__>/mean
        return reward

    return [build(n) for n in names]


def mean_rewards(records: list[dict], table: dict[str, dict[str, float]], scale: float = DEFAULT_DISTANCE_SCALE
                 ) -> dict[str, float]:
    """Mean weighted reward per task kind (and "all") of `lora-manip eval` predictions (records with `pred`, `gt`,
    `task`): the held-out reward of greedy answers, comparable before and after GRPO. Kinds without rewards in
    `table` are left out."""
    from ..answers.kinds import classify_task

    sums: dict[str, list[float]] = {}
    for r in records:
        gt = r.get("gt")
        kind = classify_task(r.get("task"), gt if isinstance(gt, str) else None).kind
        if kind not in table or not table[kind]:
            continue
        total = sum(w * REWARDS[name][0](r.get("pred") or "", gt, kind=kind, scale=scale, mask=r.get("mask"))
                    for name, w in table[kind].items())
        sums.setdefault(kind, []).append(total)
    out = {k: sum(v) / len(v) for k, v in sums.items()}
    every = [x for v in sums.values() for x in v]
    if every:
        out["all"] = sum(every) / len(every)
    return out
