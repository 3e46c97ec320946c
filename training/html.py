"""HN comment HTML to the plain text the model reads and writes.

HN stores a comment as a small HTML subset: ``<p>`` starts a paragraph (never closed), ``<i>`` italics,
``<a href="FULL" rel="nofollow">TRUNCATED...</a>`` for every link, ``<pre><code>`` for code typed indented by two
or more spaces, entities for ``' / < > & "`` (``&#x27;``, ``&#x2F;``, ``&gt;``...). Outside code, raw newlines are
plain whitespace, as a browser shows them.

The plain text mirrors what a person types into HN's comment box: paragraphs separated by a blank line, ``*x*``
for italics, the full link target, code lines indented by (at least) two spaces, ``>`` quotes left as they are.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser

_SPACES = re.compile(r"\s+")
CODE_INDENT = 2


def html_to_text(html: str | None) -> str:
    if not html:
        return ""
    parser = _HNParser()
    parser.feed(html)
    parser.close()
    return parser.text()


class _HNParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.blocks: list[str] = []
        self.inline: list[str] = []  # the paragraph being read
        self.code: list[str] | None = None  # inside <pre>: raw text
        self.link: tuple[str, list[str]] | None = None  # inside <a>: (href, anchor text)

    # -- events --

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if self.code is not None:
            return  # HN escapes markup inside code; any tag here is noise
        if tag == "p":
            self._end_paragraph()
        elif tag == "br":
            self._write("\n")
        elif tag in ("i", "em"):
            self._write("*")
        elif tag == "pre":
            self._end_paragraph()
            self.code = []
        elif tag == "a":
            self.link = (dict(attrs).get("href") or "", [])

    def handle_endtag(self, tag: str) -> None:
        if tag == "pre" and self.code is not None:
            self._end_code()
        elif self.code is not None:
            return
        elif tag == "p":
            self._end_paragraph()
        elif tag in ("i", "em"):
            self._write("*")
        elif tag == "a" and self.link is not None:
            href, anchor = self.link
            self.link = None
            self._write(_link_text(href, "".join(anchor)))

    def handle_data(self, data: str) -> None:
        if self.code is not None:
            self.code.append(data)
        elif self.link is not None:
            self.link[1].append(data)
        else:
            self._write(_SPACES.sub(" ", data))

    def close(self) -> None:
        super().close()
        if self.link is not None:  # an unclosed <a>: keep what it held
            self.handle_endtag("a")
        if self.code is not None:
            self._end_code()
        self._end_paragraph()

    # -- output --

    def _write(self, text: str) -> None:
        self.inline.append(text)

    def _end_paragraph(self) -> None:
        lines = [_SPACES.sub(" ", line).strip() for line in "".join(self.inline).split("\n")]
        paragraph = "\n".join(lines).strip()
        if paragraph:
            self.blocks.append(paragraph)
        self.inline = []

    def _end_code(self) -> None:
        assert self.code is not None
        lines = "".join(self.code).replace("\r\n", "\n").split("\n")
        self.code = None
        while lines and not lines[0].strip():
            lines.pop(0)
        while lines and not lines[-1].strip():
            lines.pop()
        if not lines:
            return
        # HN keeps the indentation the author typed (two spaces or more); make sure every line has at least two,
        # shifting the whole block so that its relative indentation stays as it was.
        indent = min(len(line) - len(line.lstrip(" ")) for line in lines if line.strip())
        pad = " " * max(0, CODE_INDENT - indent)
        self.blocks.append("\n".join((pad + line).rstrip() if line.strip() else "" for line in lines))

    def text(self) -> str:
        return "\n\n".join(self.blocks)


def _link_text(href: str, anchor: str) -> str:
    """HN shows a truncated URL as the anchor and the full one in ``href``: keep the target."""
    anchor = anchor.strip()
    href = href.strip()
    if not href:
        return anchor
    shown = anchor.removesuffix("...").removesuffix("…").strip()
    if not shown or href.startswith(shown) or _bare(href).startswith(_bare(shown)):
        return href
    return f"{anchor} ({href})"  # not HN's auto-link (e.g. other HTML): keep both


def _bare(url: str) -> str:
    return re.sub(r"^[a-z]+://(www\.)?", "", url.lower())
