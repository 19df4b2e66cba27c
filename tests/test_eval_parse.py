"""Answer parsing: every format models emit, task inference, upstream flaws, and fuzzing (never raises)."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_manip.eval.parse import KINDS, Parsed, infer_task, parse_answer, parse_answer_upstream

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
     ("trajectory", "trajectory"), ("choice", "choice"), ("yesno", "yesno"), ("planning", "planning")],
)
def test_infer_task_from_name(task, kind):
    assert infer_task("whatever", task) == kind


@pytest.mark.parametrize(
    "gt,kind",
    [('{"current_bbox": [[0.1, 0.2], [0.3, 0.4]]}', "box"), ('{"gripper_bbox": [[0, 0], [1, 1]]}', "box"),
     ('{"contact_point": [[0.1, 0.2], [0.3, 0.4]]}', "point"), ('{"future_traj": [[0.1, 0.2], [0.3, 0.4]]}', "trajectory"),
     ("B", "choice"), ("D.", "choice"), ("Yes", "yesno"), ("no", "yesno"), ("[0.1, 0.2, 0.3, 0.4]", "box"),
     ("[[0.1, 0.2]]", "point"), ("[[0, 0], [0.1, 0.1], [0.2, 0.2]]", "trajectory"),
     ("Pick up the red cube and place it in the bowl.", "planning")],
)
def test_infer_task_from_gt(gt, kind):
    assert infer_task(gt) == kind
    assert infer_task(gt, "unrecognised_task_name") == kind  # unknown names fall back to the format


# ------------------------------------------------------------------------------------------------ upstream parser
def test_upstream_drops_minus_signs_strict_keeps_them():
    text = "[[-0.1, 0.2], [0.3, 0.4]]"
    assert parse_answer(text, "box").value == (-0.1, 0.2, 0.3, 0.4)
    assert parse_answer_upstream(text, "box").value == (0.1, 0.2, 0.3, 0.4)
    assert parse_answer_upstream("[[-0.1, -0.2], [0.3, 0.4]]", "trajectory").value == [(0.1, 0.2), (0.3, 0.4)]


def test_upstream_rules():
    assert parse_answer_upstream("[0.1, 0.2, 0.3, 0.4, 0.5]", "box").value == (0.1, 0.2, 0.3, 0.4)  # first four
    assert parse_answer_upstream("[0.3, 0.4, 0.1, 0.2]", "box").value == (0.3, 0.4, 0.1, 0.2)  # corners not fixed
    assert parse_answer_upstream("[0.1, 0.2]", "box").error is not None
    assert parse_answer_upstream("0.1 0.2 0.3", "point").value == [(0.1, 0.2)]  # odd one dropped
    assert parse_answer_upstream("1e-3", "point").value == [(1.0, 3.0)]  # no exponent support
    assert parse_answer_upstream("", "choice") == Parsed("", None)  # empty is not a failure upstream
    assert parse_answer_upstream("  B ", "choice") == Parsed("B", None)
    assert parse_answer_upstream("", "trajectory").error is not None


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
    _check(parse_answer_upstream(text, kind))


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=60, deadline=None, database=None)
@given(text=_STRUCTURED)
def test_fuzz_structured_text_never_raises(kind, text):
    p = parse_answer(text, kind)
    _check(p)
    _check(parse_answer_upstream(text, kind))
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
