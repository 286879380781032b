"""EBNF for the decimal integers of a range, written as Python and JSON write them (no leading zeros, no "-0").

    integer_range_ebnf(-5, 120)  ->  an expression that matches "-5" .. "-1", "0" .. "120" and nothing else

The classic construction: split the range by number of digits, then each equal-length range [lo, hi] by its first
digit: ``lo[0]`` followed by [lo[1:], 99..9], the digits strictly between followed by any digits, and ``hi[0]``
followed by [00..0, hi[1:]].
"""
from __future__ import annotations


def integer_range_ebnf(low: int | None, high: int | None) -> str:
    """An EBNF expression for the integers in [low, high]; None leaves that end open. Raises ValueError for an
    empty range."""
    if low is not None and high is not None and low > high:
        raise ValueError(f"empty integer range [{low}, {high}]")
    alternatives = []
    if low is None or low < 0:
        # Negative part: "-" then the magnitudes [max(1, -high), -low].
        top = None if low is None else -low
        bottom = 1 if high is None or high >= 0 else -high
        alternatives += [f'"-" {part}' for part in _non_negative(bottom, top)]
    if high is None or high >= 0:
        alternatives += _non_negative(0 if low is None or low < 0 else low, high)
    return _alternatives(alternatives)


def _non_negative(low: int, high: int | None) -> list[str]:
    """Sequences (EBNF) for [low, high] with 0 <= low; high None: unbounded."""
    parts = []
    low_len = len(str(low))
    high_len = low_len if high is None else len(str(high))
    for length in range(low_len, high_len + 1):
        lo = max(low, 10 ** (length - 1) if length > 1 else 0)
        hi = 10 ** length - 1 if high is None else min(high, 10 ** length - 1)
        if lo <= hi:
            parts += _same_length(str(lo), str(hi))
    if high is None:   # every number with more digits than ``low``
        parts.append(f"[1-9] [0-9]{{{low_len},}}")
    return parts


def _same_length(lo: str, hi: str) -> list[str]:
    """Sequences for the digit strings from ``lo`` to ``hi`` (equal lengths, lo <= hi; inner positions may be 0)."""
    if lo == hi:
        return [f'"{lo}"']
    if len(lo) == 1:
        return [f"[{lo}-{hi}]"]
    rest = len(lo) - 1
    if lo[0] == hi[0]:
        return [f'"{lo[0]}" {_alternatives(_same_length(lo[1:], hi[1:]))}']
    if lo[1:] == "0" * rest and hi[1:] == "9" * rest:
        return [f"[{lo[0]}-{hi[0]}] [0-9]{{{rest}}}"]
    parts = [f'"{lo[0]}" {_alternatives(_same_length(lo[1:], "9" * rest))}']
    if int(hi[0]) - int(lo[0]) > 1:
        parts.append(f"[{int(lo[0]) + 1}-{int(hi[0]) - 1}] [0-9]{{{rest}}}")
    parts.append(f'"{hi[0]}" {_alternatives(_same_length("0" * rest, hi[1:]))}')
    return parts


def _alternatives(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else "(" + " | ".join(f"({p})" for p in parts) + ")"
