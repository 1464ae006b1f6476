"""encode_images decodes ahead while the graph runs (EncoderPair.iter_preprocessed): order, errors, bounds, overlap."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from PIL import Image

from reco_ref.encoders import load
from reco_ref.errors import ImageDecodeError

from enc_graphs import FakeTokenizer, write_pair


def _images(rng, n):
    return [Image.fromarray(rng.integers(0, 256, (16 + i % 7, 20 + i % 5, 3), dtype=np.uint8)) for i in range(n)]


def _slow_first(enc, monkeypatch, n):
    """Make early items decode slowly and late ones fast, so completion order is the reverse of input order."""
    orig = enc._prepare_one
    index = {}

    def prepare(item):
        time.sleep(0.002 * (n - index.get(id(item), n)) / n)
        return orig(item)

    monkeypatch.setattr(enc, "_prepare_one", prepare)
    return index


def test_order_across_prefetched_batches(tmp_path, rng, monkeypatch):
    write_pair(tmp_path, rng, key_dim=3)
    ims = _images(rng, 23)
    ref_emb, ref_keys = load(tmp_path, tokenizer=FakeTokenizer(), threads=1).encode_images(ims, batch_size=4, with_keys=True)
    enc = load(tmp_path, tokenizer=FakeTokenizer(), threads=3)
    index = _slow_first(enc, monkeypatch, len(ims))
    index.update({id(im): i for i, im in enumerate(ims)})
    emb, keys = enc.encode_images(ims, batch_size=4, with_keys=True)
    np.testing.assert_array_equal(emb, ref_emb)
    np.testing.assert_array_equal(keys, ref_keys)
    starts = [s for s, *_ in enc.iter_preprocessed(ims, batch_size=4)]
    assert starts == list(range(0, 23, 4))


@pytest.mark.parametrize("parallel, batch", [("overlap", 3), ("batches", 2), ("auto", 3)])
def test_errors_keep_input_order(tmp_path, rng, monkeypatch, parallel, batch):
    """Either pipeline: skip reports every failure with its index; raise names the first bad item in input order,
    although later items (decoded faster here) fail sooner."""
    write_pair(tmp_path, rng)
    ims = _images(rng, 12)
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff garbage")
    items = list(ims)
    bad_at = [1, 6, 7, 11]
    for i in bad_at:
        items[i] = tmp_path / "bad.jpg" if i != 7 else tmp_path / "missing.png"
    enc = load(tmp_path, tokenizer=FakeTokenizer(), threads=3)
    index = _slow_first(enc, monkeypatch, len(items))
    index.update({id(it): i for i, it in enumerate(items)})
    emb, ok, errors = enc.encode_images(items, batch_size=batch, on_error="skip", parallel=parallel)
    assert ok.tolist() == [i for i in range(12) if i not in bad_at]
    assert [e.index for e in errors] == bad_at and "missing.png" in errors[2].message
    ref = load(tmp_path, tokenizer=FakeTokenizer(), threads=1).encode_images([items[i] for i in ok], batch_size=batch)
    np.testing.assert_array_equal(emb, ref)
    with pytest.raises(ImageDecodeError, match="bad.jpg"):  # item 1
        enc.encode_images(items, batch_size=batch, parallel=parallel)
    items[1] = ims[1]
    with pytest.raises(ImageDecodeError, match="bad.jpg"):  # item 6, a later batch
        enc.encode_images(items, batch_size=batch, parallel=parallel)
    only_bad = [tmp_path / "bad.jpg"] * 6
    res = enc.encode_images(only_bad, batch_size=batch, on_error="skip", parallel=parallel)
    assert res.embeddings.shape == (0, enc.dim) and len(res.errors) == 6


def test_decoding_overlaps_the_graph_and_stays_bounded(tmp_path, rng, monkeypatch):
    write_pair(tmp_path, rng)
    ims = _images(rng, 40)
    enc = load(tmp_path, tokenizer=FakeTokenizer(), threads=2)
    lock = threading.Lock()
    state = {"prepared": 0, "collected": 0, "max_ahead": 0, "at_graph_end": []}
    orig_prepare, orig_graph, orig_collect = enc._prepare_one, enc.run_image_graph, enc._collect

    def prepare(item):
        with lock:
            state["prepared"] += 1
            state["max_ahead"] = max(state["max_ahead"], state["prepared"] - state["collected"])
        return orig_prepare(item)

    def graph(pixels):
        time.sleep(0.1)  # a slow graph: the decode threads must use this time
        state["at_graph_end"].append(state["prepared"])
        return orig_graph(pixels)

    def collect(items, futures, on_error, start, out=None):
        res = orig_collect(items, futures, on_error, start, out)
        with lock:
            state["collected"] += len(items)
        return res

    monkeypatch.setattr(enc, "_prepare_one", prepare)
    monkeypatch.setattr(enc, "run_image_graph", graph)
    monkeypatch.setattr(enc, "_collect", collect)
    enc.encode_images(ims, batch_size=4, parallel="overlap")
    assert state["prepared"] == 40
    # while the graph ran on batch b, the next two batches were decoded (serial code would show 4, 8, ...)
    assert state["at_graph_end"] == [min(40, 4 * (b + 3)) for b in range(10)], state
    assert state["max_ahead"] <= 2 * 4, state  # prefetch = 2 batches of 4 decoded ahead of the one in the graph

    # a bad first item stops the run without decoding the whole list
    state.update(prepared=0, collected=0)
    bad = [tmp_path / "missing.png"] + ims
    with pytest.raises(ImageDecodeError, match="missing.png"):
        enc.encode_images(bad, batch_size=4, parallel="overlap")
    time.sleep(0.1)
    assert state["prepared"] <= 3 * 4 + 2, state  # queued work behind the error was cancelled


@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
def test_prefetched_pixels_bit_identical_to_normalize_batch(tmp_path, rng, layout):
    """The decode threads (normalising into the batch buffer) and preprocess() give the float32 bits of the
    stated arithmetic (preprocess_image: divide, subtract, divide), one thread or two."""
    from reco_ref.encoders.images import decode_image
    from reco_ref.encoders.preprocess import preprocess_image, stack_layout

    write_pair(tmp_path, rng, layout=layout)
    enc = load(tmp_path, tokenizer=FakeTokenizer(), threads=2)
    ims = _images(rng, 9)
    (got,) = [px for _, px, _, _ in enc.iter_preprocessed(ims, batch_size=9)]
    ref, _, _ = enc.preprocess(ims)
    single = load(tmp_path, tokenizer=FakeTokenizer(), threads=1).preprocess(ims)[0]
    assert got.dtype == np.float32 and got.flags.c_contiguous
    np.testing.assert_array_equal(got, single)
    np.testing.assert_array_equal(ref, single)
    stated = stack_layout([preprocess_image(decode_image(im), enc.config.image) for im in ims], layout)
    np.testing.assert_array_equal(got, stated)


# ------------------------------------------------------------------------------ batch workers (parallel="batches")
@pytest.mark.parametrize("n, batch, threads", [(23, 4, 2), (24, 4, 3), (9, 4, 2), (40, 3, 4)])
def test_batch_workers_same_bits_as_overlap_and_one_thread(tmp_path, rng, n, batch, threads):
    """Workers on a single-threaded session, the tail on the multi-threaded one: the bits of threads=1."""
    write_pair(tmp_path, rng, key_dim=3)
    ims = _images(rng, n)
    ref_emb, ref_keys = load(tmp_path, tokenizer=FakeTokenizer(), threads=1).encode_images(ims, batch_size=batch,
                                                                                          with_keys=True)
    enc = load(tmp_path, tokenizer=FakeTokenizer(), threads=threads)
    for parallel in ("batches", "overlap", "auto"):
        emb, keys = enc.encode_images(ims, batch_size=batch, with_keys=True, parallel=parallel)
        np.testing.assert_array_equal(emb, ref_emb)
        np.testing.assert_array_equal(keys, ref_keys)
    starts = [s for s, *_ in enc.iter_encoded_batches(ims, batch_size=batch)]
    assert starts == list(range(0, n, batch))


def test_batch_workers_run_in_parallel_bounded_and_split_sessions(tmp_path, rng, monkeypatch):
    """Two workers really run batches at the same time (a 2-party barrier would time out if they ran one by
    one), at most workers + 1 batches are queued or running, and only the tail uses the multi-threaded session."""
    write_pair(tmp_path, rng)
    ims = _images(rng, 20)
    enc = load(tmp_path, tokenizer=FakeTokenizer(), threads=2)
    barrier = threading.Barrier(2, timeout=10)
    lock = threading.Lock()
    state = {"submitted": 0, "yielded": 0, "max_ahead": 0, "sessions": {}}
    orig_batch, orig_submit = enc._encode_batch, None

    def encode_batch(chunk, start, on_error, session):
        if start < 16:  # the first 4 batches of 4 (2 rounds of 2 workers); the 5th is the tail, alone
            barrier.wait()
        state["sessions"][start] = session
        return orig_batch(chunk, start, on_error, session)

    monkeypatch.setattr(enc, "_encode_batch", encode_batch)
    pool = enc._decode_pool()
    orig_submit = pool.submit

    def submit(fn, *a, **kw):
        with lock:
            state["submitted"] += 1
            state["max_ahead"] = max(state["max_ahead"], state["submitted"] - state["yielded"])
        return orig_submit(fn, *a, **kw)

    monkeypatch.setattr(pool, "submit", submit)
    for res in enc.iter_encoded_batches(ims, batch_size=4):
        with lock:
            state["yielded"] += 1
    assert state["max_ahead"] <= 4, state  # workers + 1 queued or running, + the finished one being handed out
    single = enc._single_thread_image_session()
    assert [state["sessions"][s] is single for s in range(0, 20, 4)] == [True, True, True, True, False]
    assert state["sessions"][16] is enc._image


def test_image_mode_choice(tmp_path, rng):
    write_pair(tmp_path, rng)
    enc = load(tmp_path, tokenizer=FakeTokenizer(), threads=2)
    assert enc._image_mode(256, 64, "auto") == "batches"  # 4 batches for 2 workers
    assert enc._image_mode(192, 64, "auto") == "overlap"  # 3 batches: one worker would idle a third of the run
    assert enc._image_mode(192, 64, "batches") == "batches"
    assert enc._image_mode(64, 64, "batches") == "overlap"  # one batch: nothing to share out
    assert load(tmp_path, tokenizer=FakeTokenizer(), threads=1)._image_mode(10**4, 64, "batches") == "overlap"
    with pytest.raises(ValueError, match="parallel: expected 'auto', 'batches' or 'overlap', got 'fast'"):
        enc.encode_images(_images(rng, 2), parallel="fast")
