"""Pure Python text tokenizers for the text towers (no Rust, no ``regex``/``ftfy`` at run time).

* :class:`ClipBPE` -- OpenAI CLIP's byte-level BPE (shipped merges ``weights/clip``), context 77.
* :class:`WordPiece` -- BERT WordPiece from a Hugging Face ``tokenizer.json`` (MiniLM's ships in
  ``weights/reco-mini/tokenizer.json``).

Both have ``encode(text) -> list[int]`` (start/end tokens included, untruncated) and
``encode_batch(texts, context_length) -> (ids int64 [N, L], attention_mask int64 [N, L])``, plus
``pad_id``, ``vocab_size``, ``start_id`` / ``end_id``.  Ids equal the reference implementations'
(tests/tokenizers).
"""

from .clip_bpe import ClipBPE
from .textfix import fix_text
from .wordpiece import WordPiece

__all__ = ["ClipBPE", "WordPiece", "fix_text", "load_tokenizer"]


def load_tokenizer(kind: str, file=None):
    """A tokenizer from an encoder config's ``{"kind": ..., "file": ...}``.

    Parameters
    ----------
    kind : {"clip_bpe", "wordpiece"}
    file : str or Path, optional
        ``clip_bpe``: a merges ``.txt.gz`` (default: the shipped one); ``wordpiece``: a ``tokenizer.json`` (required).
    """
    from ..errors import TokenizerError

    if kind == "clip_bpe":
        return ClipBPE(file)
    if kind == "wordpiece":
        if file is None:
            raise TokenizerError("tokenizer kind 'wordpiece' needs a tokenizer.json file, got file=None")
        return WordPiece.from_tokenizer_json(file)
    raise TokenizerError(f"unknown tokenizer kind {kind!r}: expected 'clip_bpe' or 'wordpiece'")
