"""The report as a small document model, rendered to GitHub Markdown and to one HTML page.

Sections hold blocks (paragraphs, tables, images, preformatted text); both renderers walk the same
blocks, so the two pages always say the same thing. Every piece of text is escaped by the
renderer: user text (experiment descriptions, generated samples) can never inject markup.
"""

from __future__ import annotations

import base64
import html
import mimetypes
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

_MD_SPECIAL = re.compile(r"([\\`*_\[\]<>|~&#!])")
_TABLE_CELL_SPECIAL = re.compile(r"([\\`*_\[\]~#!])")


@dataclass(frozen=True)
class Paragraph:
    """Plain text; `warning` renders it prominently."""

    text: str
    warning: bool = False


@dataclass(frozen=True)
class Table:
    """A table of already formatted cells; `row_classes` (HTML only) mark rows, e.g. "win"."""

    headers: list[str]
    rows: list[list[str]]
    id: str = ""
    row_classes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Image:
    """A figure file, its path relative to the page, its title and caption."""

    path: str
    title: str
    caption: str


@dataclass(frozen=True)
class Preformatted:
    """Verbatim text (a generated sample) under a short label."""

    label: str
    text: str


Block = Paragraph | Table | Image | Preformatted


@dataclass(frozen=True)
class Section:
    """A heading (level 2 or 3) and its blocks."""

    title: str
    blocks: list[Block]
    level: int = 2
    warning: bool = False


def visible(text: str) -> str:
    """Replace control and format characters (except newline and tab) by "⟨U+XXXX⟩".

    Generated text may contain any byte (NUL, escape sequences, bidirectional overrides); shown
    raw they would corrupt or disguise the page.
    """
    return "".join(
        ch
        if ch in "\n\t" or unicodedata.category(ch) not in ("Cc", "Cf", "Cs", "Co")
        else f"⟨U+{ord(ch):04X}⟩"
        for ch in text
    )


def escape_markdown_text(text: str) -> str:
    """Escape text for a Markdown paragraph: markup characters get a backslash, lines join."""
    text = visible(text).replace("\r", " ").replace("\n", " ")
    return _MD_SPECIAL.sub(r"\\\1", text)


def escape_markdown(text: str) -> str:
    """Escape text for a GitHub Markdown table cell.

    `&`, `<` and `>` become entities (so no raw HTML gets through), `|` and other markup
    characters are backslash-escaped, and line breaks become spaces.
    """
    text = visible(text).replace("\r", " ").replace("\n", " ")
    text = _TABLE_CELL_SPECIAL.sub(r"\\\1", text)
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return text.replace("|", "\\|")


def markdown_fence(text: str) -> str:
    """`text` verbatim in a fenced code block whose fence is longer than any backtick run in it
    (so nothing inside can close it or be read as Markdown or HTML)."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}text\n{visible(text)}\n{fence}"


def markdown_table(table: Table) -> str:
    """Render `table` as a GitHub pipe table."""

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(escape_markdown(cell) for cell in cells) + " |"

    rule = "|" + "|".join("---" for _ in table.headers) + "|"
    return "\n".join([line(table.headers), rule, *(line(row) for row in table.rows)])


def html_table(table: Table) -> str:
    """Render `table` as an HTML table; every cell is HTML-escaped."""
    head = "".join(f"<th>{html.escape(visible(cell))}</th>" for cell in table.headers)
    classes = table.row_classes or [""] * len(table.rows)
    body = "\n".join(
        (f'<tr class="{html.escape(cls)}">' if cls else "<tr>")
        + "".join(f"<td>{html.escape(visible(cell))}</td>" for cell in row)
        + "</tr>"
        for row, cls in zip(table.rows, classes, strict=True)
    )
    ident = f' id="{html.escape(table.id)}"' if table.id else ""
    return f"<table{ident}>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody>\n</table>"


def _markdown_block(block: Block) -> str:
    """One block as Markdown."""
    if isinstance(block, Paragraph):
        text = escape_markdown_text(block.text)
        return f"**⚠ {text}**" if block.warning else text
    if isinstance(block, Table):
        return markdown_table(block)
    if isinstance(block, Image):
        image = f"![{escape_markdown_text(block.title)}]({block.path})"
        return f"{image}\n\n*{escape_markdown_text(block.caption)}*"
    return f"{escape_markdown_text(block.label)}\n\n{markdown_fence(block.text)}"


def markdown_page(title: str, sections: list[Section]) -> str:
    """The whole report as GitHub Markdown (figures by relative path)."""
    parts = [f"# {escape_markdown_text(title)}"]
    for section in sections:
        mark = "⚠ " if section.warning else ""
        parts.append(f"{'#' * section.level} {mark}{escape_markdown_text(section.title)}")
        parts.extend(_markdown_block(block) for block in section.blocks)
    return "\n\n".join(parts) + "\n"


def embedded_image(path: Path) -> str:
    """A `data:` URI holding the image file at `path` (an <img> src that needs no other file)."""
    mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


def _html_block(block: Block, figure_root: Path) -> str:
    """One block as HTML; an image is embedded from `figure_root / block.path`."""
    if isinstance(block, Paragraph):
        text = html.escape(visible(block.text))
        return (
            f'<p class="warning"><strong>⚠ {text}</strong></p>'
            if block.warning
            else f"<p>{text}</p>"
        )
    if isinstance(block, Table):
        return html_table(block)
    if isinstance(block, Image):
        return (
            f'<figure><img src="{embedded_image(figure_root / block.path)}" '
            f'alt="{html.escape(block.title)}">'
            f"<figcaption>{html.escape(visible(block.caption))}</figcaption></figure>"
        )
    return (
        f'<p class="label">{html.escape(visible(block.label))}</p>\n'
        f'<pre class="sample">{html.escape(visible(block.text))}</pre>'
    )


_CSS = """
body { font-family: system-ui, sans-serif; max-width: 90rem; margin: 2rem auto;
       padding: 0 1rem; color: #222; line-height: 1.45; }
table { border-collapse: collapse; font-size: 0.85rem; margin: 1rem 0; display: block;
        overflow-x: auto; }
th, td { border: 1px solid #ccc; padding: 0.25rem 0.6rem; }
th { background: #f2f2f2; }
td { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td:first-child, #experiments td { text-align: left; }
#experiments td:last-child { white-space: normal; }
tr.win td { background: #e3f0fb; }
tr.loss td { background: #fbe9dc; }
tr.excluded td { background: #eee; color: #a50000; }
img { max-width: 100%; height: auto; }
figure { margin: 1rem 0; }
figcaption { font-size: 0.85rem; color: #555; }
pre.sample { background: #f7f7f7; border: 1px solid #ddd; padding: 0.5rem; white-space: pre-wrap; }
p.label { margin-bottom: 0.2rem; font-size: 0.9rem; }
.warning { color: #a50000; }
"""


def html_page(title: str, sections: list[Section], figure_root: Path) -> str:
    """The whole report as one self-contained HTML page: inline CSS, the figures (their paths
    relative to `figure_root`) embedded as data URIs, no scripts; it can be mailed or opened
    inside Snakemake's report on its own."""
    body = []
    for section in sections:
        level = section.level
        cls = ' class="warning"' if section.warning else ""
        mark = "⚠ " if section.warning else ""
        body.append(f"<h{level}{cls}>{mark}{html.escape(visible(section.title))}</h{level}>")
        body.extend(_html_block(block, figure_root) for block in section.blocks)
    heading = html.escape(visible(title))
    content = "\n".join(body)
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{heading}</title>
<style>{_CSS}</style>
</head>
<body>
<h1>{heading}</h1>
{content}
</body>
</html>
"""
