"""The one report type: what a command or benchmark found, as text blocks and tables, with one Markdown writer.

The library returns a ``Report``; the CLI prints ``report.to_markdown()`` (or the JSON it was made from) and
writes it beside the JSON in a bundle's ``reports/``. Blocks are separated by a blank line::

    ## title

    a paragraph

    | column | column |
    | --- | ---: |
    | cell | cell |
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]] = field(default_factory=list)
    align: list[str] | None = None  # per column: "---" (left, the default) or "---:" (right)

    def lines(self) -> list[str]:
        align = self.align or ["---"] * len(self.header)
        return [_row(self.header), _row(align), *(_row(r) for r in self.rows)]


def _row(cells: list[str]) -> str:
    return "|" + "".join(f" {c} |" if c else " |" for c in cells)


@dataclass
class Report:
    """A title (None: none), then paragraphs (a string: its lines as they are) and tables, in order."""

    title: str | None = None
    blocks: list[str | Table] = field(default_factory=list)

    def add(self, block: str | Table) -> "Report":
        self.blocks.append(block)
        return self

    def to_markdown(self) -> str:
        parts = ([f"## {self.title}"] if self.title else []) + [
            "\n".join(b.lines()) if isinstance(b, Table) else b for b in self.blocks]
        return "\n\n".join(parts) + "\n"
