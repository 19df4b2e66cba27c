"""Metrics against hand-computed values."""

import math
from itertools import permutations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_manip.eval.metrics import (
    bleu,
    box_iou,
    discrete_frechet,
    dtw_distance,
    endpoint_error,
    point_distance,
    to_pixels,
)

approx = pytest.approx


# ------------------------------------------------------------------------------------------------------------ IoU
@pytest.mark.parametrize(
    "a,b,iou",
    [
        ((0, 0, 2, 2), (1, 1, 3, 3), 1 / 7),  # overlap 1, union 4 + 4 - 1
        ((0, 0, 1, 1), (0, 0, 1, 1), 1.0),
        ((0, 0, 4, 4), (1, 1, 2, 2), 1 / 16),  # contained
        ((0, 0, 1, 1), (2, 2, 3, 3), 0.0),  # disjoint
        ((0, 0, 1, 1), (1, 0, 2, 1), 0.0),  # touching edge
        ((0, 0, 0, 1), (0, 0, 1, 1), 0.0),  # zero width
        ((0.5, 0.5, 0.5, 0.5), (0.5, 0.5, 0.5, 0.5), 0.0),  # two identical points: no 0/0
        ((1, 1, 0, 0), (0, 0, 1, 1), 0.0),  # inverted corners = degenerate
        ((0.1, 0.1, 0.3, 0.5), (0.2, 0.1, 0.4, 0.5), 0.08 / 0.24),
    ],
)
def test_box_iou(a, b, iou):
    assert box_iou(a, b) == approx(iou)
    assert box_iou(b, a) == approx(iou)


def test_box_iou_non_finite_is_zero_not_nan():
    assert box_iou((0, 0, float("nan"), 1), (0, 0, 1, 1)) == 0.0
    assert box_iou((0, 0, float("inf"), 1), (0, 0, 1, 1)) == 0.0


@settings(max_examples=100, deadline=None, database=None)
@given(st.lists(st.floats(-2, 2, allow_nan=False), min_size=8, max_size=8))
def test_box_iou_in_unit_interval(v):
    x = box_iou(v[:4], v[4:])
    assert 0.0 <= x <= 1.0 and not math.isnan(x)


# --------------------------------------------------------------------------------------------------------- points
def test_point_distance_matching():
    assert point_distance([(0, 0), (1, 0)], [(1, 0), (0, 0)]) == approx(0.0)  # order does not matter
    assert point_distance([(0, 0), (1, 0)], [(0, 1), (1, 1)]) == approx(1.0)
    assert point_distance([(0, 0)], [(3, 4)]) == approx(5.0)
    # 2 points: min over the two orders. Pairing straight: (1 + 1)/2 = 1; crossed: (sqrt(2) + sqrt(2))/2.
    assert point_distance([(0, 0), (1, 1)], [(0, 1), (1, 0)]) == approx(1.0)


def test_point_distance_different_counts_matches_min_len():
    assert point_distance([(0, 0)], [(5, 5), (0, 1)]) == approx(1.0)
    assert point_distance([(5, 5), (0, 1), (9, 9)], [(0, 0)]) == approx(1.0)
    assert point_distance([(0, 0), (10, 0)], [(10, 1), (0, 2), (50, 50)]) == approx(1.5)


def test_point_distance_empty_raises():
    with pytest.raises(ValueError):
        point_distance([], [(0, 0)])


def _brute(p, g):
    if len(p) > len(g):
        p, g = g, p
    return min(
        sum(math.dist(p[i], g[j]) for i, j in enumerate(cols)) for cols in permutations(range(len(g)), len(p))
    ) / len(p)


_pt = st.tuples(st.integers(0, 20).map(float), st.integers(0, 20).map(float))


@settings(max_examples=40, deadline=None, database=None)
@given(p=st.lists(_pt, min_size=1, max_size=4), g=st.lists(_pt, min_size=7, max_size=9))
def test_point_distance_optimal_vs_brute_force(p, g):  # large sides exercise the Hungarian path
    assert point_distance(p, g) == approx(_brute(p, g))
    assert point_distance(g, p) == approx(_brute(p, g))


@settings(max_examples=15, deadline=None, database=None)
@given(p=st.lists(_pt, min_size=7, max_size=7), g=st.lists(_pt, min_size=7, max_size=7))
def test_point_distance_square_hungarian(p, g):
    assert point_distance(p, g) == approx(_brute(p, g))


# ------------------------------------------------------------------------------------------------------ DTW etc.
def test_dtw_hand_computed():
    assert dtw_distance([(0, 0), (1, 0)], [(0, 0), (1, 0)]) == 0.0
    assert dtw_distance([(0, 0), (1, 0)], [(0, 1), (1, 1)]) == approx(2.0)  # a sum, not a mean
    assert dtw_distance([(0, 0)], [(0, 1), (0, 2), (0, 3)]) == approx(6.0)  # 1 + 2 + 3
    # different lengths: a1 aligns to either end point at cost 1, the ends cost 0.
    assert dtw_distance([(0, 0), (1, 0), (2, 0)], [(0, 0), (2, 0)]) == approx(1.0)
    # repeated points cost nothing extra
    assert dtw_distance([(0, 0), (0, 0), (0, 0), (3, 4)], [(0, 0), (3, 4)]) == approx(0.0)
    # one wrong waypoint out of four: distance 5 counted once
    assert dtw_distance([(0, 0), (1, 0), (2, 0), (3, 0)], [(0, 0), (1, 0), (2, 5), (3, 0)]) == approx(5.0)


def test_dtw_is_symmetric_and_scales_with_pixels():
    a = [(0.1, 0.2), (0.3, 0.3), (0.5, 0.5)]
    b = [(0.1, 0.25), (0.5, 0.4)]
    assert dtw_distance(a, b) == approx(dtw_distance(b, a))
    assert dtw_distance(to_pixels(a, 100, 100), to_pixels(b, 100, 100)) == approx(100 * dtw_distance(a, b))


def test_frechet_and_endpoint():
    assert discrete_frechet([(0, 0), (1, 0)], [(0, 1), (1, 1)]) == approx(1.0)
    assert discrete_frechet([(0, 0)], [(0, 1), (0, 2), (0, 3)]) == approx(3.0)
    assert discrete_frechet([(0, 0), (1, 0), (2, 0)], [(0, 0), (2, 0)]) == approx(1.0)
    assert discrete_frechet([(0, 0), (1, 0)], [(0, 0), (1, 0)]) == 0.0
    # Frechet is a max: one far waypoint dominates
    assert discrete_frechet([(0, 0), (1, 0), (2, 0)], [(0, 0), (1, 7), (2, 0)]) == approx(7.0)
    assert endpoint_error([(0, 0), (3, 4)], [(9, 9), (0, 0)]) == approx(5.0)
    assert endpoint_error([(1, 1)], [(0, 0), (1, 1)]) == 0.0
    with pytest.raises(ValueError):
        dtw_distance([], [(0, 0)])


def test_to_pixels():
    assert to_pixels([(0.5, 0.25), (1, 1)], 640, 480) == [(320.0, 120.0), (640.0, 480.0)]


# ----------------------------------------------------------------------------------------------------------- BLEU
def test_bleu_identical_and_disjoint():
    assert bleu("pick up the red cube", "pick up the red cube") == approx(1.0)
    assert bleu("Pick up the cube.", "pick up the cube .") == approx(1.0)  # lower-case, punctuation tokens
    assert bleu("cube", "cube") == approx(1.0)  # too short for bigrams: no penalty
    assert bleu("open drawer", "pick the cube") == approx(0.0, abs=1e-9)
    assert bleu("", "pick the cube") == 0.0


def test_bleu_hand_computed():
    # candidate shorter than the reference: precisions 1, BP = exp(1 - 3/2)
    assert bleu("the cat", "the cat sat") == approx(math.exp(-0.5))
    # p1 = 3/4, p2 = (1+1)/(3+1), p3 = (0+1)/(2+1), p4 = (0+1)/(1+1); BP = 1
    p = [0.75, 0.5, 1 / 3, 0.5]
    expected = sum(math.prod(p[:n]) ** (1 / n) for n in range(1, 5)) / 4
    assert bleu("the cat sat on", "the dog sat on") == approx(expected)
    assert bleu("the cat sat on", "the dog sat on") == approx(0.5905927, abs=1e-6)


def test_bleu_order_matters_and_range():
    good = bleu("pick up the cube then place it", "pick up the cube then place it in the bowl")
    shuffled = bleu("it place then cube the up pick", "pick up the cube then place it in the bowl")
    assert 0 < shuffled < good < 1
