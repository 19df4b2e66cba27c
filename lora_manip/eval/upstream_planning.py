"""RoboInter's task-planning scorer, rule for rule, flaws included (pure Python + numpy, no torch, no nltk).

Reproduces ``RoboInterVLM/RoboInterVLM-QwenVL/eval/benchmark/eval_llava_format/task_planning/eval.py``
(InternRobotics/RoboInter at 481acfb), the script that scores the Task_planning files of RoboInter-VQA. It decides a
record's type by its ``id`` alone, by substring, checking its three name lists in this order (a name of a later list
may be part of an earlier one's names, so the order matters): choice, decide, planning. An id that contains none of
them makes upstream raise; here such a record is not a task-planning record and keeps the rules it had before
(generation.py's for box / trajectory / choice / yes-no, the kit's for the rest).

Per record, ``pred`` is the LAST LINE of the prediction, lower-cased, and ``gt`` the ground truth lower-cased:

- ``plan_choice``: correct when ``gt in pred or pred in gt``, so an empty last line (an answer that ends with a
  newline included) is correct;
- ``plan_decide``: when gt is "yes" or "no", pred becomes "yes" if it contains "yes", else "no" if it contains "no"
  ("not sure" counts as no); correct when gt == pred;
- ``planning``: the average of four sentence BLEUs over tokens split on single spaces (`planning_bleu`).

Per file: accuracy of choice and decide records, the mean planning score and mean BLEU-1..4, each by ``np.mean`` as
upstream computes them. A ground truth that is empty (or only spaces) is refused as a data error, as the
generation scorer's empty choice is: upstream would count every choice answer right against it.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import numpy as np

__all__ = ["PLAN_KIND", "planning_type", "choice_correct", "decide_correct", "planning_bleu", "score_plan",
           "plan_entries", "format_plan_entry"]

# Upstream's three name lists (choice_task_name, decide_task_name, planning_task_name), in its order.
_NAMES = (
    ("plan_choice", ("Scene_Understanding", "Past_Multi_task_Selection", "Past_Primitive_Selection",
                     "Future_Multi_task_Selection", "Future_Primitive_Selection", "Temporal_Understanding")),
    ("plan_decide", ("Success_Negative_Task", "Success_Positive_Task", "Discriminative_Affordance_Negative_Task",
                     "Discriminative_Affordance_Positive_Task")),
    ("planning", ("Planning_Task", "Past_Description_Task", "Planning_with_Context_Task",
                  "Planning_Remaining_Steps_Task", "Generative_Affordance_Task", "Future_Prediction_Task")),
)
# Upstream type -> the kit kind its row is reported under (the strict summaries read `correct` / `bleu` by kind).
PLAN_KIND = {"plan_choice": "choice", "plan_decide": "yesno", "planning": "planning"}

# nltk's SmoothingFunction().method1: an n-gram order with no match counts epsilon matches instead of 0.
_EPSILON = 0.1
# get_bleu_score's weights per n-gram order used: BLEU-k uses orders 1..min(k, reference length), at least 1.
_WEIGHTS = {1: (1.0,), 2: (0.5, 0.5), 3: (0.33, 0.33, 0.33), 4: (0.25, 0.25, 0.25, 0.25)}


def planning_type(record_id: Any) -> str | None:
    """"plan_choice", "plan_decide" or "planning" when the id names one of upstream's task-planning tasks."""
    if not isinstance(record_id, str):  # upstream's `name in id` needs a string; no integer id names a task
        return None
    for utype, names in _NAMES:
        if any(name in record_id for name in names):
            return utype
    return None


def _last_line(pred: str) -> str:
    return pred.split("\n")[-1].lower()


def choice_correct(pred: str, gt: str) -> bool:
    p, g = _last_line(pred), gt.lower()
    return g in p or p in g


def decide_correct(pred: str, gt: str) -> bool:
    p, g = _last_line(pred), gt.lower()
    if g in ("yes", "no"):
        p = "yes" if "yes" in p else "no" if "no" in p else p
    return g == p


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def _log_precisions(cand: list[str], ref: list[str]) -> list[float] | None:
    """log of the clipped n-gram precision for n = 1..4 (method1's epsilon for an order with no match), or None when
    no unigram matches (sentence_bleu then returns 0 whatever the weights)."""
    logs = []
    for n in range(1, 5):
        hyp, have = _ngrams(cand, n), _ngrams(ref, n)
        matched = sum(min(c, have[g]) for g, c in hyp.items())
        total = max(1, sum(hyp.values()))
        if n == 1 and matched == 0:
            return None
        logs.append(math.log(matched / total if matched else _EPSILON / total))
    return logs


def planning_bleu(pred: str, gt: str) -> dict[str, float]:
    """Upstream's get_bleu_score on the last line of `pred` and `gt`, both lower-cased: ``score`` (the mean of the
    four) and ``bleu1``..``bleu4``.

    Written here rather than calling nltk's sentence_bleu: upstream's number depends on exactly what nltk computes
    with SmoothingFunction().method1 (clipped counts over all n-gram orders, epsilon 0.1 for an order with no match,
    0 when no unigram matches, the brevity penalty of the one reference), while the kit's strict `bleu` in
    metrics.py is a different, unsmoothed BLEU that stays as it is; and nltk is not a runtime dependency. The same
    float operations in the same order (fsum of weight x log precision, exp, times the penalty) give the same
    numbers; tests/eval/test_upstream_planning.py compares them with nltk's on fuzzed answers.
    """
    cand, ref = _last_line(pred).split(" "), gt.lower().split(" ")
    logs = _log_precisions(cand, ref)
    if len(cand) > len(ref):
        penalty = 1.0
    else:  # a split string has at least one token, so no division by zero
        penalty = math.exp(1 - len(ref) / len(cand))
    out: dict[str, float] = {}
    for k in range(1, 5):
        weights = _WEIGHTS[max(1, min(k, len(ref)))]
        out[f"bleu{k}"] = 0.0 if logs is None else penalty * math.exp(math.fsum(w * x for w, x in zip(weights, logs)))
    out["score"] = (out["bleu1"] + out["bleu2"] + out["bleu3"] + out["bleu4"]) / 4
    return out


def score_plan(utype: str, pred: str, gt: str) -> dict:
    """The row fields of one task-planning record of upstream type `utype` (see `planning_type`): ``upstream_type``,
    ``kind``, ``kind_from``, then ``correct`` (choice, decide) or ``bleu_avg``, ``bleu1``..``bleu4`` and ``bleu``
    (= bleu_avg, what the per-kind summary averages) for planning. ValueError for an empty ground truth."""
    if not gt.strip():
        raise ValueError("empty ground truth (upstream's task-planning scorer would count every choice answer "
                         "correct and compare a plan with nothing)")
    out: dict[str, Any] = {"upstream_type": utype, "kind": PLAN_KIND[utype], "kind_from": "upstream-id"}
    if utype == "planning":
        b = planning_bleu(pred, gt)
        out.update(bleu_avg=b["score"], bleu=b["score"], **{f"bleu{k}": b[f"bleu{k}"] for k in range(1, 5)})
    else:
        out["correct"] = (choice_correct if utype == "plan_choice" else decide_correct)(pred, gt)
    return out


def plan_entries(task: str, rows: list[dict], suffix: bool) -> dict[str, dict]:
    """Upstream's per-file numbers for one task's task-planning `rows`, one entry per upstream type (upstream scores
    one combined file and prints a number per type). Keyed by the task, or ``"task [type]"`` when `suffix` (the
    task holds more than one type, so one key would not do)."""
    out: dict[str, dict] = {}
    for utype in PLAN_KIND:
        sel = [r for r in rows if r.get("upstream_type") == utype]
        if not sel:
            continue
        entry: dict[str, Any] = {"type": utype, "count": len(sel)}
        if utype == "planning":
            entry.update({k: float(np.mean([r[k] for r in sel])) for k in ("bleu_avg", "bleu1", "bleu2", "bleu3",
                                                                            "bleu4")})
            entry["score"] = entry["bleu_avg"]
        else:
            entry["accuracy"] = entry["score"] = float(np.mean([1 if r["correct"] else 0 for r in sel]))
        out[f"{task} [{utype}]" if suffix else task] = entry
    return out


def format_plan_entry(name: str, e: dict) -> str:
    if e["type"] == "planning":
        return (f"{name} : planning BLEU score: {e['bleu_avg']:.4f} (BLEU-1 {e['bleu1']:.4f}, BLEU-2 {e['bleu2']:.4f}, "
                f"BLEU-3 {e['bleu3']:.4f}, BLEU-4 {e['bleu4']:.4f})  (n={e['count']})")
    return f"{name} : {e['type'][5:]} Accuracy: {e['accuracy']:.4f}  (n={e['count']})"
