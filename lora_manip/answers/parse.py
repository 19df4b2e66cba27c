"""The strict answer parser: an answer's text, read as a task kind (kinds.py), to a value or the reason it does not
parse (pure Python, no torch). `parse_answer` never raises; values it returns:

- box: ``(x1, y1, x2, y2)`` floats in [0, 1] units with ``x1 <= x2`` and ``y1 <= y2``
- point / trajectory / pointing: list of ``(x, y)`` float tuples in [0, 1] units
- choice: an upper-case letter ``"A"``-``"F"``; yesno: ``bool``; planning: the stripped text

The upstream scorers' own rules live in eval/upstream.py (RoboInter) and eval/pointing.py (RoboPoint).
"""

from __future__ import annotations

import re
from typing import Callable

from .geometry import DEFAULT_COORDS, Parsed, fail, parse_geometry
from .kinds import CHOICE_LETTERS, GEOMETRIC, KINDS

# --------------------------------------------------------------------------------------------------------------------
# Choice and yes/no

_L = CHOICE_LETTERS
_CHOICE_EXACT_RE = re.compile(rf"[(\[]?([{_L}{_L.lower()}])[)\]]?[.:]?")
# "answer is B", "answer: (B)", "option B", "choice B", "correct one is B"
_CHOICE_PHRASE_RE = re.compile(
    rf"(?i:answer|option|choice|correct(?: one)?)\s*(?:(?i:is|would be|should be)\s*)?[:=]?\s*[(\[]?([{_L}])(?![\w])"
)
# "B. red cube", "(B) red cube", "B) red", "B: red" at the start
_CHOICE_START_RE = re.compile(rf"(?:\(([{_L}])\)|\[([{_L}])\]|([{_L}])[.):](?!\w))")
# option markers anywhere: "(B)", "B." / "B)" / "B:" followed by a space or the end
_CHOICE_MARKER_RE = re.compile(rf"(?:\(([{_L}])\)|(?<![\w])([{_L}])[.):](?=\s|$))")
_CHOICE_LONE_RE = re.compile(rf"(?<![\w'])([{_L}])(?![\w'])")


def _letters(regex: re.Pattern, text: str) -> set[str]:
    out = set()
    for m in regex.finditer(text):
        out.update(g for g in m.groups() if g)
    return out


def _parse_choice(text: str) -> Parsed:
    s = text.strip().strip("*_`\"'").strip()
    if not s:
        return fail("empty")
    m = _CHOICE_EXACT_RE.fullmatch(s)
    if m:
        return Parsed(m.group(1).upper(), None)
    phrase = _letters(_CHOICE_PHRASE_RE, s)
    start_m = _CHOICE_START_RE.match(s)
    start = {g for g in start_m.groups() if g} if start_m else set()
    if phrase or start:
        letters = phrase | start | _letters(_CHOICE_MARKER_RE, s)
        if len(letters) == 1:
            return Parsed(letters.pop(), None)
        return fail("ambiguous choice: " + ", ".join(sorted(letters)))
    lone = _letters(_CHOICE_LONE_RE, s)
    if len(lone) == 1:
        return Parsed(lone.pop(), None)
    if lone:
        return fail("ambiguous choice: " + ", ".join(sorted(lone)))
    return fail("no option letter found")


_WORD_RE = re.compile(r"[a-z]+")


def _parse_yesno(text: str) -> Parsed:
    words = _WORD_RE.findall(text.lower())
    if not words:
        return fail("no yes/no found")
    if words[0] in ("yes", "no"):
        return Parsed(words[0] == "yes", None)
    found = {w for w in words if w in ("yes", "no")}
    if len(found) == 1:
        return Parsed(found.pop() == "yes", None)
    if found:
        return fail("ambiguous: both yes and no")
    return fail("no yes/no found")


# --------------------------------------------------------------------------------------------------------------------
# Public parser


def _guard(fn: Callable[..., Parsed]) -> Callable[..., Parsed]:
    """Common checks, plus a last-resort guard so that parsing never raises."""

    def wrapper(text: str, kind: str, *args, **kwargs) -> Parsed:
        if kind not in KINDS:
            return fail(f"unknown task kind {kind!r} (expected one of {', '.join(KINDS)})")
        if not isinstance(text, str):
            return fail(f"not a string ({type(text).__name__})")
        try:
            return fn(text.replace("\u2212", "-"), kind, *args, **kwargs)  # U+2212 MINUS SIGN, as some tokenizers emit
        except Exception as e:  # pragma: no cover - a bug; report it as a parse failure rather than crash a run
            return fail(f"internal parser error: {type(e).__name__}: {e}")

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


@_guard
def parse_answer(text: str, kind: str, coords: str = DEFAULT_COORDS, size: tuple[float, float] | None = None) -> Parsed:
    """Parse `text` as an answer of task `kind`; never raises. Empty or whitespace-only text gives error "empty".

    Geometry (box / point / trajectory / pointing): see `geometry.parse_geometry`; `coords` says the units of the
    answer (normalized, thousand, pixels; pixels need `size` = (width, height)) and values come back in [0, 1].
    Choice: "B", "b", "B.", "(B)", "The answer is B", "B. red cube" -> "B"; several candidate letters ("A or B") ->
    failure. Yes/no: a case-insensitive yes/no as the first word, or the only yes/no word.
    """
    if not text.strip():
        return fail("empty")
    if kind in GEOMETRIC:
        return parse_geometry(text, kind, coords, size)
    if kind == "choice":
        return _parse_choice(text)
    if kind == "yesno":
        return _parse_yesno(text)
    return Parsed(text.strip(), None)  # planning
