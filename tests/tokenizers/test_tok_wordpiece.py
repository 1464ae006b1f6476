"""WordPiece against Hugging Face ``tokenizers`` on MiniLM's tokenizer.json (weights/reco-mini)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from reco_ref.errors import TokenizerError
from reco_ref.tokenizers import WordPiece, load_tokenizer
from tok_corpus import corpus, real_captions


@pytest.fixture(scope="module")
def wp(minilm_json):
    return WordPiece.from_tokenizer_json(minilm_json)


def _mismatches(tok, ref, texts):
    return [(t, a, b) for t, enc in zip(texts, ref.encode_batch(texts)) if (a := tok.encode(t)) != (b := enc.ids)]


def _show(bad, k=5):
    return "\n".join(f"  {t!r}\n    ours {a}\n    ref  {b}" for t, a, b in bad[:k])


def test_attributes(wp):
    assert (wp.vocab_size, wp.cls_id, wp.sep_id, wp.pad_id, wp.unk_id) == (30522, 101, 102, 0, 100)
    assert (wp.start_id, wp.end_id, wp.model_max_length) == (101, 102, 128)
    assert wp.encode("") == [101, 102]
    assert wp.encode("a photo of a cat.") == [101, 1037, 6302, 1997, 1037, 4937, 1012, 102]


def test_parity_on_varied_corpus(wp, hf_reference, parity_corpus):
    assert len(parity_corpus) >= 10_000
    bad = _mismatches(wp, hf_reference, parity_corpus)
    assert not bad, f"{len(bad)} of {len(parity_corpus)} differ:\n{_show(bad)}"


@pytest.mark.data
def test_parity_on_real_class_names(wp, hf_reference, shared_data):
    texts = real_captions(shared_data)
    assert len(texts) > 100
    bad = _mismatches(wp, hf_reference, texts)
    assert not bad, _show(bad)


def test_parity_every_bmp_code_point_inside_a_word(wp, hf_reference):
    """Character classes (other, white space, CJK, Mn, punctuation, lower-casing) on all of the BMP."""
    texts = ["a" + chr(cp) + "b" for cp in range(0x10000) if not 0xD800 <= cp <= 0xDFFF]
    bad = _mismatches(wp, hf_reference, texts)
    assert not bad, _show(bad)


@pytest.mark.slow
def test_parity_every_code_point(wp, hf_reference):
    texts = [t for cp in range(0x110000) if not 0xD800 <= cp <= 0xDFFF for t in (chr(cp), "a" + chr(cp) + "b")]
    bad = []
    for i in range(0, len(texts), 50_000):
        bad += _mismatches(wp, hf_reference, texts[i : i + 50_000])
    assert not bad, _show(bad)


@pytest.mark.slow
def test_parity_soak_100k(wp, hf_reference):
    texts = corpus(100_000, seed=7)
    bad = _mismatches(wp, hf_reference, texts)
    assert not bad, f"{len(bad)} of {len(texts)} differ:\n{_show(bad)}"


def test_long_words_and_added_tokens(wp, hf_reference):
    texts = ["x" * 100, "x" * 101, "ab" * 50 + "!", "[MASK] is [mask]", "a[CLS]b[SEP][PAD]", "[[MASK]]", "[MASK][MASK]"]
    assert wp.encode("x" * 101) == [101, 100, 102]
    assert not _mismatches(wp, hf_reference, texts)


@pytest.mark.parametrize("L", [128, 16, 2])
def test_encode_batch_matches_reference_truncation_and_padding(wp, hf_tokenizers, minilm_json, parity_corpus, L):
    ref = hf_tokenizers.Tokenizer.from_file(str(minilm_json))
    ref.enable_truncation(max_length=L)
    ref.enable_padding(length=L, pad_id=0, pad_token="[PAD]")
    texts = parity_corpus[:500]
    ids, mask = wp.encode_batch(texts, L)
    encs = ref.encode_batch(texts)
    assert ids.dtype == np.int64 and mask.dtype == np.int64 and ids.shape == (len(texts), L)
    np.testing.assert_array_equal(ids, np.array([e.ids for e in encs], dtype=np.int64))
    np.testing.assert_array_equal(mask, np.array([e.attention_mask for e in encs], dtype=np.int64))


def test_encode_batch_defaults_and_errors(wp):
    ids, mask = wp.encode_batch(["a cat", "word " * 300])
    assert ids.shape == (2, 128) and ids[1, 127] == wp.sep_id and mask[1].all() and mask[0].sum() == 4
    with pytest.raises(TokenizerError, match="context_length=128"):
        wp.encode_batch(["word " * 300], truncate=False)
    with pytest.raises(TokenizerError, match="single str"):
        wp.encode_batch("a cat")
    with pytest.raises(TokenizerError, match="expects a str"):
        wp.encode(None)


def _write(tmp_path, spec, name="tok.json"):
    path = tmp_path / name
    path.write_text(json.dumps(spec), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    "flags",
    [
        {"strip_accents": False},
        {"strip_accents": True, "lowercase": False},
        {"lowercase": False},
        {"handle_chinese_chars": False},
        {"clean_text": False},
    ],
)
def test_normalizer_switches_match_reference(hf_tokenizers, minilm_json, tmp_path, parity_corpus, flags):
    """Every BertNormalizer switch is honoured, as the reference honours it."""
    spec = json.loads(minilm_json.read_text(encoding="utf-8"))
    spec["normalizer"].update(flags)
    path = _write(tmp_path, spec)
    ref = hf_tokenizers.Tokenizer.from_file(str(path))
    ref.no_truncation()
    ref.no_padding()
    texts = parity_corpus[:1500]
    bad = _mismatches(WordPiece.from_tokenizer_json(path), ref, texts)
    assert not bad, _show(bad)


def test_bert_processing_post_processor(hf_tokenizers, minilm_json, tmp_path, parity_corpus):
    spec = json.loads(minilm_json.read_text(encoding="utf-8"))
    spec["post_processor"] = {"type": "BertProcessing", "sep": ["[SEP]", 102], "cls": ["[CLS]", 101]}
    path = _write(tmp_path, spec)
    ref = hf_tokenizers.Tokenizer.from_file(str(path))
    ref.no_truncation()
    ref.no_padding()
    assert not _mismatches(WordPiece.from_tokenizer_json(path), ref, parity_corpus[:300])


@pytest.mark.parametrize(
    "edit, field",
    [
        (lambda s: s["normalizer"].update(type="NFKC"), "normalizer.type"),
        (lambda s: s.update(normalizer=None), "normalizer.type"),
        (lambda s: s["normalizer"].update(lowercase="yes"), "normalizer.lowercase"),
        (lambda s: s.update(pre_tokenizer={"type": "Whitespace"}), "pre_tokenizer.type"),
        (lambda s: s["model"].update(type="BPE"), "model.type"),
        (lambda s: s["model"].update(max_input_chars_per_word=0), "model.max_input_chars_per_word"),
        (lambda s: s["model"].update(unk_token="<unk>"), "model.unk_token"),
        (lambda s: s["added_tokens"][0].update(normalized=True), "added_tokens[0].normalized"),
        (lambda s: s["added_tokens"][2].update(lstrip=True), "added_tokens[2].lstrip"),
        (lambda s: s.update(post_processor={"type": "RobertaProcessing"}), "post_processor.type"),
        (lambda s: s["post_processor"].update(single=[{"Sequence": {"id": "A", "type_id": 0}}]), "post_processor.single"),
    ],
)
def test_unsupported_settings_are_refused(minilm_json, tmp_path, edit, field):
    spec = json.loads(minilm_json.read_text(encoding="utf-8"))
    edit(spec)
    with pytest.raises(TokenizerError, match=field.replace("[", r"\[").replace("]", r"\]")):
        WordPiece.from_tokenizer_json(_write(tmp_path, spec))


def test_unreadable_files_are_refused(tmp_path):
    with pytest.raises(TokenizerError, match="cannot read"):
        WordPiece.from_tokenizer_json(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(TokenizerError, match="cannot read"):
        WordPiece.from_tokenizer_json(tmp_path / "bad.json")
    with pytest.raises(TokenizerError, match="unknown tokenizer kind"):
        load_tokenizer("sentencepiece")
    with pytest.raises(TokenizerError, match="needs a tokenizer.json"):
        load_tokenizer("wordpiece")


def test_load_tokenizer_kinds(minilm_json):
    assert load_tokenizer("clip_bpe").vocab_size == 49408
    assert load_tokenizer("wordpiece", minilm_json).vocab_size == 30522
