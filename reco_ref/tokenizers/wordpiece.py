"""BERT WordPiece tokenizer (Hugging Face ``tokenizer.json`` format), pure Python.

Same ids as Hugging Face ``tokenizers`` for a ``tokenizer.json`` built from

* ``normalizer``: ``BertNormalizer`` (any of its four switches),
* ``pre_tokenizer``: ``BertPreTokenizer``,
* ``model``: ``WordPiece``,
* ``post_processor``: ``TemplateProcessing`` of the form ``$CLS $A $SEP`` or ``BertProcessing``,
* ``added_tokens`` matched on the raw text (``normalized: false``, no ``lstrip``/``rstrip``/``single_word``).

Anything else is refused with :class:`TokenizerError` rather than tokenised differently.

Pipeline for one text:

1. split out added tokens (``[CLS]``, ``[MASK]``, ... written literally in the text), longest match
   first at the leftmost position; they map straight to their ids;
2. every other stretch of text is normalised (``BertNormalizer``):

   a. clean: drop U+0000, U+FFFD and "other" characters (general category Cc, Cf, Co, Cs -- not Cn)
      except tab/LF/CR; turn every White_Space character (tab/LF/CR included) into a space;
   b. put spaces around CJK ideographs (the CJK Unified Ideographs blocks and extensions A-F,
      compatibility ideographs), so each is a word of its own;
   c. strip accents (NFD, then drop non-spacing marks, category Mn) -- on by default when lower-casing;
   d. lower-case character by character (no final-sigma rule, as Rust's ``char::to_lowercase``);

3. pre-tokenise (``BertPreTokenizer``): split on White_Space, then make every punctuation character
   (ASCII punctuation ``!"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~`` or Unicode category P*) a word of its own;
4. WordPiece each word: a word longer than ``max_input_chars_per_word`` characters is ``[UNK]``;
   otherwise take the longest vocabulary prefix, then the longest ``##``-prefixed continuation, and
   so on; a word with an unmatchable remainder becomes a single ``[UNK]``;
5. wrap in ``[CLS] ... [SEP]``.

Character classes (other, Mn, punctuation) follow the reference's Unicode 8.0 tables: Python's
``unicodedata`` plus the short list of code points assigned or re-categorised since 8.0
(:mod:`reco_ref.tokenizers._bert_unicode8`); agreement is tested on every code point.
"""

from __future__ import annotations

import functools
import json
import re
import unicodedata
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import TokenizerError
from . import _bert_unicode8, _unicode
from ._batch import pad_truncate

# CJK ideograph blocks BERT isolates (HF tokenizers' `is_chinese_char`, BERT's `_is_chinese_char`).
CJK_RANGES = (
    (0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
    (0x2B740, 0x2B81F), (0x2B920, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F),
)
# "Other" as the reference tests it: Cc, Cf, Co, Cs -- not Cn (unassigned code points are kept and become [UNK]).
_OTHER = frozenset({"Cc", "Cf", "Co", "Cs"})
_ASCII_PUNCT = frozenset(chr(c) for c in range(0x21, 0x7F) if not chr(c).isalnum())


def _expand(ranges) -> frozenset[int]:
    return frozenset(cp for lo, hi in ranges for cp in range(lo, hi + 1))


# The reference classifies with Unicode 8.0 tables; the code points where they disagree with this
# Python's unicodedata (characters assigned or re-categorised since 8.0) are listed in _bert_unicode8.
_OTHER_ADD, _OTHER_DROP = _expand(_bert_unicode8.OTHER_ADD), _expand(_bert_unicode8.OTHER_DROP)
_MN_ADD, _MN_DROP = _expand(_bert_unicode8.MN_ADD), _expand(_bert_unicode8.MN_DROP)


def is_other(cp: int) -> bool:
    """Removed by ``clean_text``: general category Cc/Cf/Co/Cs in Unicode 8.0 (tab, LF, CR excepted)."""
    if cp in (0x09, 0x0A, 0x0D):
        return False
    if cp in _OTHER_ADD:
        return True
    return cp not in _OTHER_DROP and unicodedata.category(chr(cp)) in _OTHER


def is_nonspacing_mark(cp: int) -> bool:
    """Removed by accent stripping: general category Mn in Unicode 8.0."""
    if cp in _MN_ADD:
        return True
    return cp not in _MN_DROP and unicodedata.category(chr(cp)) == "Mn"


def punctuation_ranges() -> list[tuple[int, int]]:
    """Code points ``BertPreTokenizer`` isolates: ASCII punctuation or category P* in Unicode 8.0."""
    cps = {cp for lo, hi in _unicode.code_point_ranges({"Pc", "Pd", "Ps", "Pe", "Pi", "Pf", "Po"}) for cp in range(lo, hi + 1)}
    cps |= {ord(c) for c in _ASCII_PUNCT} | _expand(_bert_unicode8.PUNCT_ADD)
    cps -= _expand(_bert_unicode8.PUNCT_DROP)
    out: list[list[int]] = []
    for cp in sorted(cps):
        if out and out[-1][1] == cp - 1:
            out[-1][1] = cp
        else:
            out.append([cp, cp])
    return [(lo, hi) for lo, hi in out]


class _CleanTable(dict):
    """``str.translate`` table for steps 2a-2b, filled lazily one character at a time."""

    def __init__(self, clean: bool, chinese: bool) -> None:
        super().__init__()
        self.clean, self.chinese = clean, chinese

    def __missing__(self, cp: int):
        out: str | None = chr(cp)
        if self.clean:
            if cp in (0x09, 0x0A, 0x0D):
                out = " "
            elif cp == 0 or cp == 0xFFFD or is_other(cp):
                out = None
            elif cp in _unicode.WHITE_SPACE:
                out = " "
        if out is not None and self.chinese and any(lo <= cp <= hi for lo, hi in CJK_RANGES):
            out = f" {out} "
        self[cp] = out
        return out


class _DropMn(dict):
    """``str.translate`` table deleting non-spacing marks (category Mn), filled lazily."""

    def __missing__(self, cp: int):
        out = None if is_nonspacing_mark(cp) else chr(cp)
        self[cp] = out
        return out


@functools.lru_cache(maxsize=None)
def _word_re() -> re.Pattern:
    """Step 3: a punctuation character alone, or a run of neither punctuation nor White_Space."""
    punct = _unicode.regex_class_body(punctuation_ranges())
    space = _unicode.white_space_class_body()
    return re.compile(f"[{punct}]|[^{punct}{space}]+")


def _lower_per_char(text: str) -> str:
    # str.lower applies the context-dependent Final_Sigma rule (Σ → ς at a word end); Rust's
    # char::to_lowercase, used by the reference, maps every Σ to σ.  Σ is the only such case.
    if "\u03a3" in text:
        return "".join(c.lower() for c in text)
    return text.lower()


def _expect(cond: bool, path: Path, field: str, expected: str, found) -> None:
    if not cond:
        raise TokenizerError(f"{path}: field {field!r}: expected {expected}, found {found!r} (not supported)")


class WordPiece:
    """BERT WordPiece tokenizer with ids identical to HF ``tokenizers`` (module docstring).

    Build it with :meth:`from_tokenizer_json`.

    Attributes
    ----------
    vocab : dict[str, int]
    vocab_size : int
        Number of ids (30522 for MiniLM's uncased vocabulary).
    cls_id, sep_id : int
        Ids wrapped around every encoding; ``start_id`` / ``end_id`` are aliases.
    pad_id, unk_id : int
    model_max_length : int or None
        The ``truncation.max_length`` of the json (the model's trained context), default for
        :meth:`encode_batch`.
    """

    def __init__(
        self, vocab: dict[str, int], *, unk_token: str = "[UNK]", continuing_prefix: str = "##",
        max_input_chars_per_word: int = 100, cls_id: int, sep_id: int, pad_id: int,
        added_tokens: dict[str, int] | None = None, clean_text: bool = True, handle_chinese_chars: bool = True,
        strip_accents: bool = True, lowercase: bool = True, model_max_length: int | None = None,
    ) -> None:
        if unk_token not in vocab:
            raise TokenizerError(f"WordPiece: unk_token {unk_token!r} is not in the vocabulary")
        self.vocab = vocab
        self.unk_token = unk_token
        self.unk_id = vocab[unk_token]
        self.prefix = continuing_prefix
        self.max_input_chars_per_word = max_input_chars_per_word
        self.cls_id, self.sep_id, self.pad_id = cls_id, sep_id, pad_id
        self.start_id, self.end_id = cls_id, sep_id
        self.vocab_size = max(max(vocab.values()), *(added_tokens or {0: 0}).values()) + 1
        self.added_tokens = dict(added_tokens or {})
        self.model_max_length = model_max_length
        self.lowercase, self.strip_accents = lowercase, strip_accents
        self._clean_table = _CleanTable(clean_text, handle_chinese_chars)
        self._drop_mn = _DropMn()
        self._needs_table = clean_text or handle_chinese_chars
        # The longest vocabulary entry bounds the prefixes worth looking up.
        self._max_piece = max(len(t) for t in vocab)
        self._cache: dict[str, list[int]] = {}
        if self.added_tokens:
            alternatives = sorted(self.added_tokens, key=len, reverse=True)  # leftmost, then longest
            self._added_re = re.compile("|".join(re.escape(t) for t in alternatives))
            self._added_first = frozenset(t[0] for t in alternatives)  # cheap test before the regex
        else:
            self._added_re = None

    # ---------------------------------------------------------------- loading
    @classmethod
    def from_tokenizer_json(cls, path: str | Path) -> WordPiece:
        """Load a Hugging Face ``tokenizer.json``; refuse settings this implementation does not reproduce.

        Raises
        ------
        TokenizerError
            Unreadable/invalid JSON, or a normalizer / pre-tokenizer / model / post-processor /
            added token this class does not implement (the message names the field).
        """
        path = Path(path)
        try:
            spec = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise TokenizerError(f"cannot read tokenizer file {path}: {exc}") from exc
        _expect(isinstance(spec, dict), path, "<root>", "a JSON object", type(spec).__name__)

        model = spec.get("model") or {}
        _expect(model.get("type") == "WordPiece", path, "model.type", "'WordPiece'", model.get("type"))
        vocab = model.get("vocab")
        _expect(isinstance(vocab, dict) and len(vocab) > 0, path, "model.vocab", "a non-empty object", type(vocab).__name__)
        _expect(all(isinstance(v, int) for v in vocab.values()), path, "model.vocab", "integer ids", "non-integer")
        _expect(len(set(vocab.values())) == len(vocab), path, "model.vocab", "distinct ids", "duplicate ids")
        max_chars = model.get("max_input_chars_per_word", 100)
        _expect(isinstance(max_chars, int) and max_chars > 0, path, "model.max_input_chars_per_word", "a positive int", max_chars)
        prefix = model.get("continuing_subword_prefix", "##")
        _expect(isinstance(prefix, str), path, "model.continuing_subword_prefix", "a string", prefix)

        norm = spec.get("normalizer")
        _expect(isinstance(norm, dict) and norm.get("type") == "BertNormalizer", path, "normalizer.type",
                "'BertNormalizer'", (norm or {}).get("type") if isinstance(norm, dict) else norm)
        flags = {}
        for key in ("clean_text", "handle_chinese_chars", "lowercase"):
            val = norm.get(key, True)
            _expect(isinstance(val, bool), path, f"normalizer.{key}", "true or false", val)
            flags[key] = val
        strip = norm.get("strip_accents", None)
        _expect(strip is None or isinstance(strip, bool), path, "normalizer.strip_accents", "null, true or false", strip)
        flags["strip_accents"] = flags["lowercase"] if strip is None else strip  # BERT: null follows lowercase

        pre = spec.get("pre_tokenizer")
        _expect(isinstance(pre, dict) and pre.get("type") == "BertPreTokenizer", path, "pre_tokenizer.type",
                "'BertPreTokenizer'", (pre or {}).get("type") if isinstance(pre, dict) else pre)

        added = {}
        for i, tok in enumerate(spec.get("added_tokens") or []):
            for key in ("single_word", "lstrip", "rstrip", "normalized"):
                _expect(not tok.get(key, False), path, f"added_tokens[{i}].{key}", "false", tok.get(key))
            _expect(isinstance(tok.get("content"), str) and tok["content"] != "", path,
                    f"added_tokens[{i}].content", "a non-empty string", tok.get("content"))
            _expect(isinstance(tok.get("id"), int), path, f"added_tokens[{i}].id", "an int", tok.get("id"))
            added[tok["content"]] = tok["id"]

        cls_id, sep_id = cls._post_processor_ids(spec.get("post_processor"), path)

        pad_id = None
        padding = spec.get("padding")
        if isinstance(padding, dict) and isinstance(padding.get("pad_id"), int):
            pad_id = padding["pad_id"]
        elif "[PAD]" in vocab:
            pad_id = vocab["[PAD]"]
        _expect(pad_id is not None, path, "padding.pad_id", "an int (or a '[PAD]' vocabulary entry)", None)
        trunc = spec.get("truncation")
        max_len = trunc.get("max_length") if isinstance(trunc, dict) else None

        unk = model.get("unk_token", "[UNK]")
        _expect(unk in vocab, path, "model.unk_token", "a vocabulary entry", unk)
        return cls(
            vocab, unk_token=unk, continuing_prefix=prefix, max_input_chars_per_word=max_chars,
            cls_id=cls_id, sep_id=sep_id, pad_id=pad_id, added_tokens=added, model_max_length=max_len, **flags,
        )

    @staticmethod
    def _post_processor_ids(post, path: Path) -> tuple[int, int]:
        """``(cls_id, sep_id)`` of a ``$CLS $A $SEP`` template or a ``BertProcessing`` post-processor."""
        _expect(isinstance(post, dict), path, "post_processor", "an object", post)
        kind = post.get("type")
        if kind == "BertProcessing":
            try:
                return int(post["cls"][1]), int(post["sep"][1])
            except (KeyError, IndexError, TypeError, ValueError):
                _expect(False, path, "post_processor", "BertProcessing with cls/sep [token, id] pairs", post)
        _expect(kind == "TemplateProcessing", path, "post_processor.type", "'TemplateProcessing' or 'BertProcessing'", kind)
        single = post.get("single")
        shape_ok = (
            isinstance(single, list) and len(single) == 3
            and "SpecialToken" in single[0] and "Sequence" in single[1] and "SpecialToken" in single[2]
            and single[1]["Sequence"].get("id") == "A"
        )
        _expect(shape_ok, path, "post_processor.single", "[SpecialToken, Sequence A, SpecialToken]", single)
        specials = post.get("special_tokens") or {}
        ids = []
        for item in (single[0], single[2]):
            name = item["SpecialToken"].get("id")
            entry = specials.get(name) or {}
            tok_ids = entry.get("ids")
            _expect(isinstance(tok_ids, list) and len(tok_ids) == 1 and isinstance(tok_ids[0], int), path,
                    f"post_processor.special_tokens[{name!r}].ids", "one int id", tok_ids)
            ids.append(tok_ids[0])
        return ids[0], ids[1]

    # ---------------------------------------------------------------- stages
    def normalize(self, text: str) -> str:
        """Step 2 of the module docstring, on one stretch of text without added tokens."""
        if self._needs_table and not (text.isascii() and text.isprintable()):
            # printable ASCII has no control, no white space but " ", no CJK: the table is the identity
            text = text.translate(self._clean_table)
        if self.strip_accents and not text.isascii():
            text = unicodedata.normalize("NFD", text).translate(self._drop_mn)
        if self.lowercase:
            text = _lower_per_char(text)
        return text

    def pretokenize(self, normalized: str) -> list[str]:
        """Step 3: words and single punctuation characters."""
        return _word_re().findall(normalized)

    def word_ids(self, word: str) -> list[int]:
        """Step 4: greedy longest-match-first WordPiece ids of one word (memoised)."""
        ids = self._cache.get(word)
        if ids is not None:
            return ids
        vocab = self.vocab
        n = len(word)
        if n > self.max_input_chars_per_word:
            ids = [self.unk_id]
        else:
            ids = []
            start = 0
            while start < n:
                end = min(n, start + self._max_piece)
                found = None
                while end > start:
                    piece = word[start:end] if start == 0 else self.prefix + word[start:end]
                    found = vocab.get(piece)
                    if found is not None:
                        break
                    end -= 1
                if found is None:
                    ids = [self.unk_id]
                    break
                ids.append(found)
                start = end
        if len(self._cache) >= 100_000:
            self._cache.clear()
        self._cache[word] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``: ``[cls_id, ..., sep_id]``, untruncated (HF ``encode`` without truncation)."""
        if not isinstance(text, str):
            raise TokenizerError(f"WordPiece.encode expects a str, got {type(text).__name__}")
        ids = [self.cls_id]
        if self._added_re is not None and any(c in text for c in self._added_first):
            pos = 0
            for m in self._added_re.finditer(text):
                self._encode_plain(text[pos : m.start()], ids)
                ids.append(self.added_tokens[m.group(0)])
                pos = m.end()
            self._encode_plain(text[pos:], ids)
        else:
            self._encode_plain(text, ids)
        ids.append(self.sep_id)
        return ids

    def _encode_plain(self, text: str, out: list[int]) -> None:
        if not text:
            return
        cache = self._cache
        for word in self.pretokenize(self.normalize(text)):
            ids = cache.get(word)
            out.extend(ids if ids is not None else self.word_ids(word))

    def encode_batch(
        self, texts: Sequence[str], context_length: int | None = None, *, truncate: bool = True
    ) -> tuple[np.ndarray, np.ndarray]:
        """Encode, truncate and pad a batch, as HF ``encode_batch`` with truncation + padding to ``L``.

        Parameters
        ----------
        texts : sequence of str, length N
        context_length : int, optional
            ``L``; default :attr:`model_max_length`.
        truncate : bool
            ``False`` raises :class:`TokenizerError` for a text longer than ``L`` tokens.

        Returns
        -------
        ids : int64 [N, L]
            A cut sequence keeps ``[CLS]`` + the first ``L - 2`` word pieces + ``[SEP]``; padding is ``pad_id``.
        attention_mask : int64 [N, L]
            1 on real tokens, 0 on padding.
        """
        if isinstance(texts, str):
            raise TokenizerError("encode_batch expects a sequence of str, got a single str (wrap it in a list)")
        L = self.model_max_length if context_length is None else context_length
        if L is None:
            raise TokenizerError("encode_batch: no context_length given and the tokenizer.json has no truncation.max_length")
        seqs = [self.encode(t) for t in texts]
        return pad_truncate(seqs, L, pad_id=self.pad_id, end_id=self.sep_id, truncate=truncate, texts=texts)

    def decode(self, ids: Sequence[int]) -> list[str]:
        """The token strings of ``ids`` (for debugging)."""
        inverse = {i: t for t, i in self.vocab.items()}
        inverse.update({i: t for t, i in self.added_tokens.items()})
        try:
            return [inverse[int(i)] for i in ids]
        except KeyError as exc:
            raise TokenizerError(f"id {exc.args[0]} is not in the vocabulary") from None
