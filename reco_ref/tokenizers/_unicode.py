"""Unicode character classes built from the standard library's ``unicodedata``.

The reference tokenizers classify characters with tables we cannot import at run time: OpenAI's CLIP
tokenizer uses the third-party ``regex`` module (``\\p{L}``, ``\\p{N}``, ``\\s``), Hugging Face
``tokenizers`` uses Rust's character tables.  Here the same classes are derived from the running
Python's Unicode database, once, on first use (about 0.15 s for all 1,114,112 code points), and turned
into

* character-class strings for the stdlib ``re`` module (``[...]`` bodies of code-point ranges), so the
  pre-tokenisers run in the C regex engine, and
* small predicates for the per-character paths.

Where the references' tables are of another Unicode version than this Python's (14.0 on Python 3.11),
the differing code points are listed in ``_clip_unicode_new`` (``regex``, newer) and ``_bert_unicode8``
(HF, Unicode 8.0).  Agreement is checked code point by code point in ``tests/tokenizers``.
"""

from __future__ import annotations

import functools
import unicodedata

MAX_CODE_POINT = 0x10FFFF

# Unicode's White_Space property (PropList.txt).  It has not changed since Unicode 6.3 and is what both
# ``regex``'s ``\s`` and Rust's ``char::is_whitespace`` test.  Python's ``str.isspace`` differs: it also
# counts U+001C..U+001F (bidi class B/S) as space, hence the explicit list.
WHITE_SPACE = frozenset(
    [0x09, 0x0A, 0x0B, 0x0C, 0x0D, 0x20, 0x85, 0xA0, 0x1680]
    + list(range(0x2000, 0x200B))
    + [0x2028, 0x2029, 0x202F, 0x205F, 0x3000]
)


@functools.lru_cache(maxsize=None)
def category_table() -> bytes:
    """General category of every code point, as one byte per code point.

    Returns
    -------
    bytes, length 0x110000
        ``table[cp]`` is an index into :data:`CATEGORIES`.
    """
    index = {c: i for i, c in enumerate(CATEGORIES)}
    cat = unicodedata.category
    return bytes(index[cat(chr(cp))] for cp in range(MAX_CODE_POINT + 1))


CATEGORIES = (
    "Lu", "Ll", "Lt", "Lm", "Lo",
    "Mn", "Mc", "Me",
    "Nd", "Nl", "No",
    "Pc", "Pd", "Ps", "Pe", "Pi", "Pf", "Po",
    "Sm", "Sc", "Sk", "So",
    "Zs", "Zl", "Zp",
    "Cc", "Cf", "Cs", "Co", "Cn",
)


def code_point_ranges(categories: frozenset[str] | set[str]) -> list[tuple[int, int]]:
    """Maximal runs ``(first, last)`` of code points whose general category is in ``categories``."""
    wanted = bytes(1 if c in categories else 0 for c in CATEGORIES)
    table = category_table().translate(bytes(wanted[i] if i < len(wanted) else 0 for i in range(256)))
    ranges: list[tuple[int, int]] = []
    pos = table.find(1)
    while pos != -1:
        end = table.find(0, pos)
        if end == -1:
            end = len(table)
        ranges.append((pos, end - 1))
        pos = table.find(1, end)
    return ranges


def regex_class_body(ranges: list[tuple[int, int]]) -> str:
    """The inside of a ``re`` character class matching exactly the code points in ``ranges``.

    Every code point is written as a ``\\U`` escape so no character needs class-syntax escaping.
    """
    parts = []
    for lo, hi in ranges:
        if lo == hi:
            parts.append(f"\\U{lo:08x}")
        else:
            parts.append(f"\\U{lo:08x}-\\U{hi:08x}")
    return "".join(parts)


def white_space_class_body() -> str:
    """``re`` class body for Unicode White_Space (see :data:`WHITE_SPACE`)."""
    return regex_class_body(sorted((cp, cp) for cp in WHITE_SPACE))
