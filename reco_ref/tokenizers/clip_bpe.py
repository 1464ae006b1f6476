"""CLIP's byte-level BPE tokenizer, pure Python.

Same ids as OpenAI's ``clip/simple_tokenizer.py`` (the tokenizer CLIP was trained with) for the
``<|startoftext|> ... <|endoftext|>`` sequence that ``clip.tokenize`` builds, using only the standard
library at run time (the reference needs ``ftfy`` and ``regex``).

Pipeline for one text (each stage a function below):

1. clean: :func:`reco_ref.tokenizers.textfix.fix_text` (``ftfy.fix_text`` without mojibake repair),
   ``html.unescape`` twice, strip;
2. collapse every run of Unicode White_Space into one space, strip, lower-case;
3. pre-tokenise with the CLIP pattern, rewritten for the stdlib ``re`` module with explicit
   code-point classes::

       <|startoftext|> | <|endoftext|> | 's | 't | 're | 've | 'm | 'll | 'd
       | letters+ | one number character | (not space, letter or number)+

   (letters and numbers: Python's ``unicodedata`` categories plus the code points the reference's
   newer ``regex`` tables assign and this Python does not, :mod:`._clip_unicode_new`;
   the reference pattern is case-insensitive; after lower-casing that only matters for
   U+017F LATIN SMALL LETTER LONG S, which matches ``s``, and for U+0345, which folds to a letter
   and so matches no alternative and is dropped);
4. map each pre-token's UTF-8 bytes to printable stand-in characters (bytes that are printable
   Latin-1 stand for themselves, the other 68 bytes for U+0100 + k), mark the last symbol with
   ``</w>``, and merge adjacent symbol pairs, lowest merge rank first, until no pair has a rank;
5. look up the ids of the merged symbols.

Vocabulary (49,408 ids): 256 byte symbols, the same 256 with ``</w>``, 48,894 merges, then
``<|startoftext|>`` = 49406 and ``<|endoftext|>`` = 49407.  Padding uses id 0, as ``clip.tokenize``.
"""

from __future__ import annotations

import functools
import gzip
import html
import re
import unicodedata
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from ..errors import TokenizerError
from ..paths import weights_file
from . import _clip_unicode_new, _unicode
from ._batch import pad_truncate
from .textfix import fix_text as _default_fix_text

START_TOKEN = "<|startoftext|>"
END_TOKEN = "<|endoftext|>"
N_MERGES = 49152 - 256 - 2  # merges CLIP uses: the file holds more; the vocabulary is cut at 49,408
CONTEXT_LENGTH = 77


def bytes_to_symbols() -> list[str]:
    """The stand-in character of every byte value 0..255.

    Printable Latin-1 bytes (``!``..``~``, ``¡``..``¬``, ``®``..``ÿ``) stand for themselves; the
    remaining 68 bytes (controls, space, soft hyphen, ...) get U+0100, U+0101, ... in byte order, so
    that no BPE symbol is white space or a control character.
    """
    printable = set(range(0x21, 0x7F)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    table = [""] * 256
    k = 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(0x100 + k)
            k += 1
    return table


def _vocab_order(symbols: list[str]) -> list[str]:
    """The 256 byte symbols in vocabulary order: the printable bytes first, then the stand-ins."""
    printable = [s for b, s in enumerate(symbols) if ord(s) == b]
    standins = [s for b, s in enumerate(symbols) if ord(s) != b]
    return printable + standins


@functools.lru_cache(maxsize=None)
def _pretoken_re() -> re.Pattern:
    """The CLIP pattern with explicit code-point classes (slow on non-ASCII text: long range lists)."""
    letters = _unicode.regex_class_body(
        sorted(_unicode.code_point_ranges({"Lu", "Ll", "Lt", "Lm", "Lo"}) + _clip_unicode_new.LETTERS_ADD))
    numbers = _unicode.regex_class_body(
        sorted(_unicode.code_point_ranges({"Nd", "Nl", "No"}) + _clip_unicode_new.NUMBERS_ADD))
    space = _unicode.white_space_class_body()
    return re.compile(
        r"<\|[s\u017f]tartoftext\|>|<\|endoftext\|>|'[s\u017f]|'t|'re|'ve|'m|'ll|'d"
        # U+0345 COMBINING GREEK YPOGEGRAMMENI (Mn) case-folds to a letter (ι), so the reference's
        # case-insensitive "not letter" class rejects it as well and it matches no alternative: dropped.
        f"|[{letters}]+|[{numbers}]|[^{space}{letters}{numbers}\\u0345]+"
    )


# The same pattern over ASCII stand-ins: every character is first mapped to one whose class is the same
# (see _ProxyTable), so the C regex engine only ever tests ASCII classes.  Spans carry over unchanged.
_PROXY_RE = re.compile(
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[a-zA-Z]+|[0-9]|[^\t\n\x0b\x0c\r a-zA-Z0-9\x00]+"
)


def _in(cp: int, ranges: list[tuple[int, int]]) -> bool:
    return any(lo <= cp <= hi for lo, hi in ranges)


class _ProxyTable(dict):
    """``str.translate`` table: character → ASCII stand-in of the same pre-tokeniser class (lazy).

    ASCII stands for itself (U+0000 excepted); U+017F long s → ``s`` (it matches the ``'s`` and
    ``<|startoftext|>`` literals case-insensitively); other letters → ``q`` (in no literal, so no false
    special token or contraction); numbers → ``0``; White_Space → space; U+0345 → U+0000, which no
    alternative matches; anything else → ``!``.
    """

    def __missing__(self, cp: int) -> str:
        if cp < 0x80:
            out = "!" if cp == 0 else chr(cp)
        elif cp == 0x17F:
            out = "s"
        elif cp == 0x345:
            out = "\x00"
        elif cp in _unicode.WHITE_SPACE:
            out = " "
        else:
            cat = unicodedata.category(chr(cp))
            if cat == "Cn":  # unassigned here, maybe a letter/number in the reference's newer tables
                cat = "L" if _in(cp, _clip_unicode_new.LETTERS_ADD) else "N" if _in(cp, _clip_unicode_new.NUMBERS_ADD) else cat
            out = "q" if cat[0] == "L" else "0" if cat[0] == "N" else "!"
        self[cp] = out
        return out


_PROXY = _ProxyTable()


@functools.lru_cache(maxsize=None)
def _white_space_re() -> re.Pattern:
    return re.compile(f"[{_unicode.white_space_class_body()}]+")


def clean_text(text: str, fix_text: Callable[[str], str] = _default_fix_text) -> str:
    """Stages 1-2 of the module docstring: the normalised, lower-cased text that gets pre-tokenised."""
    text = html.unescape(html.unescape(fix_text(text))).strip()
    text = _white_space_re().sub(" ", text).strip()
    return text.lower()


def pretokenize(cleaned: str) -> list[str]:
    """Stage 3: split cleaned text into the pieces BPE runs on independently.

    Equals ``_pretoken_re().findall(cleaned)``; runs the pattern on ASCII stand-ins (``_ProxyTable``).
    """
    if cleaned.isascii() and "\x00" not in cleaned:
        return _PROXY_RE.findall(cleaned)  # ASCII stands for itself
    proxy = cleaned.translate(_PROXY)
    return [cleaned[m.start() : m.end()] for m in _PROXY_RE.finditer(proxy)]


def bpe_merge(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Stage 4: merge adjacent symbols, always the pair with the lowest merge rank first.

    All non-overlapping occurrences of the chosen pair are merged left to right in one pass, then the
    next lowest-ranked pair is chosen, until no adjacent pair is in ``ranks``.
    """
    while len(symbols) > 1:
        best = None
        best_rank = N_MERGES + 1
        for pair in zip(symbols, symbols[1:]):
            r = ranks.get(pair)
            if r is not None and r < best_rank:
                best, best_rank = pair, r
        if best is None:
            break
        first, second = best
        merged = first + second
        out = []
        i = 0
        n = len(symbols)
        while i < n:
            if i < n - 1 and symbols[i] == first and symbols[i + 1] == second:
                out.append(merged)
                i += 2
            else:
                out.append(symbols[i])
                i += 1
        symbols = out
    return symbols


def load_merges(path: str | Path) -> list[tuple[str, str]]:
    """The first :data:`N_MERGES` merge rules of a CLIP ``bpe_simple_vocab_16e6.txt.gz`` file.

    Raises
    ------
    TokenizerError
        The file is unreadable, not gzip/UTF-8, or has fewer than N_MERGES well-formed rules.
    """
    try:
        with gzip.open(path, "rb") as f:
            lines = f.read().decode("utf-8").split("\n")
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise TokenizerError(f"cannot read CLIP merges file {path}: {exc}") from exc
    rules = lines[1 : N_MERGES + 1]  # line 0 is the "#version" header
    if len(rules) < N_MERGES:
        raise TokenizerError(f"CLIP merges file {path}: expected at least {N_MERGES} merge rules, found {len(rules)}")
    merges = []
    for i, line in enumerate(rules, start=2):
        parts = line.split()
        if len(parts) != 2:
            raise TokenizerError(f"CLIP merges file {path}, line {i}: expected two symbols, found {line!r}")
        merges.append((parts[0], parts[1]))
    return merges


class ClipBPE:
    """OpenAI CLIP's BPE tokenizer (context 77), ids identical to ``clip/simple_tokenizer.py``.

    Parameters
    ----------
    merges_path : str or Path, optional
        A ``bpe_simple_vocab_16e6.txt.gz`` file; default the shipped ``weights/clip`` copy.
    fix_text : callable, optional
        The ftfy-style clean-up; default :func:`reco_ref.tokenizers.textfix.fix_text` (stdlib, no
        mojibake repair).  Pass ``ftfy.fix_text`` to reproduce the reference on mojibake too.
    cache_size : int
        Maximum number of pre-tokens whose BPE result is memoised (the cache is emptied when full).

    Attributes
    ----------
    vocab_size : int
        49408.
    start_id, end_id, pad_id : int
        49406, 49407, 0.
    context_length : int
        77, CLIP's text context.
    """

    def __init__(
        self, merges_path: str | Path | None = None, *, fix_text: Callable[[str], str] | None = None,
        cache_size: int = 100_000,
    ) -> None:
        path = Path(merges_path) if merges_path is not None else weights_file("clip", "bpe_simple_vocab_16e6.txt.gz")
        merges = load_merges(path)
        symbols = bytes_to_symbols()
        base = _vocab_order(symbols)
        vocab = base + [s + "</w>" for s in base] + [a + b for a, b in merges] + [START_TOKEN, END_TOKEN]
        self.encoder: dict[str, int] = {s: i for i, s in enumerate(vocab)}
        if len(self.encoder) != len(vocab):
            raise TokenizerError(f"CLIP merges file {path}: merge rules produce duplicate vocabulary entries")
        self.decoder: dict[int, str] = {i: s for s, i in self.encoder.items()}
        self.ranks: dict[tuple[str, str], int] = {pair: i for i, pair in enumerate(merges)}
        self.byte_symbols = symbols
        self.symbol_bytes = {s: b for b, s in enumerate(symbols)}
        self.fix_text = fix_text if fix_text is not None else _default_fix_text
        self.vocab_size = len(vocab)
        self.start_id = self.encoder[START_TOKEN]
        self.end_id = self.encoder[END_TOKEN]
        self.pad_id = 0
        self.context_length = CONTEXT_LENGTH
        self.path = path
        self._cache: dict[str, list[int]] = {START_TOKEN: [self.start_id], END_TOKEN: [self.end_id]}
        self._cache_size = cache_size

    def _piece_ids(self, piece: str) -> list[int]:
        """Ids of one pre-token (stages 4-5), memoised."""
        ids = self._cache.get(piece)
        if ids is not None:
            return ids
        sym = self.byte_symbols
        symbols = [sym[b] for b in piece.encode("utf-8")]
        symbols[-1] += "</w>"
        enc = self.encoder
        ids = [enc[s] for s in bpe_merge(symbols, self.ranks)]
        if len(self._cache) >= self._cache_size:
            self._cache.clear()
            self._cache.update({START_TOKEN: [self.start_id], END_TOKEN: [self.end_id]})
        self._cache[piece] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``: ``[start_id, ..., end_id]``, untruncated.

        Equals ``[sot] + SimpleTokenizer().encode(text) + [eot]`` of the reference (module docstring).
        """
        if not isinstance(text, str):
            raise TokenizerError(f"ClipBPE.encode expects a str, got {type(text).__name__}")
        ids = [self.start_id]
        cache = self._cache
        for piece in pretokenize(clean_text(text, self.fix_text)):
            piece_ids = cache.get(piece)
            ids.extend(piece_ids if piece_ids is not None else self._piece_ids(piece))
        ids.append(self.end_id)
        return ids

    def encode_batch(
        self, texts: Sequence[str], context_length: int | None = None, *, truncate: bool = True
    ) -> tuple[np.ndarray, np.ndarray]:
        """Encode, truncate and pad a batch, as ``clip.tokenize(texts, context_length, truncate=True)``.

        Parameters
        ----------
        texts : sequence of str, length N
        context_length : int, optional
            ``L``; default 77.
        truncate : bool
            ``False`` raises :class:`TokenizerError` for a text longer than ``L`` tokens.

        Returns
        -------
        ids : int64 [N, L]
            A cut sequence ends in ``end_id`` at position ``L - 1``; padding is 0.
        attention_mask : int64 [N, L]
            1 on the ``[start .. end]`` tokens, 0 on padding.
        """
        if isinstance(texts, str):
            raise TokenizerError("encode_batch expects a sequence of str, got a single str (wrap it in a list)")
        L = self.context_length if context_length is None else context_length
        seqs = [self.encode(t) for t in texts]
        return pad_truncate(seqs, L, pad_id=self.pad_id, end_id=self.end_id, truncate=truncate, texts=texts)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` (start/end/padding ids included verbatim as their token strings); for debugging."""
        try:
            symbols = "".join(self.decoder[int(i)] for i in ids)
        except KeyError as exc:
            raise TokenizerError(f"id {exc.args[0]} is outside the CLIP vocabulary (0..{self.vocab_size - 1})") from None
        out = bytearray()
        for part in re.split(r"(<\|startoftext\|>|<\|endoftext\|>)", symbols.replace("</w>", " ")):
            if part in (START_TOKEN, END_TOKEN):
                out += part.encode("utf-8")
            else:
                out += bytes(self.symbol_bytes[c] if c in self.symbol_bytes else ord(" ") for c in part)
        return out.decode("utf-8", errors="replace")
