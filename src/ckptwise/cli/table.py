"""Tables that read well on an 80-column terminal and whole when piped.

On a terminal, rich draws the table to the terminal's width and wraps the columns that may
wrap at spaces. Piped (or redirected), every value is printed whole in aligned plain rows:
nothing is cut, so ``grep`` and ``less`` see what ``--json`` would say.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

__all__ = ["Column", "print_table"]


@dataclass(frozen=True)
class Column:
    """A column: its header, whether it holds numbers (right-aligned), and whether its
    values may wrap at spaces on a terminal."""

    header: str
    numeric: bool = False
    wrap: bool = False


def print_table(title: str, columns: Sequence[Column], rows: Sequence[Sequence[str]]) -> None:
    """Print ``rows`` under ``title``: drawn on a terminal, plain when piped."""
    # rich draws only on a terminal; imported here, `--help` and piped output never load it
    from rich import box
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False)
    if not console.is_terminal:
        _print_plain(title, columns, rows)
        return
    table = Table(
        title=title,
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        collapse_padding=True,
        title_justify="left",
    )
    for i, column in enumerate(columns):
        cells = [row[i] for row in rows]
        # a wrapping column never narrower than its longest word: words are not cut
        words = [len(w) for cell in cells for w in cell.split()] or [0]
        table.add_column(
            column.header,
            justify="right" if column.numeric else "left",
            no_wrap=not column.wrap,
            overflow="fold",
            min_width=max(words) if column.wrap else None,
        )
    for row in rows:
        table.add_row(*row)
    if _narrowest(console, table, columns, rows) > console.width:
        # narrower than its words: plain rows the terminal wraps, rather than cut values
        _print_plain(title, columns, rows)
        return
    console.print(table)


def _print_plain(title: str, columns: Sequence[Column], rows: Sequence[Sequence[str]]) -> None:
    click.echo(title)
    lines = [[c.header for c in columns], *([*row] for row in rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(columns))]
    for line in lines:
        cells = [
            cell.rjust(width) if column.numeric else cell.ljust(width)
            for cell, width, column in zip(line, widths, columns, strict=True)
        ]
        click.echo("  ".join(cells).rstrip())


def _narrowest(
    console: Console, table: Table, columns: Sequence[Column], rows: Sequence[Sequence[str]]
) -> int:
    """The width ``table`` needs with its wrapping columns as narrow as their longest word
    (rich would cut the other columns to fit a narrower terminal)."""
    from rich.measure import Measurement

    natural = Measurement.get(console, console.options.update_width(10**6), table).maximum
    saved = 0
    for i, column in enumerate(columns):
        if column.wrap:
            texts = [column.header, *(row[i] for row in rows)]
            saved += max(map(len, texts)) - max(len(w) for t in texts for w in t.split() or [""])
    return natural - saved
