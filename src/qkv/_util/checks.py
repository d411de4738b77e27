"""Argument checks shared by the modules: each error says what was wrong and what is allowed."""

from __future__ import annotations

import math


def check_int(name: str, value, minimum: int = 1) -> int:
    """`value` as an int >= minimum (bools are refused: True is not a size)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_number(name: str, value, *, lo: float = 0.0, lo_open: bool = False, hi: float | None = None) -> float:
    """`value` as a finite float in [lo, hi) (or (lo, hi) with lo_open)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if value < lo or (lo_open and value == lo) or (hi is not None and value >= hi):
        bound = f"{'>' if lo_open else '>='} {lo}" + (f" and < {hi}" if hi is not None else "")
        raise ValueError(f"{name} must be {bound}, got {value!r}")
    return float(value)
