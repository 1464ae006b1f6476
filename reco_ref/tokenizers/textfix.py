"""The text clean-up CLIP was trained with, in the standard library.

OpenAI's tokenizer cleans every caption with ``ftfy.fix_text`` (ftfy 6.x defaults), then
``html.unescape`` twice, collapses white space and lower-cases.  ``ftfy.fix_text`` is a fixed-point
loop of small, well-defined fixes plus one heuristic one, *mojibake repair* (``fix_encoding``: guess
that UTF-8 was decoded as Latin-1/Windows-125x/MacRoman/CP437 and undo it).  This module implements
every fix except mojibake repair, with the same order, the same line-by-line segmentation and the
same fixed-point iteration:

1. split into lines (each keeps its ``\\n``; a line longer than 10**6 characters is cut), and from the
   first line containing ``<`` on, stop decoding HTML entities (ftfy's ``unescape_html="auto"``:
   such text looks like real HTML);
2. per line, repeat until nothing changes:
   decode HTML entities that end in ``;`` (HTML5 names, upper-cased Latin names such as ``&EACUTE;``,
   numeric references) → C1 controls U+0080..U+009F read as Windows-1252 → Latin ligatures split
   (``ﬁ`` → ``fi``) → full/half-width forms to normal width, U+3000 to a space → curly quotes
   straightened → ``\\r\\n``/``\\r``/U+2028/U+2029/U+0085 to ``\\n`` → surrogate pairs joined, lone
   surrogates to U+FFFD → ANSI terminal escapes removed → invisible control characters removed →
   NFC.

What differs from ``ftfy.fix_text``: text that ftfy's badness heuristic flags as mojibake (e.g.
``"cafÃ©"``, ``"â€œquotedâ€\u009d"``) is left as it is instead of being re-decoded.  Pass
``fix_text=ftfy.fix_text`` to :class:`reco_ref.tokenizers.ClipBPE` where exact parity on such input
matters and ftfy is installed.
"""

from __future__ import annotations

import functools
import html
import html.entities
import re
import unicodedata

MAX_SEGMENT = 1_000_000  # ftfy's max_decode_length: lines longer than this are fixed piecewise

_ENTITY_RE = re.compile(r"&#?[0-9A-Za-z]{1,24};")
# `\d` is Unicode-aware here on purpose: ftfy's own pattern is a stdlib `re` str pattern too.
_ANSI_RE = re.compile("\x1b\\[(?:\\d|;)*[a-zA-Z]")
_SURROGATE_RE = re.compile("[\ud800-\udfff]")
_SURROGATE_PAIR_RE = re.compile("[\ud800-\udbff][\udc00-\udfff]")
_C1_RE = re.compile("[\x80-\x9f]")
# Anything a fix could act on.  Text without any of these characters is a fixed point of every step.
_NEEDS_FIX_RE = re.compile("[^\t\n\x0c\x20-\x7e]")


@functools.lru_cache(maxsize=None)
def _entities() -> dict[str, str]:
    """``"&name;"`` → text, for the entities ftfy decodes.

    HTML5 names that end in ``;``; for an all-lower-case name whose upper-case spelling is not itself
    an entity (``&eacute;`` → ``&EACUTE;``), the upper-case spelling decodes to the upper-cased text.
    """
    table: dict[str, str] = {}
    for name, text in html.entities.html5.items():
        if not name.endswith(";"):
            continue
        table["&" + name] = text
        if name == name.lower():
            upper = "&" + name.upper()
            # `html.unescape` also decodes prefixes such as "&LT" inside "&LTILDE;": such spellings are ambiguous.
            if html.unescape(upper) == upper:
                table[upper] = text.upper()
    return table


def _decode_entity(match: re.Match) -> str:
    ref = match.group(0)
    text = _entities().get(ref)
    if text is not None:
        return text
    if ref.startswith("&#"):
        decoded = html.unescape(ref)
        # A reference html.unescape only partly consumed (its ";" survives) is left alone.
        return ref if ";" in decoded else decoded
    return ref


def unescape_entities(text: str) -> str:
    """Decode ``&name;`` / ``&#n;`` / ``&#xh;`` references (only those ending in ``;``)."""
    if "&" not in text:
        return text
    return _ENTITY_RE.sub(_decode_entity, text)


@functools.lru_cache(maxsize=None)
def _c1_table() -> dict[int, str]:
    """U+0080..U+009F → their Windows-1252 meaning; the 5 bytes cp1252 leaves undefined stay as they are."""
    table = {}
    for cp in range(0x80, 0xA0):
        try:
            table[cp] = bytes([cp]).decode("cp1252")
        except UnicodeDecodeError:
            table[cp] = chr(cp)
    return table


def fix_c1_controls(text: str) -> str:
    """Read C1 control characters as the Windows-1252 characters browsers show for them."""
    return text.translate(_c1_table())


# Single-character Latin ligatures and legacy digraphs that are split back into their letters.
# Ligatures of other scripts (and æ/œ, which are letters in their own right) are kept.
_LIGATURES = {
    0x0132: "IJ", 0x0133: "ij", 0x0149: "\u02bcn",
    0x01C4: "D\u017d", 0x01C5: "D\u017e", 0x01C6: "d\u017e",
    0x01C7: "LJ", 0x01C8: "Lj", 0x01C9: "lj",
    0x01CA: "NJ", 0x01CB: "Nj", 0x01CC: "nj",
    0x01F1: "DZ", 0x01F2: "Dz", 0x01F3: "dz",
    0xFB00: "ff", 0xFB01: "fi", 0xFB02: "fl", 0xFB03: "ffi", 0xFB04: "ffl", 0xFB05: "\u017ft", 0xFB06: "st",
}


@functools.lru_cache(maxsize=None)
def _width_table() -> dict[int, str]:
    """Full-width / half-width forms (U+FF01..U+FFEF) → their NFKC form; ideographic space → space."""
    table = {0x3000: " "}
    for cp in range(0xFF01, 0xFFF0):
        folded = unicodedata.normalize("NFKC", chr(cp))
        if folded != chr(cp):
            table[cp] = folded
    return table


_QUOTES = {0x02BC: "'", 0x2018: "'", 0x2019: "'", 0x201A: "'", 0x201B: "'",
           0x201C: '"', 0x201D: '"', 0x201E: '"', 0x201F: '"'}

# Invisible controls nobody means to keep: C0 except \t \n \x0c \r, DEL, deprecated Arabic format
# controls, interlinear annotation marks, the object replacement character, and the BOM.
_CONTROL_DELETE = dict.fromkeys(
    list(range(0x00, 0x09)) + [0x0B] + list(range(0x0E, 0x20)) + [0x7F]
    + list(range(0x206A, 0x2070)) + [0xFEFF] + list(range(0xFFF9, 0xFFFD))
)


def _join_surrogates(text: str) -> str:
    if not _SURROGATE_RE.search(text):
        return text
    text = _SURROGATE_PAIR_RE.sub(
        lambda m: chr(0x10000 + ((ord(m.group(0)[0]) - 0xD800) << 10) + (ord(m.group(0)[1]) - 0xDC00)), text
    )
    return _SURROGATE_RE.sub("\ufffd", text)


def _fix_segment(text: str, unescape: bool) -> str:
    """One line, fixed to a fixed point of the fixes (module docstring, step 2)."""
    while True:
        before = text
        if unescape:
            text = unescape_entities(text)
        if _C1_RE.search(text):
            text = fix_c1_controls(text)
        text = text.translate(_LIGATURES)
        text = text.translate(_width_table())
        text = text.translate(_QUOTES)
        text = (
            text.replace("\r\n", "\n").replace("\r", "\n")
            .replace("\u2028", "\n").replace("\u2029", "\n").replace("\x85", "\n")
        )
        text = _join_surrogates(text)
        if "\x1b" in text:
            text = _ANSI_RE.sub("", text)
        text = text.translate(_CONTROL_DELETE)
        text = unicodedata.normalize("NFC", text)
        if text == before:
            return text


def fix_text(text: str) -> str:
    """``ftfy.fix_text(text)`` (ftfy 6.x defaults) without mojibake repair.

    Parameters
    ----------
    text : str

    Returns
    -------
    str
        The fixed text; see the module docstring for the list of fixes and the one difference.
    """
    if not _NEEDS_FIX_RE.search(text) and "&" not in text:
        return text  # plain printable ASCII: every fix is the identity
    out = []
    unescape = True
    pos = 0
    while pos < len(text):
        end = text.find("\n", pos) + 1
        if end == 0:
            end = len(text)
        end = min(end, pos + MAX_SEGMENT)
        segment = text[pos:end]
        if unescape and "<" in segment:
            unescape = False  # sticky for the rest of the text, as in ftfy
        out.append(_fix_segment(segment, unescape))
        pos = end
    return "".join(out)
