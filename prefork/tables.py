"""Plain-text tables, for `prefork status` and `prefork probe`."""

from __future__ import annotations

from collections.abc import Container, Sequence


def align(rows: Sequence[Sequence[str]], right: Container[int]) -> list[str]:
    """One line per row, columns two spaces apart and as wide as their widest cell; the
    columns in ``right`` (numbers) line up on the right, the others on the left."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.rjust(width) if i in right else cell.ljust(width)
                      for i, (cell, width) in enumerate(zip(row, widths, strict=True))).rstrip()
            for row in rows]
