"""--upstream-compatible reproduces RoboInter's task-planning scorer (task_planning/eval.py) record for record.

The oracle below follows that script's published rules and calls nltk's sentence_bleu, as the script does; the kit
computes the same BLEU without nltk (lora_manip/eval/upstream_planning.py says why)."""

import random

import numpy as np
import pytest
from nltk.translate import bleu_score as nltk_bleu  # the dev extra's: the oracle, never the kit's code

from lora_manip.eval import upstream_planning as upp
from lora_manip.eval.report import format_table
from lora_manip.eval.score import score_records


# ------------------------------------------------------------------------------------------------------ the oracle
def oracle_bleu(pred_line: str, gt: str) -> dict:
    """get_bleu_score as published: reference-length-dependent weights, nltk's method1 smoothing."""
    cand, ref = pred_line.split(" "), [gt.split(" ")]
    one, two, three, four = (1.0, 0.0, 0.0, 0.0), (0.5, 0.5, 0.0, 0.0), (0.33, 0.33, 0.33, 0.0), (0.25,) * 4
    n = len(ref[0])
    weights = [one] * 4 if n <= 1 else [one, two, two, two] if n == 2 else [one, two, three, three] if n == 3 \
        else [one, two, three, four]
    smooth = nltk_bleu.SmoothingFunction().method1
    b = [nltk_bleu.sentence_bleu(ref, cand, weights=w, smoothing_function=smooth) for w in weights]
    return {"score": (b[0] + b[1] + b[2] + b[3]) / 4, "bleu1": b[0], "bleu2": b[1], "bleu3": b[2], "bleu4": b[3]}


def oracle_record(rid: str, pred: str, gt: str):
    """One record as the script's loop scores it: (type, 0/1 or the BLEU dict)."""
    p, g = pred.split("\n")[-1].lower(), gt.lower()
    kinds = [("choice", upp._NAMES[0][1]), ("decide", upp._NAMES[1][1]), ("planning", upp._NAMES[2][1])]
    kind = next(k for k, names in kinds if any(n in rid for n in names))
    if kind == "choice":
        return kind, int(g in p or p in g)
    if kind == "decide":
        if g in ["yes", "no"]:
            p = "yes" if "yes" in p else "no" if "no" in p else p
        return kind, int(g == p)
    return kind, oracle_bleu(p, g)


_WORDS = ["pick", "up", "the", "red", "cup", "Red", "CUP", "place", "it", "on", "table", "the.", ",", ".", "it,",
          "a", "", "drawer", "open"]
_SEPS = [" ", " ", " ", "  ", "   ", "\t"]


def _text(rng: random.Random, n_words: int, newlines: bool) -> str:
    words = [rng.choice(_WORDS) for _ in range(n_words)]
    if words and rng.random() < 0.3:  # repeated words: clipping decides the precision
        words += [words[0]] * rng.randint(1, 4)
    out = ""
    for i, w in enumerate(words):
        out += (rng.choice(_SEPS + (["\n"] if newlines else [])) if i else "") + w
    return out + (rng.choice(["", "\n", " "]) if newlines and rng.random() < 0.2 else "")


def _pairs(count: int, seed: int = 0):
    rng = random.Random(seed)
    for _ in range(count):
        gt = _text(rng, rng.choice([0, 1, 1, 2, 2, 3, 3, 4, 5, 8, 12]), newlines=False)
        pred = gt if rng.random() < 0.1 else _text(rng, rng.choice([0, 1, 2, 3, 4, 6, 10, 15]), newlines=True)
        yield pred, gt


def test_bleu_equals_nltk_sentence_bleu_on_fuzzed_answers():
    pairs = list(_pairs(3000))
    assert sum(1 for _, g in pairs if g == "") > 20 and sum(1 for p, _ in pairs if "\n" in p) > 500
    nonzero = 0
    for pred, gt in pairs:
        want = oracle_bleu(pred.split("\n")[-1].lower(), gt.lower())
        got = upp.planning_bleu(pred, gt)
        assert got == want, (pred, gt)  # exact: the same float operations in the same order
        nonzero += want["bleu4"] > 0 and want["bleu4"] != want["bleu1"]
    assert nonzero > 100  # the fuzz reaches higher n-gram orders, not only zeros and unigrams


def test_records_and_file_means_equal_the_script_on_fuzzed_records():
    rng = random.Random(1)
    names = [n for _, group in upp._NAMES for n in group]
    records = []
    for i, (pred, gt) in enumerate(_pairs(1500, seed=2)):
        name = rng.choice(names)
        if name in upp._NAMES[0][1]:
            gt = rng.choice(["A", "B", "C", "D", "(b)", "The red cup"])
        elif name in upp._NAMES[1][1]:
            gt = rng.choice(["Yes", "No", "yes", "Maybe"])
        if not gt.strip():
            continue  # refused (a data error), tested below
        records.append({"id": f"ep{i}_{name}_{i}", "task": "task_planning", "pred": pred, "gt": gt})
    rows, summary = score_records(records, upstream_compatible=True)
    assert len(rows) == len(records) and not summary["data_errors"]
    per_type: dict = {"choice": [], "decide": [], "planning": []}
    for rec, row in zip(records, rows):
        kind, want = oracle_record(rec["id"], rec["pred"], rec["gt"])
        per_type[kind].append(want)
        assert row["upstream_type"] == {"choice": "plan_choice", "decide": "plan_decide"}.get(kind, kind)
        if kind == "planning":
            assert {k: row[k] for k in ("bleu1", "bleu2", "bleu3", "bleu4")} == {k: want[k] for k in
                                                                                 ("bleu1", "bleu2", "bleu3", "bleu4")}
            assert row["bleu_avg"] == want["score"]
        else:
            assert row["correct"] is bool(want), rec
    files = summary["upstream"]["files"]
    # one row per type, named as the release's val file of that type (the id says which: identity.py)
    assert files["plan_choice"]["accuracy"] == float(np.mean(per_type["choice"]))
    assert files["plan_decide"]["accuracy"] == float(np.mean(per_type["decide"]))
    plan = files["planning"]
    assert plan["bleu_avg"] == plan["score"] == float(np.mean([x["score"] for x in per_type["planning"]]))
    for k in ("bleu1", "bleu2", "bleu3", "bleu4"):
        assert plan[k] == float(np.mean([x[k] for x in per_type["planning"]]))


# -------------------------------------------------------------------------------------------- id classification
@pytest.mark.parametrize("rid,utype", [
    ("droid_12_Planning_Task_3", "planning"),
    ("x_Past_Description_Task_1", "planning"),
    ("x_Planning_Remaining_Steps_Task_1", "planning"),
    ("x_Generative_Affordance_Task_1", "planning"),
    ("x_Future_Prediction_Task_1", "planning"),
    ("x_Future_Primitive_Selection_1", "plan_choice"),
    ("x_Temporal_Understanding_1", "plan_choice"),
    ("x_Success_Negative_Task_1", "plan_decide"),
    ("x_Discriminative_Affordance_Positive_Task_1", "plan_decide"),
    # upstream checks choice names, then decide names, then planning names: the first list that matches wins
    ("Scene_Understanding/Planning_Task_1", "plan_choice"),
    ("Success_Positive_Task/Past_Description_Task", "plan_decide"),
    ("Past_Multi_task_Selection/Success_Negative_Task", "plan_choice"),
    # no name (case matters, as in upstream's `in`): not a task-planning record
    ("x_planning_task_1", None),
    ("RH20T_contact_box_7", None),
    (7, None),
    (None, None),
])
def test_plan_type_by_id_in_upstreams_order(rid, utype):
    assert upp.planning_type(rid) == utype


def test_the_id_decides_over_the_records_task_and_unknown_ids_keep_their_rules():
    recs = [
        # a task-planning choice: last line, lower-cased; generation.py's decide would say wrong (no "B" in pred)
        {"id": "e1_Future_Primitive_Selection_1", "task": "traj_choice", "gt": "B", "pred": "The answer is A\nb"},
        # free-text plan named like a planning task: upstream BLEU, reported as planning whatever the task says
        {"id": "e2_Planning_Task_1", "task": "traj_choice", "gt": "pick up the cup", "pred": "pick up the cup"},
        # no task-planning name: generation.py's decide rule, as before (case-sensitive, so "b" is wrong)
        {"id": "e3", "task": "traj_choice", "gt": "B", "pred": "b"},
        # no task-planning name, free text: the kit's strict BLEU, as before
        {"id": "e4", "task": "planning", "gt": "pick up the cup", "pred": "pick up the cup"},
    ]
    rows, s = score_records(recs, upstream_compatible=True)
    assert not s["data_errors"]
    assert rows[0]["upstream_type"] == "plan_choice" and rows[0]["correct"] is True and rows[0]["kind"] == "choice"
    assert rows[1]["upstream_type"] == "planning" and rows[1]["kind"] == "planning" and rows[1]["bleu_avg"] == 1.0
    assert rows[1]["kind_from"] == "upstream-id" and rows[1]["bleu"] == rows[1]["bleu_avg"]
    assert "upstream_type" not in rows[2] and rows[2]["correct"] is False
    assert "upstream_type" not in rows[3] and "bleu_avg" not in rows[3] and rows[3]["bleu"] == 1.0
    # strict mode ignores upstream's names altogether
    strict_rows, _ = score_records(recs)
    assert all("upstream_type" not in r for r in strict_rows)


# ---------------------------------------------------------------------------------------- choice / decide quirks
@pytest.mark.parametrize("pred,gt,correct", [
    ("", "B", True),  # LEAK: an empty last line is in every ground truth
    ("B is right\n", "B", True),  # LEAK: the last line of an answer ending in a newline is empty
    ("b", "B", True),  # both lower-cased
    ("(b)", "B", True),  # gt in pred
    ("A\nB", "A", False),  # only the last line counts
    ("a cup", "C", True),  # LEAK: the "c" of "cup"
    ("D", "B", False),
])
def test_choice_quirks(pred, gt, correct):
    assert upp.choice_correct(pred, gt) is correct
    rows, _ = score_records([{"id": "Scene_Understanding_1", "gt": gt, "pred": pred}], upstream_compatible=True)
    assert rows[0]["correct"] is correct


@pytest.mark.parametrize("pred,gt,correct", [
    ("Yes, it succeeded.", "Yes", True),
    ("I am not sure", "No", True),  # LEAK: "no" in "not"
    ("yes and no", "No", False),  # "yes" is looked for first
    ("", "No", False),  # an empty answer is no answer here (gt == pred)
    ("The task failed.\nno", "no", True),
    ("maybe", "Maybe", True),  # a ground truth other than yes/no is compared as it is, lower-cased
    ("Maybe.", "Maybe", False),
])
def test_decide_quirks(pred, gt, correct):
    assert upp.decide_correct(pred, gt) is correct
    rows, _ = score_records([{"id": "Success_Positive_Task_1", "gt": gt, "pred": pred}], upstream_compatible=True)
    assert rows[0]["correct"] is correct


@pytest.mark.parametrize("rid", ["Scene_Understanding_1", "Success_Positive_Task_1", "Planning_Task_1"])
def test_empty_ground_truth_is_a_data_error(rid):
    rows, s = score_records([{"id": rid, "gt": "  ", "pred": ""}], upstream_compatible=True)
    assert not rows and s["data_errors"][0]["field"] == "gt" and "empty ground truth" in s["data_errors"][0]["reason"]


# ---------------------------------------------------------------------------------------------- per-file numbers
def test_per_file_entries_printout_and_average_score():
    recs = [
        {"id": "a_Scene_Understanding_1", "task": "plan_choice_file", "gt": "A", "pred": "A"},
        {"id": "a_Scene_Understanding_2", "task": "plan_choice_file", "gt": "A", "pred": "C"},
        {"id": "b_Success_Positive_Task_1", "task": "plan_decide_file", "gt": "Yes", "pred": "yes"},
        {"id": "c_Planning_Task_1", "task": "plan_file", "gt": "open the drawer", "pred": "open the drawer"},
        {"id": "c_Planning_Task_2", "task": "plan_file", "gt": "open", "pred": "close"},
        {"id": 1, "task": "traj_choice", "gt": "A", "pred": "A"},
    ]
    _, s = score_records(recs, upstream_compatible=True)
    files = s["upstream"]["files"]  # the id names the task-planning file before a task no file has
    assert files["plan_choice"] == {"type": "plan_choice", "count": 2, "accuracy": 0.5, "score": 0.5}
    assert files["plan_decide"]["type"] == "plan_decide" and files["plan_decide"]["accuracy"] == 1.0
    plan = files["planning"]
    assert plan["type"] == "planning" and plan["count"] == 2 and plan["bleu_avg"] == plan["score"] == 0.5
    assert [plan[f"bleu{k}"] for k in range(1, 5)] == [0.5] * 4
    assert s["upstream"]["average_score"] == 1.0  # traj_choice alone: generation.py prints the only average
    assert s["all"]["planning"]["bleu"] == 0.5 and s["all"]["choice"]["accuracy"] == 2 / 3
    table = format_table(s)
    assert "plan_choice : choice Accuracy: 0.5000  (n=2)" in table
    assert "planning : planning BLEU score: 0.5000 (BLEU-1 0.5000" in table
    assert "task-planning lines not in it" in table
