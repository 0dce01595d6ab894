"""Markdown building blocks shared by the run report, the run comparison and the results writer: table cells and
GitHub-markdown tables (also readable as plain text)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


def fmt_cell(value: Any, digits: int = 3, missing: str = "n/a") -> str:
    """A table cell: floats with `digits` decimals, None as `missing`."""
    if value is None:
        return missing
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def fmt_points(value: float | None, signed: bool = False) -> str:
    """An accuracy (fraction) as percentage points with one decimal ("n/a" for None): 0.412 -> "41.2"."""
    if value is None:
        return "n/a"
    return f"{100 * value:+.1f}" if signed else f"{100 * value:.1f}"


def fmt_number(value: float | None, digits: int = 1) -> str:
    """A number with `digits` decimals ("n/a" for None, "inf" / "-inf" for infinity)."""
    if value is None:
        return "n/a"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.{digits}f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub-markdown table (also readable as plain text), columns padded to equal width."""
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])
