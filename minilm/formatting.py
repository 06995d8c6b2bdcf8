"""Tables and durations as people read them: the one renderer every report in minilm uses."""

from __future__ import annotations

from collections.abc import Sequence


def render_table(
    head: Sequence[str], rows: Sequence[Sequence[str]], fmt: str = "text", align: str | None = None, note: str = ""
) -> str:
    """A table as aligned text (``fmt='text'``) or GitHub markdown (``fmt='markdown'``).

    ``align`` has one letter per column, 'l' or 'r'; by default the first column is a label
    (left) and the rest are numbers (right). ``note`` follows the table: on the next line in
    text, after a blank line in markdown.
    """
    align = align or "l" + "r" * (len(head) - 1)
    if len(align) != len(head):
        raise ValueError(f"align has {len(align)} letters for {len(head)} columns")
    if fmt == "markdown":
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines) + (f"\n\n{note}" if note else "")
    if fmt != "text":
        raise ValueError(f"fmt must be 'text' or 'markdown', got {fmt!r}")
    table = [list(map(str, r)) for r in [head, *rows]]
    widths = [max(len(r[i]) for r in table) for i in range(len(head))]
    lines = [
        "  ".join(c.rjust(w) if a == "r" else c.ljust(w) for c, w, a in zip(r, widths, align, strict=True))
        for r in table
    ]
    return "\n".join(lines) + (f"\n{note}" if note else "")


def format_hours(hours: float) -> str:
    """A duration given in hours, in the unit that reads best: '40 s', '12 min', '3.5 h', '9.2 days'."""
    if hours * 60 < 1:
        return f"{hours * 3600:.0f} s"
    if hours < 1:
        return f"{hours * 60:.0f} min"
    return f"{hours:.1f} h" if hours < 48 else f"{hours / 24:.1f} days"
