"""Paragraph text out of documentation formats: troff man pages, HTML/XML markup, plain text.

Each extractor takes the decoded text of one file and returns its paragraphs in order, each a
single line with markup removed. Lines that were wrapped inside a paragraph are joined with no
space between two Japanese characters and with one space otherwise, which is how a browser or
``man`` lays Japanese out for the reader.

What is dropped as not being prose: troff requests, escapes, comments, macro definitions and
no-fill blocks (``.nf``/``.fi``, ``.EX``/``.EE``, mdoc ``-literal`` displays: code and synopses);
HTML/XML tags, comments, ``<head>``, scripts, styles, navigation, ``<pre>`` and the code/screen
blocks of DocBook and Mallard.

:func:`has_kana` decides what counts as Japanese and :func:`dedup_key` what counts as the same
paragraph.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from html.parser import HTMLParser
from typing import NamedTuple

# ----------------------------------------------------------------------------- text helpers

_KANA = re.compile(r"[\u3041-\u309f\u30a0-\u30ff\u31f0-\u31ff\uff66-\uff9d]")
_CJK = "\u3000-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff00-\uffef"
_CJK_WRAP = re.compile(rf"(?<=[{_CJK}])[ \t]*\n\s*(?=[{_CJK}])")
_SPACES = re.compile(r"\s+")


def has_kana(text: str) -> bool:
    """True when ``text`` holds hiragana or katakana (Chinese and English text hold none)."""
    return _KANA.search(text) is not None


def tidy(text: str) -> str:
    """One line: wrapped lines joined (no space between Japanese characters), spaces collapsed."""
    text = _CJK_WRAP.sub("", text)
    return _SPACES.sub(" ", text).strip()


def dedup_key(paragraph: str) -> bytes:
    """The key under which two paragraphs count as the same: a hash of their NFKC, space-collapsed form."""
    normal = _SPACES.sub(" ", unicodedata.normalize("NFKC", paragraph)).strip()
    return hashlib.blake2b(normal.encode("utf-8"), digest_size=16).digest()


def plain_paragraphs(text: str) -> list[str]:
    """Paragraphs of plain text: blocks separated by blank lines."""
    blocks = re.split(r"\n[ \t\r\f\v]*\n", text.replace("\r\n", "\n"))
    return [p for p in (tidy(block) for block in blocks) if p]


# ----------------------------------------------------------------------------- troff

# Named characters, \(xx and \[xx]; anything not listed here disappears.
_TROFF_CHARS = {
    "em": "\u2014", "en": "\u2013", "hy": "-", "mi": "-", "bu": "\u2022", "co": "\u00a9", "rg": "\u00ae",
    "tm": "\u2122", "lq": "\u201c", "rq": "\u201d", "oq": "\u2018", "cq": "\u2019", "aq": "'", "dq": '"',
    "ti": "~", "ha": "^", "rs": "\\", "sl": "/", "ul": "_", "ru": "_", "ba": "|", "br": "|", "de": "\u00b0",
    "mu": "\u00d7", "di": "\u00f7", "+-": "\u00b1", ">=": "\u2265", "<=": "\u2264", "!=": "\u2260",
    "->": "\u2192", "<-": "\u2190", "if": "\u221e", "pl": "+", "eq": "=", "ga": "`", "aa": "\u00b4",
    "Fo": "\u00ab", "Fc": "\u00bb", "fo": "\u2039", "fc": "\u203a", "sc": "\u00a7", "ps": "\u00b6",
    "dg": "\u2020", "ct": "\u00a2", "Eu": "\u20ac", "eu": "\u20ac", "Po": "\u00a3", "Ye": "\u00a5",
    "lh": "\u261c", "rh": "\u261e", "sq": "\u25a1", "ci": "\u25cb", "OK": "\u2713", "at": "@", "sh": "#",
    "Do": "$", "bs": "\\", "lB": "[", "rB": "]", "lC": "{", "rC": "}", "la": "\u27e8", "ra": "\u27e9",
}
# Predefined strings, \*x, \*(xx and \*[name] (man's and pod2man's usual ones).
_TROFF_STRINGS = {
    "R": "\u00ae", "Tm": "\u2122", "lq": "\u201c", "rq": "\u201d", "L\"": "\u201c", "R\"": "\u201d",
    "C+": "C++", "C'": "'", "C`": "`", "PI": "\u03c0", "Aq": "'", "q": '"',
}
_TROFF_ESCAPE = re.compile(
    r"""\\(?:
        (?P<font>[fFgmMsS][-+]?(?:\[[^\]]*\]|\(..|\d+|.))       # font, colour, size
      | (?P<arg>[hvwlLoXZDbxRNCABS])'[^']*'                    # quoted-argument escapes
      | (?P<num>[nk][-+]?(?:\[[^\]]*\]|\(..|.))                 # number registers, marks
      | (?P<char>\((?P<c2>..)|\[(?P<cn>[^\]]*)\])               # named characters
      | (?P<str>\*(?:\((?P<s2>..)|\[(?P<sn>[^\]]*)\]|(?P<s1>.)))  # strings
      | (?P<space>[ ~0])
      | (?P<other>.)
    )""",
    re.VERBOSE,
)
_ESCAPE_SINGLES = {"-": "-", "e": "\\", "\\": "\\", "'": "\u00b4", "`": "`", ".": ".", "t": " ",
                   "E": "\\", '"': ""}
_DROPPED_SINGLES = set("&^|:/,%)cdupz{}a!?tr")


def _troff_escape(match: re.Match) -> str:
    if match.group("char"):
        name = match.group("c2") or match.group("cn") or ""
        if name.startswith("u") and re.fullmatch(r"u[0-9A-Fa-f]{4,6}", name):
            return chr(int(name[1:], 16))
        return _TROFF_CHARS.get(name, "")
    if match.group("str"):
        return _TROFF_STRINGS.get(match.group("s2") or match.group("sn") or match.group("s1") or "", "")
    if match.group("space"):
        return " "
    other = match.group("other")
    if other is not None:
        if other in _ESCAPE_SINGLES:
            return _ESCAPE_SINGLES[other]
        return "" if other in _DROPPED_SINGLES else other
    return ""


def troff_inline(text: str) -> str:
    """Text of a troff line with its escapes resolved and a trailing ``\\"`` comment removed."""
    text = re.sub(r'\\".*', "", text)
    text = text.replace("\\\\", "\\e")  # an escaped backslash, so that it starts no escape below
    return _TROFF_ESCAPE.sub(_troff_escape, text)


def _macro_args(rest: str) -> list[str]:
    """Split macro arguments: blanks separate, double quotes group, ``""`` is a literal quote."""
    args, i, n = [], 0, len(rest)
    while i < n:
        while i < n and rest[i] in " \t":
            i += 1
        if i >= n:
            break
        if rest[i] == '"':
            i += 1
            buf = []
            while i < n:
                if rest[i] == '"':
                    if i + 1 < n and rest[i + 1] == '"':
                        buf.append('"')
                        i += 2
                        continue
                    i += 1
                    break
                buf.append(rest[i])
                i += 1
            args.append("".join(buf))
        else:
            j = i
            while j < n and rest[j] not in " \t":
                j += 1
            args.append(rest[i:j])
            i = j
    return args


_BREAKS = {"PP", "LP", "P", "sp", "br", "RS", "RE", "in", "ti", "bp", "ne", "Pp", "Lp", "Bl", "El", "Sp",
           "TQ", "HP", "PD", "ce", "SY", "YS", "Rs", "Re", "Dl"}
_HEADINGS = {"SH", "SS", "Sh", "Ss"}
_FONT_ALT = {"BR", "RB", "BI", "IB", "IR", "RI"}
_FONT_ONE = {"B", "I", "SM", "SB", "R", "C", "CW", "CR", "CB", "CI"}
_MACRO_BLOCKS = {"de", "de1", "am", "ig"}
_CONDITIONALS = {"if", "ie", "el", "while"}
_NO_FILL = {"nf": "fi", "EX": "EE", "Vb": "Ve", "Ds": "De", "DS": "DE", "CD": "De"}
"""Requests that start a no-fill block (code, synopses) and the request that ends each."""
_MDOC_INLINE = {"Nm", "Ar", "Fl", "Cm", "Ic", "Xr", "Pa", "Dv", "Ev", "Em", "Sy", "Li", "Ql", "Dq", "Sq", "Pq",
                "Qq", "Bq", "Aq", "Op", "Oo", "Oc", "Ns", "No", "Va", "Fn", "Fa", "Ft", "Tn", "St", "Ad", "Er",
                "Ms", "Pf", "Ao", "Ac", "Bo", "Bc", "Po", "Pc", "Do", "Dc", "So", "Sc", "Qo", "Qc", "Eo", "Ec",
                "Sx", "Mt", "Lk", "Ot", "At", "Nd", "Ta", "Cd", "Vt", "Bsx", "Fx", "Nx", "Ox", "Dx"}
_MDOC_OPEN = {"Dq": ("\u201c", "\u201d"), "Sq": ("\u2018", "\u2019"), "Pq": ("(", ")"), "Qq": ('"', '"'),
              "Bq": ("[", "]"), "Aq": ("<", ">"), "Op": ("[", "]")}
_MDOC_BRACKETS = {"Oo": "[", "Oc": "]", "Ao": "<", "Ac": ">", "Bo": "[", "Bc": "]", "Po": "(", "Pc": ")",
                  "Do": "\u201c", "Dc": "\u201d", "So": "\u2018", "Sc": "\u2019", "Qo": '"', "Qc": '"'}
_CLOSE_PUNCT = set(".,:;)]?!")


def _mdoc_text(words: list[str]) -> str:
    """Text of an mdoc line: macro names removed, ``Fl`` flags dashed, ``Xr`` as name(section)."""
    out: list[str] = []
    glue = False  # the next word attaches to the previous one
    closers: list[str] = []
    i = 0
    while i < len(words):
        word = words[i]
        if word in _MDOC_INLINE:
            if word == "Ns":
                glue = True
            elif word == "Fl":
                nxt = words[i + 1] if i + 1 < len(words) and words[i + 1] not in _MDOC_INLINE else ""
                out.append(("" if glue or not out else " ") + "-" + nxt)
                glue = False
                i += 2 if nxt else 1
                continue
            elif word == "Xr" and i + 2 < len(words):
                out.append(("" if glue or not out else " ") + f"{words[i + 1]}({words[i + 2]})")
                glue = False
                i += 3
                continue
            elif word in _MDOC_OPEN:
                opener, closer = _MDOC_OPEN[word]
                out.append(("" if glue or not out else " ") + opener)
                closers.append(closer)
                glue = True
            elif word in _MDOC_BRACKETS:
                bracket = _MDOC_BRACKETS[word]
                if bracket in "[<(\u201c\u2018" or (bracket == '"' and word == "Qo"):
                    out.append(("" if glue or not out else " ") + bracket)
                    glue = True
                else:
                    out.append(bracket)
            i += 1
            continue
        attach = glue or not out or (len(word) == 1 and word in _CLOSE_PUNCT)
        out.append(("" if attach else " ") + word)
        glue = False
        i += 1
    text = "".join(out)
    # Closers of Dq/Sq/... go before trailing punctuation that the macro left outside.
    tail = ""
    while text and text[-1] in _CLOSE_PUNCT and closers:
        tail = text[-1] + tail
        text = text[:-1].rstrip()
    return text + "".join(reversed(closers)) + tail


_REQUEST = re.compile(r"(\S+)\s*(.*)")


class _Request(NamedTuple):
    """A control line (``.name rest`` or ``'name rest``); ``name`` is empty for a bare ``.``."""

    name: str
    rest: str
    line: str


def _request(line: str) -> _Request | None:
    """The request on ``line``; None for a text line."""
    if line[:1] not in (".", "'"):
        return None
    match = _REQUEST.match(line[1:].lstrip(" \t"))
    return _Request(match.group(1), match.group(2), line) if match else _Request("", "", line)


def _block_end(request: _Request) -> str:
    """The request that ends a macro definition (``..``), or an ``.ig`` block (its argument, else ``..``)."""
    words = request.rest.split() if request.name == "ig" else []
    return (words[0] if words else "..").lstrip(".") or "."


class _TroffReader:
    """Reads a man page line by line: the state carried from line to line, and one method for each
    family of requests (:data:`_HANDLERS` says which). Requests it has no method for (``.TH``,
    ``.ad``, ``.ft``, strings and registers, user macros, mdoc header macros, comments) carry no prose."""

    def __init__(self):
        self.paragraphs: list[str] = []
        self.lines: list[str] = []  # the paragraph being read
        self.block_ends: set[str] | None = None  # the requests ending a skipped block (macro, no-fill, ...)
        self.brace_depth = 0  # inside a skipped \{ ... \} conditional body
        self.table: list[str] | None = None  # the rows of a tbl(1) table being read
        self.tag_next = False  # the line after .TP is a tag: a paragraph of its own
        self.redirected = False  # an .so request: the page is another page's alias

    def read(self, text: str) -> list[str]:
        for line in re.sub(r"(?<!\\)\\\n", "", text.replace("\r\n", "\n")).split("\n"):
            self.read_line(line)
            if self.redirected:
                return []
        self.flush()
        return self.paragraphs

    def read_line(self, line: str) -> None:
        """One line: a skipped conditional body comes first, then a skipped block, a table, and only
        then text or a request."""
        if self.brace_depth:
            self.brace_depth = max(self.brace_depth + line.count("\\{") - line.count("\\}"), 0)
            return
        request = _request(line)
        if self.block_ends is not None:
            if request is not None and request.name in self.block_ends:
                self.block_ends = None
        elif self.table is not None:
            self.table_row(request, line)
        elif request is None:
            self.text(line)
        elif request.name in _HANDLERS:
            _HANDLERS[request.name](self, request)

    def flush(self) -> None:
        """End the paragraph being read."""
        if self.lines:
            paragraph = tidy(troff_inline("\n".join(self.lines)))
            if paragraph:
                self.paragraphs.append(paragraph)
            self.lines.clear()

    def text(self, line: str) -> None:
        """A text line; a blank one ends the paragraph."""
        if not line.strip():
            self.flush()
            return
        self.add_text(line)

    def add_text(self, text: str) -> None:
        """Text for the paragraph; after .TP it is the tag, a paragraph of its own."""
        self.lines.append(text)
        if self.tag_next:
            self.flush()
            self.tag_next = False

    def skip_block(self, ends: str) -> None:
        """Skip lines up to a request named in ``ends`` (names separated by ``|``)."""
        self.block_ends = set(ends.split("|"))

    def table_row(self, request: _Request | None, line: str) -> None:
        if request is not None and request.name == "TE":
            self.paragraphs.extend(_table_cells(self.table))
            self.table = None
        else:
            self.table.append(line)

    # ------------------------------------------------------------------ one method a request family

    def macro_block(self, request: _Request) -> None:
        """.de, .de1, .am, .ig: a macro definition or ignored block."""
        self.skip_block(_block_end(request))

    def conditional(self, request: _Request) -> None:
        """.if, .ie, .el, .while: skipped, and with it a ``\\{ ... \\}`` body."""
        self.brace_depth = max(request.line.count("\\{") - request.line.count("\\}"), 0)

    def no_fill(self, request: _Request) -> None:
        self.flush()
        self.skip_block(_NO_FILL[request.name])

    def mdoc_display(self, request: _Request) -> None:
        """.Bd: a display, skipped when literal or unfilled."""
        self.flush()
        if "-literal" in request.rest or "-unfilled" in request.rest:
            self.skip_block("Ed")

    def redirect(self, request: _Request) -> None:
        self.redirected = True

    def table_start(self, request: _Request) -> None:
        self.flush()
        self.table = []

    def heading(self, request: _Request) -> None:
        self.flush()
        heading = " ".join(_macro_args(request.rest))
        if heading:
            self.lines.append(heading)
        self.flush()

    def tagged_paragraph(self, request: _Request) -> None:
        """.TP: the next line is the tag."""
        self.flush()
        self.tag_next = True

    def list_item(self, request: _Request) -> None:
        """mdoc's .It: its arguments are the tag."""
        self.flush()
        if request.rest:
            self.lines.append(_mdoc_text(_macro_args(request.rest)))
            self.flush()
        else:
            self.tag_next = False

    def indented_paragraph(self, request: _Request) -> None:
        """.IP: its first argument is the tag."""
        self.flush()
        args = _macro_args(request.rest)
        if args and args[0]:
            self.lines.append(args[0])
            self.flush()

    def paragraph_break(self, request: _Request) -> None:
        self.flush()

    def font(self, request: _Request) -> None:
        """.B, .I, ...: the arguments in one font; with none, the font applies to the next (text) line."""
        args = _macro_args(request.rest)
        if args:
            self.add_text(" ".join(args))

    def alternating_fonts(self, request: _Request) -> None:
        """.BR, .IR, ...: the arguments, joined, in alternating fonts."""
        self.add_text("".join(_macro_args(request.rest)))

    def link_end(self, request: _Request) -> None:
        """.UE, .ME: what follows the link text (punctuation)."""
        words = _macro_args(request.rest)
        if words:
            self.lines.append("".join(words))

    def mdoc_inline(self, request: _Request) -> None:
        self.lines.append(_mdoc_text([request.name, *_macro_args(request.rest)]))


_HANDLERS = {
    **dict.fromkeys(_MACRO_BLOCKS, _TroffReader.macro_block),
    **dict.fromkeys(_CONDITIONALS, _TroffReader.conditional),
    **dict.fromkeys(_NO_FILL, _TroffReader.no_fill),
    "Bd": _TroffReader.mdoc_display,
    "so": _TroffReader.redirect,
    "TS": _TroffReader.table_start,
    **dict.fromkeys(_HEADINGS, _TroffReader.heading),
    "TP": _TroffReader.tagged_paragraph,
    "It": _TroffReader.list_item,
    "IP": _TroffReader.indented_paragraph,
    **dict.fromkeys(_BREAKS, _TroffReader.paragraph_break),
    **dict.fromkeys(_FONT_ONE, _TroffReader.font),
    **dict.fromkeys(_FONT_ALT, _TroffReader.alternating_fonts),
    **dict.fromkeys(_MDOC_INLINE, _TroffReader.mdoc_inline),
    **dict.fromkeys(("UE", "ME"), _TroffReader.link_end),
}
"""The method that reads each request; each request is in one family only. (.UR and .MT, which give
a link's address, have none: the link text follows on lines of its own.)"""


def troff_paragraphs(text: str) -> list[str]:
    """Paragraphs of a man page in man(7) or mdoc(7) troff; an ``.so`` redirect has none."""
    return _TroffReader().read(text)


def _table_cells(rows: list[str]) -> list[str]:
    """Cell texts of a tbl(1) table (between .TS and .TE): options and format lines skipped."""
    i = 0
    tab = "\t"
    if rows and rows[0].rstrip().endswith(";"):
        found = re.search(r"tab\s*\((.)\)", rows[0])
        if found:
            tab = found.group(1)
        i = 1
    while i < len(rows) and not rows[i].rstrip().endswith("."):
        i += 1
    cells: list[str] = []
    block: list[str] | None = None
    for row in rows[i + 1:]:
        if block is not None:
            if row.startswith("T}"):
                cells.append(tidy(troff_inline("\n".join(block))))
                block = None
                rest = row[2:].lstrip(tab)
                cells.extend(tidy(troff_inline(c)) for c in rest.split(tab) if c)
            elif not row.startswith((".", "'")):
                block.append(row)
            continue
        if row.startswith((".", "'")) or row.strip() in ("_", "=", ""):
            continue
        for cell in row.split(tab):
            if cell.endswith("T{"):
                block = []
                break
            cells.append(tidy(troff_inline(cell)))
    return [c for c in cells if c]


# ----------------------------------------------------------------------------- HTML and XML markup

# Elements that end a paragraph (HTML, XHTML, DocBook, Mallard, LibreOffice help).
_BLOCK = {
    "p", "div", "h1", "h2", "h3", "h4", "h5", "h6", "li", "dt", "dd", "td", "th", "tr", "table", "ul", "ol",
    "dl", "br", "hr", "blockquote", "section", "article", "main", "title", "caption", "figcaption", "center",
    "address", "body", "html", "form", "fieldset", "legend", "figure", "details", "summary", "tbody",
    "thead", "tfoot", "option", "label",
    # DocBook / Mallard / help XML
    "para", "simpara", "formalpara", "listitem", "entry", "row", "term", "varlistentry", "note", "tip",
    "warning", "important", "caution", "item", "list", "terms", "tree", "steps", "desc", "page", "subtitle",
    "refpurpose", "refname", "paragraph", "variable", "bookmark_value", "example", "sect1", "sect2", "sect3",
    "chapter", "appendix", "refentry", "refsect1", "refsect2", "abstract", "glossentry", "glossdef", "quote",
}
# Elements whose whole content is dropped.
_SKIP = {
    "head", "script", "style", "noscript", "template", "svg", "math", "textarea", "select", "nav", "header",
    "footer", "aside", "pre", "button", "object", "iframe", "canvas",
    # DocBook / Mallard: code and terminal blocks, metadata
    "programlisting", "screen", "synopsis", "literallayout", "info", "articleinfo", "bookinfo", "indexterm",
    "cmdsynopsis", "funcsynopsis",
}
_VOID = {"br", "hr", "img", "meta", "link", "input", "area", "base", "col", "embed", "param", "source",
         "track", "wbr", "keygen"}


class _MarkupText(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.paragraphs: list[str] = []
        self.buffer: list[str] = []
        self.skip: list[str] = []

    def _flush(self) -> None:
        if self.buffer:
            paragraph = tidy("".join(self.buffer)).rstrip("\u00b6").rstrip()  # Sphinx's heading anchor
            if paragraph:
                self.paragraphs.append(paragraph)
            self.buffer.clear()

    def handle_starttag(self, tag, attrs):
        tag = tag.split(":")[-1]
        if tag in _SKIP and tag not in _VOID:
            self.skip.append(tag)
            return
        if not self.skip and tag in _BLOCK:
            self._flush()

    def handle_startendtag(self, tag, attrs):
        tag = tag.split(":")[-1]
        if not self.skip and tag in _BLOCK:
            self._flush()

    def handle_endtag(self, tag):
        tag = tag.split(":")[-1]
        if self.skip:
            if tag in self.skip:
                while self.skip and self.skip.pop() != tag:
                    pass
            return
        if tag in _BLOCK:
            self._flush()

    def handle_data(self, data):
        if not self.skip:
            self.buffer.append(data)


def markup_paragraphs(text: str) -> list[str]:
    """Paragraphs of an HTML, XHTML or XML document (DocBook, Mallard, help pages)."""
    parser = _MarkupText()
    parser.feed(text)
    parser.close()
    parser._flush()
    return parser.paragraphs
