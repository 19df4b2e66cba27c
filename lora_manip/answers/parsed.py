"""The result type every answer parser returns (its own module so parse.py and geometry.py can share it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Parsed:
    """A parsed answer: exactly one of `value` (the answer) and `error` (why parsing failed) is set."""

    value: Any = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def fail(error: str) -> Parsed:
    return Parsed(None, error)
