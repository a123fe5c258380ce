"""A plain-text table renderer for the command line (no dependency, monospace output)."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["format_bytes", "render_table"]


def render_table(headers: Sequence[str], rows: Sequence[Sequence[object]], align: str | None = None) -> str:
    """Render ``rows`` under ``headers`` as aligned columns separated by two spaces.

    ``align`` holds one character per column: ``"<"`` (left) or ``">"`` (right); by default the first column is
    left-aligned and the others right-aligned. Cells are converted with ``str``. A dashed rule separates the
    header from the body. Returns the table without a trailing newline.
    """
    ncols = len(headers)
    if align is None:
        align = "<" + ">" * (ncols - 1)
    if len(align) != ncols or set(align) - {"<", ">"}:
        raise ValueError(f"align must hold one of '<' or '>' per column ({ncols}), got {align!r}")
    cells = [[str(cell) for cell in row] for row in rows]
    for i, row in enumerate(cells):
        if len(row) != ncols:
            raise ValueError(f"row {i} has {len(row)} cells, expected {ncols}")
    widths = [max([len(h), *(len(row[c]) for row in cells)]) for c, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        return "  ".join(f"{v:{a}{w}}" for v, a, w in zip(values, align, widths, strict=True)).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(row) for row in cells)])


def format_bytes(n: int) -> str:
    """``n`` bytes in a short human form: ``"512 B"``, ``"1.5 KiB"``, ``"86.2 MiB"``, ``"3.10 GiB"``."""
    if n < 1024:
        return f"{n} B"
    for unit, scale in (("KiB", 1 << 10), ("MiB", 1 << 20)):
        if n < 1024 * scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n / (1 << 30):.2f} GiB"
