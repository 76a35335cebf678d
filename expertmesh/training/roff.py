"""Turn man-page roff source into plain text with a small regex cleaner.
Deterministic and independent of the installed groff, so the corpus is the same wherever it is built."""

import re

# Font-alternation macros: ".BR foo (1)" prints "foo(1)", arguments glued without spaces.
_ALTERNATING = {"BR", "BI", "IB", "IR", "RB", "RI"}
# Single-font macros: ".B foo bar" prints "foo bar".
_SINGLE_FONT = {"B", "I", "R", "SM", "SB"}
_HEADINGS = {"SH", "SS"}
_PARAGRAPH = {"PP", "LP", "P", "sp", "TP", "HP", "IP", "TQ"}
# Blocks whose lines are not prose: macro definitions and tables/equations/pictures.
_SKIP_BLOCKS = {"de": "..", "TS": ".TE", "EQ": ".EN", "PS": ".PE", "ig": ".."}

_NAMED_GLYPHS = {
    "aq": "'", "dq": '"', "lq": '"', "rq": '"', "oq": "'", "cq": "'", "em": "—", "en": "–",
    "hy": "-", "bu": "•", "co": "©", "rg": "®", "tm": "™", "mu": "×", "di": "÷", "+-": "±",
    "<=": "≤", ">=": "≥", "!=": "≠", "->": "→", "<-": "←", "ga": "`", "ha": "^", "ti": "~",
    "rs": "\\", "sl": "/", "ba": "|", "br": "|", "lB": "[", "rB": "]", "lC": "{", "rC": "}",
    "Fo": "«", "Fc": "»", "fo": "‹", "fc": "›", "de": "°", "ss": "ß", "a:": "ä", "o:": "ö",
    "u:": "ü", "A:": "Ä", "O:": "Ö", "U:": "Ü", "e'": "é", "e`": "è", "a`": "à", "c,": "ç",
}

_ESCAPES = [
    (re.compile(r'\\".*$'), ""),                             # comment to end of line
    (re.compile(r"\\f(\[[^\]]*\]|\(..|.)"), ""),             # font changes
    (re.compile(r"\\s[+-]?(\d|\(\d\d|\[\d+\])"), ""),        # size changes
    (re.compile(r"\\\*(\[[^\]]*\]|\(..|.)"), ""),            # string interpolation
    (re.compile(r"\\[hvwlLxoDbkHSXRZNY]'[^']*'"), ""),       # motions, widths, drawing
    (re.compile(r"\\n(\[[^\]]*\]|\(..|.)"), ""),             # number registers
    (re.compile(r"\\\((..)"), lambda m: _NAMED_GLYPHS.get(m.group(1), "")),
    (re.compile(r"\\\[u([0-9A-Fa-f]{4,5})\]"), lambda m: chr(int(m.group(1), 16))),
    (re.compile(r"\\\[([^\]]*)\]"), lambda m: _NAMED_GLYPHS.get(m.group(1), "")),
    (re.compile(r"\\[-]"), "-"),
    (re.compile(r"\\[ ~0]"), " "),
    (re.compile(r"\\[&|^%:c!)/,dut{}]"), ""),
    (re.compile(r"\\e"), "\0"),                              # held back so the next rule cannot eat it
    (re.compile(r"\\(.)"), r"\1"),                           # any other escaped char stands for itself
]


def unescape(line: str) -> str:
    """Remove roff escapes from one text line, keeping the characters they stand for."""
    for pattern, replacement in _ESCAPES:
        line = pattern.sub(replacement, line)
    return line.replace("\0", "\\")


def _macro_arguments(rest: str) -> list[str]:
    # roff quotes group words into one argument; "" inside quotes is a literal quote.
    return [a[1:-1].replace('""', '"') if a.startswith('"') else a
            for a in re.findall(r'"(?:[^"]|"")*"?|\S+', rest)]


def roff_to_text(source: str) -> str:
    """Render man-page roff source as plain text: prose lines kept, macros and escapes removed."""
    out: list[str] = []
    filling = True
    tag_pending = False  # the line after .TP is a tag, set on a line of its own

    def emit(text: str) -> None:
        nonlocal tag_pending
        text = text.rstrip()
        # Filled text is reflowed as groff would; no-fill blocks (examples, synopses) keep their lines.
        if filling and text and out and out[-1] and not tag_pending and not out[-1].startswith(" ") \
                and not text.startswith(" "):
            out[-1] = out[-1] + " " + text.strip()
        else:
            out.append(text)
        if tag_pending and text:
            out.append("")
            tag_pending = False

    skip_until: str | None = None
    for raw in source.splitlines():
        if skip_until is not None:
            if raw.strip().startswith(skip_until):
                skip_until = None
            continue
        if not raw.startswith((".", "'")):
            emit(unescape(raw))
            continue
        match = re.match(r"[.']\s*(\S*)\s*(.*)", raw)
        name, rest = match.group(1), match.group(2)
        if name in ("nf", "EX"):
            filling = False
            out.append("")
        elif name in ("fi", "EE"):
            filling = True
            out.append("")
        elif name in _SKIP_BLOCKS:
            skip_until = _SKIP_BLOCKS[name]
        elif name in _HEADINGS:
            out.extend(["", unescape(" ".join(_macro_arguments(rest))).strip(), ""])
        elif name in _SINGLE_FONT:
            emit(unescape(" ".join(_macro_arguments(rest))))
        elif name in _ALTERNATING:
            emit(unescape("".join(_macro_arguments(rest))))
        elif name in _PARAGRAPH:
            out.append("")
            tag_pending = name in ("TP", "TQ")
            arguments = _macro_arguments(rest)
            if name == "IP" and arguments:
                out.extend([unescape(arguments[0]), ""])
        # every other request (.TH, .RS, .if, .in, ...) is layout: dropped
    text = "\n".join(line.rstrip() for line in out)
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"
