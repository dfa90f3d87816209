"""A report as a list of blocks, rendered to self-contained HTML or to Markdown with image files beside it.

Every block carries its meaning in text; a ``flag`` ("bad" or "good") only adds colour in HTML.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field


@dataclass
class Cell:
    text: str
    flag: str = ""  # "bad" | "good" | ""


@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Para:
    text: str
    flag: str = ""


@dataclass
class Bullets:
    items: list[Cell]


@dataclass
class Table:
    header: list[str]
    rows: list[list[Cell]]
    long_text: bool = False  # cells hold generations: keep their line breaks, top-align


@dataclass
class Figure:
    name: str  # file name of the PNG beside report.md
    png: bytes
    alt: str


@dataclass
class Document:
    title: str
    blocks: list = field(default_factory=list)

    def add(self, *blocks) -> None:
        self.blocks.extend(blocks)


CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 2rem auto; max-width: 1200px;
       padding: 0 1rem; color: #1f2328; line-height: 1.45; }
h1 { border-bottom: 2px solid #d0d7de; padding-bottom: .3rem; }
h2 { margin-top: 2.2rem; border-bottom: 1px solid #d0d7de; padding-bottom: .2rem; }
h3 { margin-top: 1.4rem; }
table { border-collapse: collapse; margin: .6rem 0 1rem; font-size: .92rem; }
th, td { border: 1px solid #d0d7de; padding: .35rem .6rem; text-align: left; vertical-align: top; }
th { background: #f6f8fa; }
table.samples { width: 100%; table-layout: fixed; }
td.long { white-space: pre-wrap; font-family: ui-monospace, SFMono-Regular, Menlo, monospace; font-size: .82rem;
          overflow-wrap: anywhere; }
.bad { color: #b42318; font-weight: 600; background: #fef3f2; }
.good { color: #067647; }
img { max-width: 100%; height: auto; display: inline-block; vertical-align: top; margin: .5rem .8rem 1rem 0;
      border: 1px solid #eaeef2; }
"""


def render_html(doc: Document) -> str:
    body = "\n".join(_html_block(b) for b in doc.blocks)
    title = html.escape(doc.title)
    return (
        f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">\n<title>{title}</title>\n'
        f"<style>{CSS}</style>\n</head>\n<body>\n<h1>{title}</h1>\n{body}\n</body>\n</html>\n"
    )


def _cls(flag: str, *extra: str) -> str:
    names = " ".join(n for n in (flag, *extra) if n)
    return f' class="{names}"' if names else ""


def _html_block(block) -> str:
    if isinstance(block, Heading):
        return f"<h{block.level}>{html.escape(block.text)}</h{block.level}>"
    if isinstance(block, Para):
        return f"<p{_cls(block.flag)}>{html.escape(block.text)}</p>"
    if isinstance(block, Bullets):
        items = "".join(f"<li{_cls(c.flag)}>{html.escape(c.text)}</li>" for c in block.items)
        return f"<ul>{items}</ul>"
    if isinstance(block, Table):
        head = "".join(f"<th>{html.escape(h)}</th>" for h in block.header)
        long = "long" if block.long_text else ""
        rows = "".join(
            "<tr>" + "".join(f"<td{_cls(c.flag, long)}>{html.escape(c.text)}</td>" for c in row) + "</tr>"
            for row in block.rows
        )
        table = '<table class="samples">' if block.long_text else "<table>"
        return f"{table}<thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"
    if isinstance(block, Figure):
        data = base64.b64encode(block.png).decode("ascii")
        return f'<img src="data:image/png;base64,{data}" alt="{html.escape(block.alt)}">'
    raise TypeError(f"unknown report block {type(block).__name__}")


def render_markdown(doc: Document, files_dir: str) -> tuple[str, dict[str, bytes]]:
    """The Markdown text and the images it links, by file name, to be written under ``files_dir``."""
    files = {b.name: b.png for b in doc.blocks if isinstance(b, Figure)}
    parts = [f"# {_md_inline(doc.title)}"] + [_md_block(b, files_dir) for b in doc.blocks]
    return "\n\n".join(parts) + "\n", files


def _md_inline(text: str) -> str:
    """Escaped so that generated text cannot inject HTML or break a table row."""
    return html.escape(text, quote=False).replace("|", "\\|").replace("\r\n", "\n").replace("\n", "<br>")


def _md_cell(cell: Cell) -> str:
    text = _md_inline(cell.text)
    return f"**{text}**" if cell.flag == "bad" and text.strip() else text


def _md_block(block, files_dir: str) -> str:
    if isinstance(block, Heading):
        return "#" * block.level + " " + _md_inline(block.text)
    if isinstance(block, Para):
        return _md_cell(Cell(block.text, block.flag))
    if isinstance(block, Bullets):
        return "\n".join(f"- {_md_cell(c)}" for c in block.items)
    if isinstance(block, Table):
        lines = ["| " + " | ".join(_md_inline(h) for h in block.header) + " |"]
        lines.append("|" + "---|" * len(block.header))
        lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in block.rows]
        return "\n".join(lines)
    if isinstance(block, Figure):
        return f"![{_md_inline(block.alt)}]({files_dir}/{block.name})"
    raise TypeError(f"unknown report block {type(block).__name__}")
