"""A small document model rendered to Markdown and to HTML alike: the generated docs and the training report.

Inline marks: ```code```, ``**bold**`` and links ``[text](target)``. A target starting with ``@`` names another
page of the docs (``@design``, ``@model-card-v3``, ``@report-v3``, ``@monitor``); each renderer maps it to the
right relative file (``design.md`` beside the Markdown, ``design.html`` inside the site), so links resolve in
both without a server. Figures are PNGs: the Markdown links the file (written beside it by the caller), the HTML
embeds them, so a page opens offline.
"""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

Resolver = Callable[[str], str]

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:980px;margin:2rem auto;padding:0 1rem;
line-height:1.5;color:#1d2330}
nav{font-size:.9rem;border-bottom:1px solid #d7dbe3;padding-bottom:.5rem;margin-bottom:1.5rem}
nav a{margin-right:1rem}
h1{font-size:1.7rem}h2{font-size:1.3rem;margin-top:2rem;border-bottom:1px solid #eef0f4}h3{font-size:1.1rem}
table{border-collapse:collapse;margin:1rem 0;font-size:.9rem}
th,td{border:1px solid #d7dbe3;padding:.25rem .5rem;text-align:left;vertical-align:top}
th{background:#f4f6fa}
code,pre{background:#f4f6fa;border-radius:3px;font-size:.88em}
code{padding:0 .2em}pre{padding:.6rem;overflow-x:auto}
.human{border-left:4px solid #4a7bd0;padding:.2rem 1rem;background:#f7f9fe}
.missing{border-left:4px solid #c0392b;padding:.2rem 1rem;background:#fdf3f2}
.note{color:#5a6272;font-size:.9rem}
figure{margin:1em 0}figure img{max-width:100%;border:1px solid #eee}figcaption{font-size:.85em;color:#555}
"""


@dataclass
class Block:
    kind: str  # heading | text | bullets | table | code | human | missing | warning | note | figure
    text: str = ""
    level: int = 2
    items: list[str] = field(default_factory=list)
    columns: list[str] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)
    path: str = ""  # a figure's PNG, relative to the Markdown file


@dataclass
class Document:
    """An ordered list of blocks; the builders append, the renderers read.

    ``figures`` holds each figure's PNG and caption by its relative path; ``draw = False`` skips figures (the text
    and tables are the same), for a quick text-only document.
    """

    title: str
    blocks: list[Block] = field(default_factory=list)
    figures: dict[str, tuple[bytes, str]] = field(default_factory=dict)
    draw: bool = True

    def heading(self, text: str, level: int = 2) -> None:
        self.blocks.append(Block("heading", text=text, level=level))

    def text(self, text: str) -> None:
        self.blocks.append(Block("text", text=text))

    def note(self, text: str) -> None:
        self.blocks.append(Block("note", text=text))

    def bullets(self, items: list[str]) -> None:
        self.blocks.append(Block("bullets", items=list(items)))

    def table(self, columns: list[str], rows: list[list[str]]) -> None:
        self.blocks.append(Block("table", columns=list(columns), rows=[[str(c) for c in r] for r in rows]))

    def code(self, text: str) -> None:
        self.blocks.append(Block("code", text=text))

    def human(self, text: str) -> None:
        """Text a person wrote (docs/human/*.md), merged as it is: paragraphs and ``-`` bullets."""
        self.blocks.append(Block("human", text=text))

    def warning(self, text: str) -> None:
        self.blocks.append(Block("warning", text=text))

    def missing(self, text: str) -> None:
        """A visible hole: what a person still has to write, and where."""
        self.blocks.append(Block("missing", text=text))

    def figure(self, path: str, draw: Callable[[], bytes], caption: str) -> None:
        """A PNG drawn now (``draw()``) unless the document skips figures; ``path`` is where the caller writes it."""
        if not self.draw:
            return
        self.figures[path] = (draw(), caption)
        self.blocks.append(Block("figure", text=caption, path=path))


def _same(target: str) -> str:
    return target


_LINK = re.compile(r"\[([^\]]+)\]\(([^)\s]+)\)")
_BOLD = re.compile(r"\*\*(.+?)\*\*")


def _md_resolve(target: str, resolver: Resolver) -> str:
    return resolver(target[1:]) if target.startswith("@") else target


def _inline_md(text: str, resolver: Resolver) -> str:
    # Code spans stay literal, links elsewhere get their @targets resolved.
    parts = text.split("`")
    return "`".join(
        part if i % 2 else _LINK.sub(lambda m: f"[{m.group(1)}]({_md_resolve(m.group(2), resolver)})", part)
        for i, part in enumerate(parts)
    )


def _bold(text: str) -> str:
    return _BOLD.sub(r"<strong>\1</strong>", html.escape(text))


def _inline_html(text: str, resolver: Resolver) -> str:
    parts = text.split("`")
    out = []
    for i, part in enumerate(parts):
        if i % 2:
            out.append(f"<code>{html.escape(part)}</code>")
            continue
        pieces = []
        last = 0
        for m in _LINK.finditer(part):
            pieces.append(_bold(part[last:m.start()]))
            href = _md_resolve(m.group(2), resolver)
            pieces.append(f'<a href="{html.escape(href)}">{_bold(m.group(1))}</a>')
            last = m.end()
        pieces.append(_bold(part[last:]))
        out.append("".join(pieces))
    return "".join(out)


def _cell_md(text: str, resolver: Resolver) -> str:
    return _inline_md(text, resolver).replace("|", "\\|").replace("\n", " ")


def render_markdown(doc: Document, resolver: Resolver = _same) -> str:
    out: list[str] = [f"# {doc.title}"]
    for b in doc.blocks:
        if b.kind == "heading":
            out.append("#" * b.level + " " + _inline_md(b.text, resolver))
        elif b.kind == "text":
            out.append(_inline_md(b.text, resolver))
        elif b.kind == "note":
            out.append("_" + _inline_md(b.text, resolver) + "_")
        elif b.kind == "bullets":
            out.append("\n".join(f"- {_inline_md(i, resolver)}" for i in b.items) if b.items else "- (none)")
        elif b.kind == "table":
            lines = ["| " + " | ".join(_cell_md(c, resolver) for c in b.columns) + " |",
                     "|" + "|".join("---" for _ in b.columns) + "|"]
            lines += ["| " + " | ".join(_cell_md(c, resolver) for c in row) + " |" for row in b.rows]
            out.append("\n".join(lines))
        elif b.kind == "code":
            out.append("```\n" + b.text.rstrip("\n") + "\n```")
        elif b.kind == "human":
            out.append(b.text.strip())
        elif b.kind == "missing":
            out.append("> **TO WRITE:** " + _inline_md(b.text, resolver))
        elif b.kind == "warning":
            out.append("> **WARNING:** " + _inline_md(b.text, resolver))
        elif b.kind == "figure":
            out.append(f"![{b.text}]({b.path})")
    return "\n\n".join(out) + "\n"


def _paragraphs(text: str) -> list[tuple[str, list[str]]]:
    """Split human Markdown into ('p', [text]) and ('ul', [items]) groups on blank lines and '- ' items."""
    groups: list[tuple[str, list[str]]] = []
    for chunk in re.split(r"\n\s*\n", text.strip()):
        lines = [line.rstrip() for line in chunk.splitlines() if line.strip()]
        if not lines:
            continue
        if all(re.match(r"\s*[-*] ", line) or line.startswith("  ") for line in lines):
            items: list[str] = []
            for line in lines:
                if re.match(r"\s*[-*] ", line):
                    items.append(re.sub(r"^\s*[-*] ", "", line))
                elif items:
                    items[-1] += " " + line.strip()
            groups.append(("ul", items))
        elif lines[0].startswith("#"):
            groups.append(("h", [lines[0].lstrip("#").strip()]))
            if lines[1:]:
                groups.append(("p", [" ".join(line.strip() for line in lines[1:])]))
        else:
            groups.append(("p", [" ".join(line.strip() for line in lines)]))
    return groups


def render_html(doc: Document, resolver: Resolver = _same, nav: Mapping[str, str] | None = None, *,
                css: str = "") -> str:
    """A standalone page: inline CSS (``css`` added to the house style), no scripts, no external resources
    (figures embedded); ``nav`` maps link text to @targets."""
    body: list[str] = []
    if nav:
        links = "".join(f'<a href="{html.escape(resolver(t[1:]) if t.startswith("@") else t)}">{html.escape(n)}</a>'
                        for n, t in nav.items())
        body.append(f"<nav>{links}</nav>")
    body.append(f"<h1>{_inline_html(doc.title, resolver)}</h1>")
    for b in doc.blocks:
        if b.kind == "heading":
            slug = re.sub(r"[^a-z0-9]+", "-", b.text.lower()).strip("-")
            body.append(f'<h{b.level} id="{slug}">{_inline_html(b.text, resolver)}</h{b.level}>')
        elif b.kind == "text":
            body.append(f"<p>{_inline_html(b.text, resolver)}</p>")
        elif b.kind == "note":
            body.append(f'<p class="note">{_inline_html(b.text, resolver)}</p>')
        elif b.kind == "bullets":
            items = b.items or ["(none)"]
            body.append("<ul>" + "".join(f"<li>{_inline_html(i, resolver)}</li>" for i in items) + "</ul>")
        elif b.kind == "table":
            head = "".join(f"<th>{_inline_html(c, resolver)}</th>" for c in b.columns)
            rows = "".join("<tr>" + "".join(f"<td>{_inline_html(c, resolver)}</td>" for c in row) + "</tr>"
                           for row in b.rows)
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif b.kind == "code":
            body.append(f"<pre><code>{html.escape(b.text.rstrip())}</code></pre>")
        elif b.kind == "human":
            inner = []
            for kind, parts in _paragraphs(b.text):
                if kind == "ul":
                    inner.append("<ul>" + "".join(f"<li>{_inline_html(i, resolver)}</li>" for i in parts) + "</ul>")
                elif kind == "h":
                    inner.append(f"<h4>{_inline_html(parts[0], resolver)}</h4>")
                else:
                    inner.append(f"<p>{_inline_html(parts[0], resolver)}</p>")
            body.append('<div class="human">' + "".join(inner) + "</div>")
        elif b.kind == "missing":
            body.append(f'<p class="missing"><strong>TO WRITE:</strong> {_inline_html(b.text, resolver)}</p>')
        elif b.kind == "warning":
            body.append(f'<p class="missing"><strong>WARNING:</strong> {_inline_html(b.text, resolver)}</p>')
        elif b.kind == "figure":
            data = base64.b64encode(doc.figures[b.path][0]).decode("ascii")
            body.append(f'<figure><img alt="{html.escape(b.text)}" src="data:image/png;base64,{data}">'
                        f"<figcaption>{_inline_html(b.text, resolver)}</figcaption></figure>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{html.escape(doc.title)}</title><style>{_CSS}{css}</style></head><body>\n"
            + "\n".join(body) + "\n</body></html>\n")


__all__ = ["Block", "Document", "render_html", "render_markdown"]
