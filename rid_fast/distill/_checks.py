"""Argument checks shared by the distillation modules: each error names the argument."""

from __future__ import annotations

import math
import numbers

__all__ = ["check_int", "check_number"]


def check_int(name: str, value, minimum: int, *, optional: bool = False) -> None:
    """``value`` is an int ≥ ``minimum`` (or None when ``optional``); TypeError / ValueError otherwise."""
    if optional and value is None:
        return
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        kind = "an int or None" if optional else "an int"
        raise TypeError(f"{name} must be {kind}; got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be ≥ {minimum}; got {value}")


def check_number(name: str, value, *, minimum: float, inclusive: bool = True) -> None:
    """``value`` is a finite real number ≥ ``minimum`` (> when not ``inclusive``)."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"{name} must be a number; got {type(value).__name__} {value!r}")
    if not math.isfinite(value) or value < minimum or (value == minimum and not inclusive):
        bound = f"≥ {minimum:g}" if inclusive else f"> {minimum:g}"
        raise ValueError(f"{name} must be a finite number {bound}; got {value}")
