"""The toolkit's one table formatter and the number formats of its tables."""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def format_table(header: Sequence[str], rows: Sequence[Sequence[object]], markdown: bool = False,
                 numeric_right: bool = True) -> str:
    """The toolkit's one table formatter: ``rows`` under ``header``, as aligned plain text (columns
    two spaces apart; with ``numeric_right``, every column but the first right-aligned) or as a
    GitHub Markdown table (``markdown``, through ``tabulate``).

    Args:
        header: column titles.
        rows: one sequence of cells per row (converted with ``str``).
    """
    cells = [[str(c) for c in row] for row in rows]
    if markdown:
        from tabulate import tabulate

        return tabulate(cells, headers=list(header), tablefmt="pipe", disable_numparse=True)
    widths = [max(len(str(c)) for c in column) for column in zip(header, *cells)]

    def line(row):
        return "  ".join(c.rjust(w) if numeric_right and i > 0 else c.ljust(w)
                         for i, (c, w) in enumerate(zip(row, widths))).rstrip()
    return "\n".join(line(row) for row in [[str(h) for h in header], *cells])


def round_significant(value: float, digits: int = 6) -> float:
    """``value`` rounded to ``digits`` significant digits, so that a CSV shows ``0.3`` rather
    than ``0.30000000000000004`` and a loss of ``1234.5678`` as ``1234.57`` (``digits = 6``).
    NaN, infinities and 0 come back unchanged; ``None`` stays ``None``.

    Args:
        value: any real number (converted with ``float``), or ``None``.
        digits: significant digits kept, at least 1.
    """
    if value is None:
        return None
    value = float(value)
    if not math.isfinite(value) or value == 0:
        return value
    return float(f"{value:.{digits}g}")


def format_acc(accs: Sequence[float]) -> str:
    """``'mean ± std'`` in percent for accuracies in [0, 1]."""
    if len(accs) == 0:
        return "n/a"
    return f"{100 * np.mean(accs):.2f} ± {100 * np.std(accs):.2f}"
