"""Answer parsing: every format models emit, task inference, upstream flaws, and fuzzing (never raises)."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_manip.answers.kinds import KINDS, TASK_KINDS, classify_task, parse_task_map, task_from_filename
from lora_manip.answers.parse import parse_answer
from lora_manip.answers.geometry import Parsed

BOX = (0.1, 0.2, 0.3, 0.4)


def _close(a, b):
    return len(a) == len(b) and all(math.isclose(x, y, abs_tol=1e-12) for x, y in zip(a, b))


# ---------------------------------------------------------------------------------------------------------- boxes
@pytest.mark.parametrize(
    "text",
    [
        '{"current_bbox": [[0.1, 0.2], [0.3, 0.4]]}',
        '{"final_bbox": [[0.1, 0.2], [0.3, 0.4]]}',
        '{"gripper_bbox":[[0.1,0.2],[0.3,0.4]]}',
        "[0.1, 0.2, 0.3, 0.4]",
        "[[0.1, 0.2], [0.3, 0.4]]",
        '{"curent_bboxx": [[0.1, 0.2], [0.3, 0.4]]}',  # misspelt key
        '{"answer": [0.1, 0.2, 0.3, 0.4]}',  # different key
        "{'current_bbox': [[0.1, 0.2], [0.3, 0.4]]}",  # single quotes
        '{"current_bbox": [[0.1, 0.2], [0.3, 0.4],],}',  # trailing commas
        'Sure! The bounding box is {"current_bbox": [[0.1, 0.2], [0.3, 0.4]]}. Hope this helps (really).',
        "The object (see the image) is at [0.1, 0.2, 0.3, 0.4].",
        "[[0.3, 0.4], [0.1, 0.2]]",  # swapped corners
        "[[0.1, 0.4], [0.3, 0.2]]",  # swapped y only
        "from (0.1, 0.2) to (0.3, 0.4)",
        "0.1, 0.2, 0.3, 0.4",
        "[1e-1, 2E-1, 3.0e-1, .4]",  # scientific notation, leading dot
        '```json\n{"current_bbox": [[0.1, 0.2], [0.3, 0.4]]}\n```',
        "[0.1 0.2 0.3 0.4]",
    ],
)
def test_box_formats(text):
    p = parse_answer(text, "box")
    assert p.error is None, p.error
    assert isinstance(p.value, tuple) and _close(p.value, BOX)


def test_box_keeps_negative_numbers_and_integers():
    assert parse_answer("[[-0.1, -0.2], [0.3, 0.4]]", "box").value == (-0.1, -0.2, 0.3, 0.4)
    assert parse_answer("[10, 20, 30, 40]", "box").value == (10.0, 20.0, 30.0, 40.0)
    assert parse_answer("[0.3, -0.2, -0.1, 0.4]", "box").value == (-0.1, -0.2, 0.3, 0.4)
    assert parse_answer("[\u22120.1, 0.2, 0.3, 0.4]", "box").value == (-0.1, 0.2, 0.3, 0.4)  # unicode minus


def test_box_prefers_the_matching_key():
    text = '{"contact_point": [[0.9, 0.9]], "current_bbox": [[0.1, 0.2], [0.3, 0.4]]}'
    assert parse_answer(text, "box").value == BOX
    assert parse_answer(text, "point").value == [(0.9, 0.9)]


@pytest.mark.parametrize(
    "text,needle",
    [
        ("", "empty"),
        ("   \n\t", "empty"),
        ("[0.1, 0.2, 0.3]", ""),
        ("[[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]]", "2 corner points"),
        ('{"current_bbox": [[0.1, 0.2], [0.3', "unbalanced"),
        ("[x1, y1, x2, y2]", ""),
        ("I cannot see the object.", ""),
        ("[1e999, 0.2, 0.3, 0.4]", "non-finite"),
    ],
)
def test_box_failures(text, needle):
    p = parse_answer(text, "box")
    assert p.value is None and p.error and needle in p.error


# ---------------------------------------------------------------------------------------------- points, trajectories
def test_points():
    assert parse_answer('{"contact_point": [[0.1, 0.2], [0.3, 0.4]]}', "point").value == [(0.1, 0.2), (0.3, 0.4)]
    assert parse_answer('{"contact_point": [[0.5, 0.6]]}', "point").value == [(0.5, 0.6)]
    assert parse_answer("[0.5, 0.6]", "point").value == [(0.5, 0.6)]
    assert parse_answer("The contact points are (0.1, 0.2) and (0.3, -0.4).", "point").value == [
        (0.1, 0.2),
        (0.3, -0.4),
    ]
    assert parse_answer("{'contact_pnt': [[1, 2], [3, 4],]}", "point").value == [(1.0, 2.0), (3.0, 4.0)]
    assert parse_answer("[0.1, 0.2, 0.3]", "point").error is not None  # odd number of coordinates
    assert parse_answer("", "point").error == "empty"


def test_trajectory():
    traj = [(i / 10, 1 - i / 10) for i in range(10)]
    text = '{"future_traj": ' + str([list(p) for p in traj]) + "}"
    assert parse_answer(text, "trajectory").value == traj
    assert parse_answer("Here: " + str(traj) + " Done.", "trajectory").value == traj  # tuples, prose
    assert parse_answer("[[0.1, -0.2], [3e-1, 0.4], [5, 6],]", "trajectory").value == [(0.1, -0.2), (0.3, 0.4), (5, 6)]
    assert parse_answer('{"future_traj": [[0.1, 0.2], [0.3', "trajectory").error.startswith("unbalanced")
    assert parse_answer("no idea", "trajectory").error is not None


# --------------------------------------------------------------------------------------------------- choice, yes/no
@pytest.mark.parametrize(
    "text",
    ["B", "B.", "(B)", "[B]", "b", " B \n", "The answer is B", "The answer is B.", "Answer: (B)", "B. red cube",
     "B) red cube", "(B) the red cube", "Option B", "**B**", "I think B"],
)
def test_choice_accepts(text):
    assert parse_answer(text, "choice") == Parsed("B", None)


@pytest.mark.parametrize("text", ["A or B", "(A) or (B)", "A. red or C. blue", "either B or D", "", "  ", "none", "G"])
def test_choice_refuses(text):
    p = parse_answer(text, "choice")
    assert p.value is None and p.error


def test_choice_ambiguous_message():
    assert "ambiguous" in parse_answer("A or B", "choice").error
    assert parse_answer("", "choice").error == "empty"


@pytest.mark.parametrize(
    "text,value",
    [("Yes", True), ("yes.", True), ("YES", True), ("No", False), ("no, it is not reachable", False),
     ("Yes, no obstacle blocks it", True), ("I would say yes", True), ("The answer is: No.", False)],
)
def test_yesno(text, value):
    assert parse_answer(text, "yesno") == Parsed(value, None)


@pytest.mark.parametrize("text", ["", "maybe", "The gripper says yes but the camera says no", "yesterday"])
def test_yesno_refuses(text):
    assert parse_answer(text, "yesno").value is None


def test_planning():
    assert parse_answer("  pick up the cube \n", "planning") == Parsed("pick up the cube", None)
    assert parse_answer(" ", "planning") == Parsed(None, "empty")


def test_unknown_kind_and_non_string():
    assert parse_answer("B", "nope").error.startswith("unknown task kind")
    assert parse_answer(None, "box").error.startswith("not a string")  # type: ignore[arg-type]


# -------------------------------------------------------------------------------------------------- task inference
@pytest.mark.parametrize(
    "task,kind",
    [("current_bbox", "box"), ("final_bbox", "box"), ("contact_bbox", "box"), ("gripper_bbox", "box"),
     ("object_box", "box"), ("contact_point", "point"), ("grasp_point", "point"), ("future_traj", "trajectory"),
     ("trajectory", "trajectory"), ("choice", "choice"), ("yesno", "yesno"), ("planning", "planning"),
     ("traj_choice", "choice"), ("rh20t_traj_direction_choice", "choice"), ("droid_gripper_det", "box")],
)
def test_classify_task_from_name(task, kind):
    assert classify_task(task, "whatever").kind == kind


@pytest.mark.parametrize(
    "gt,kind",
    [('{"current_bbox": [[0.1, 0.2], [0.3, 0.4]]}', "box"), ('{"gripper_bbox": [[0, 0], [1, 1]]}', "box"),
     ('{"contact_point": [[0.1, 0.2], [0.3, 0.4]]}', "point"), ('{"future_traj": [[0.1, 0.2], [0.3, 0.4]]}', "trajectory"),
     ("B", "choice"), ("D.", "choice"), ("Yes", "yesno"), ("no", "yesno"), ("[0.1, 0.2, 0.3, 0.4]", "box"),
     ("[[0.1, 0.2]]", "point"), ("[[0, 0], [0.1, 0.1], [0.2, 0.2]]", "trajectory"),
     ("Pick up the red cube and place it in the bowl.", "planning")],
)
def test_classify_task_from_gt(gt, kind):
    assert classify_task(None, gt).kind == kind
    assert classify_task("unrecognised_task_name", gt).kind == kind  # unknown names fall back to the format


# ----------------------------------------------------------------------------------------- RoboInter task names
UNDERSTANDING = ["contact_decide", "grasppose_choice", "grounding_choice", "traj_choice", "traj_direction_choice",
                 "traj_direction_choice_with_traj", "trajlang_choice", "trajlang_sub_choice"]
GROUNDING = {"contact_box": "box", "current_box": "box", "final_box": "box", "gripper_det": "box",
             "contact_point": "point", "traj": "trajectory", "traj_wo_init_pos": "trajectory"}


@pytest.mark.parametrize("prefix", ["", "rh20t_", "droid_", "eval_details_", "eval_details_rh20t_"])
def test_robointer_names_map_to_upstream_kinds(prefix):
    for name in UNDERSTANDING:  # "traj" in a choice task's name must not make it a trajectory
        assert classify_task(prefix + name, "B") == ("choice", "name"), name
        assert classify_task(prefix + name, '{"future_traj": [[0, 0], [1, 1]]}').kind == "choice", name
    for name, kind in GROUNDING.items():
        assert classify_task(prefix + name, "B") == (kind, "name"), name
    assert len(TASK_KINDS) >= len(UNDERSTANDING) + len(GROUNDING)


def test_registry_and_file_names():
    assert classify_task("rh20t_vla_current_box_train", "x").kind == "box"
    assert classify_task("droid_vla_traj_qa_train", "x").kind == "trajectory"
    assert classify_task("traj_choice_qa_val", "x") == ("choice", "name")
    assert task_from_filename("results/m/eval_details_traj_choice.json") == "traj_choice"
    assert task_from_filename("/d/rh20t_contact_box_qa.jsonl") == "rh20t_contact_box_qa"
    assert task_from_filename("preds.jsonl") is None


def test_exact_name_beats_substring_and_decide_with_yes_no():
    assert classify_task("trajlang_sub_choice", "[[0.1, 0.2], [0.3, 0.4]]").kind == "choice"
    assert classify_task("my_traj_choice_set", "A") == ("choice", "guess")  # substring: choice before traj
    assert classify_task("contact_decide", "Yes") == ("yesno", "name")  # upstream: one rule for both
    assert classify_task("pointing", "x") == ("pointing", "name")
    assert classify_task("where2place", None) == ("pointing", "name")
    assert classify_task("anything", None, has_mask=True) == ("pointing", "mask")


def test_task_map_wins_and_is_validated():
    tm = parse_task_map(["my_set=box", "Other=decide", "w=mask"])
    assert tm == {"my_set": "box", "Other": "choice", "w": "pointing"}
    assert classify_task("MY_SET", "B", tm) == ("box", "task-map")  # case-insensitive
    assert classify_task("traj_choice", "B", {"traj_choice": "trajectory"}) == ("trajectory", "task-map")
    for bad in ["nokind", "x=", "=box", "x=cube"]:
        with pytest.raises(ValueError, match="NAME=KIND"):
            parse_task_map([bad])


def test_unknown_name_falls_back_to_format():
    assert classify_task("my_eval", "C") == ("choice", "format")
    assert classify_task("my_eval", '{"current_bbox": [[0, 0], [1, 1]]}') == ("box", "format")
    assert classify_task(None, "[[0.1, 0.2]]") == ("point", "format")


# ------------------------------------------------------------------------------------------- answer formats, units
def test_qwen_and_tag_formats():
    size = (640, 480)
    assert parse_answer('[{"bbox_2d": [64, 48, 320, 240], "label": "cup"}]', "box", "pixels", size).value == approx(
        (0.1, 0.1, 0.5, 0.5))
    assert parse_answer('```json\n[{"point_2d": [100, 200], "label": "a"}, {"point_2d": [300, 400]}]\n```',
                        "point", "thousand").value == approx([(0.1, 0.2), (0.3, 0.4)])
    assert parse_answer("<|box_start|>(100,200),(300,400)<|box_end|>", "box", "thousand").value == approx(
        (0.1, 0.2, 0.3, 0.4))
    assert parse_answer("<point>(0.1, 0.2)</point> and <point>[0.3, 0.4]</point>", "pointing").value == approx(
        [(0.1, 0.2), (0.3, 0.4)])
    # Molmo's attributes are percent of the image, whatever --coords says
    molmo = '<points x1="10" y1="20" x2="30.5" y2="40" alt="cups">cups</points>'
    assert parse_answer(molmo, "pointing", "pixels", size).value == approx([(0.1, 0.2), (0.305, 0.4)])
    assert parse_answer('<point x="61.5" y="40.6" alt="mug">mug</point>', "point").value == approx([(0.615, 0.406)])
    assert parse_answer("[(0.25, 0.5), (0.75, 0.5)]", "pointing").value == [(0.25, 0.5), (0.75, 0.5)]


def test_units_and_their_errors():
    assert parse_answer("[320, 240]", "point", "pixels", (640, 480)).value == [(0.5, 0.5)]
    assert parse_answer("[500, 250]", "point", "thousand").value == [(0.5, 0.25)]
    assert parse_answer("[320, 240]", "point", "pixels").error == "pixel coordinates need the image size (w, h)"
    assert "unknown coordinate convention" in parse_answer("[1, 2]", "point", "inches").error


def approx(v):
    """pytest.approx for a box tuple or a list of (x, y) points."""
    flat = list(v) if isinstance(v, tuple) else [c for p in v for c in p]

    class _Eq:
        def __eq__(self, other):
            got = list(other) if isinstance(other, tuple) else [c for p in other for c in p]
            return got == pytest.approx(flat, abs=1e-9)

        def __repr__(self):
            return repr(v)

    return _Eq()


# ------------------------------------------------------------------------------------------------------- fuzzing
_STRUCTURED = st.text(alphabet="[](){},.:-+eE0123456789 \"'abxyABCDEFyesno\n", max_size=60)


def _check(p):
    assert isinstance(p, Parsed)
    assert (p.value is None) != (p.error is None)
    if p.error is not None:
        assert isinstance(p.error, str) and p.error


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=60, deadline=None, database=None)
@given(text=st.text())
def test_fuzz_any_text_never_raises(kind, text):
    _check(parse_answer(text, kind))
    _check(parse_answer(text, kind, "pixels", (640, 480)))


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=60, deadline=None, database=None)
@given(text=_STRUCTURED)
def test_fuzz_structured_text_never_raises(kind, text):
    p = parse_answer(text, kind)
    _check(p)
    if p.error is None and kind == "box":
        x1, y1, x2, y2 = p.value
        assert x1 <= x2 and y1 <= y2 and all(math.isfinite(v) for v in p.value)
    if p.error is None and kind in ("point", "trajectory"):
        assert p.value and all(len(pt) == 2 and all(math.isfinite(c) for c in pt) for pt in p.value)
    if p.error is None and kind == "choice":
        assert p.value in "ABCDEF" and len(p.value) == 1


_coord = st.floats(min_value=-10, max_value=10, allow_nan=False)


@settings(max_examples=80, deadline=None, database=None)
@given(a=st.tuples(_coord, _coord), b=st.tuples(_coord, _coord), prose=st.sampled_from(["", "Sure. ", "Answer: "]))
def test_box_roundtrip(a, b, prose):
    text = prose + '{"current_bbox": [[%r, %r], [%r, %r]]}' % (a[0], a[1], b[0], b[1])
    p = parse_answer(text, "box")
    assert p.value == (min(a[0], b[0]), min(a[1], b[1]), max(a[0], b[0]), max(a[1], b[1]))


@settings(max_examples=60, deadline=None, database=None)
@given(pts=st.lists(st.tuples(_coord, _coord), min_size=1, max_size=12))
def test_trajectory_roundtrip(pts):
    text = '{"future_traj": ' + str([list(p) for p in pts]) + "}"
    assert parse_answer(text, "trajectory").value == pts


def test_a_planning_guess_yields_to_a_clear_ground_truth():
    """RoboInter's task_planning files hold free-text plans, A-D primitive choices and Yes/No success questions under
    one task name: the name's "plan" guess must not score a letter or a Yes/No as a plan (BLEU)."""
    assert classify_task("task_planning", "Pick up the cup") == ("planning", "guess")
    assert classify_task("task_planning", "C") == ("choice", "format")
    assert classify_task("task_planning", "No") == ("yesno", "format")
    assert classify_task("planning", "C") == ("planning", "name")  # a kind named outright is kept
    assert classify_task("task_planning", "C", {"task_planning": "planning"}) == ("planning", "task-map")
