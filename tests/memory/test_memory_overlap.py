"""Caption encoding overlapped with image encoding inside a build (``EncoderProducer.produce``).

The overlapped path must give the bytes of the serial one (with and without undecodable images, with a text
encoder whose output depends on the batch), really overlap, surface errors of the background thread, and
leave no thread running and no chunk half-written when interrupted.
"""

from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from memory_testlib import FakeEncoder, _vec, file_digest, make_jpeg_pairs, make_pairs

from reco_ref.errors import RecoError
from reco_ref.memory import Memory, build_memory, read_pairs
from reco_ref.memory.producers import EncoderProducer
from reco_ref.paths import weights_dir

COMPARED = ("image.npy", "text.npy", "meta.sqlite", "failures.jsonl")


class BatchFake(FakeEncoder):
    """A fake whose text embeddings depend on the whole ``encode_texts`` call (like the int8 text tower,
    whose quantisation scale is taken over the batch): every row is salted with a hash of all the texts."""

    def __init__(self, concurrent: bool, text_delay: float = 0.0, **kw):
        super().__init__(32, concurrent=concurrent, **kw)
        self.text_calls: list[list[str]] = []
        self.text_delay = text_delay  # seconds per call: keeps a speculative call running while images fail
        self.active = 0  # encode_texts calls running right now
        self.most_active = 0
        self._lock = threading.Lock()

    def encode_texts(self, texts, batch_size: int = 256):
        with self._lock:
            self.active += 1
            self.most_active = max(self.most_active, self.active)
        try:
            time.sleep(self.text_delay)
            self.text_calls.append(list(texts))
            salt = hashlib.sha256("\n".join(texts).encode()).digest()
            return np.stack([_vec(salt + t.encode(), self.dim) for t in texts])
        finally:
            with self._lock:
                self.active -= 1


def _caption_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("reco-captions")]


def _same_files(a: Path, b: Path) -> None:
    for f in COMPARED:
        assert file_digest(a / f) == file_digest(b / f), f


@pytest.mark.parametrize("bad", [(), (3, 17)], ids=["all-decode", "two-corrupt"])
def test_overlapped_build_has_the_serial_bytes(tmp_path, bad):
    items = read_pairs(make_pairs(tmp_path / "src", 30, bad=bad))
    serial, overlapped = BatchFake(False), BatchFake(True, text_delay=0.05)
    build_memory(tmp_path / "serial", items, serial, chunk_size=8, progress=False)
    build_memory(tmp_path / "overlap", items, overlapped, chunk_size=8, progress=False, overlap_captions=True)
    _same_files(tmp_path / "serial", tmp_path / "overlap")
    assert len(Memory.open(tmp_path / "overlap")) == 30 - len(bad)
    # the fake really is batch-sensitive: the speculative call's rows differ from the serial call's
    caps = [it["caption"] for it in items[:8]]
    assert not np.array_equal(serial.encode_texts(caps)[1:], serial.encode_texts(caps[1:]))
    # serial: one caption call per chunk; overlapped: one per chunk, plus a re-encode per chunk with a failure
    chunks_with_failure = len({b // 8 for b in bad})
    assert len(serial.text_calls) == 4 + 2  # + the two precondition calls above
    assert len(overlapped.text_calls) == 4 + chunks_with_failure
    assert overlapped.most_active == 1  # a re-encode waits for the discarded speculative call
    assert not _caption_threads()


def test_serial_unless_asked_and_refused_unless_declared(tmp_path):
    """Serial by default, even for an encoder that declares concurrent_towers; asking for the overlap with an
    encoder that does not declare it (absent, False, or a truthy non-True value) is refused, naming it."""
    items = read_pairs(make_pairs(tmp_path / "src", 6))
    seen = []

    class Recorder(FakeEncoder):
        def encode_texts(self, texts, batch_size=256):
            seen.append(threading.current_thread() is threading.main_thread())
            return super().encode_texts(texts, batch_size)

    EncoderProducer(Recorder(32, concurrent=True)).produce(items, 0, 0)
    assert seen == [True]
    for declared in (None, False, "yes"):  # absent, off, truthy but not the explicit True asked for
        enc = Recorder(32)
        if declared is None:
            del enc.concurrent_towers
        else:
            enc.concurrent_towers = declared
        with pytest.raises(RecoError, match="overlap_captions: encoder .fake-32. does not declare concurrent_towers"):
            EncoderProducer(enc, overlap_captions=True)


class OverlapProbe(FakeEncoder):
    """encode_images finishes only after encode_texts has started (or gives up after 10 s and records it)."""

    def __init__(self):
        super().__init__(32, concurrent=True)
        self.text_started = threading.Event()
        self.images_waited_for_texts: list[bool] = []

    def encode_images(self, items, **kw):
        self.images_waited_for_texts.append(self.text_started.wait(timeout=10))
        return super().encode_images(items, **kw)

    def encode_texts(self, texts, batch_size=256):
        self.text_started.set()
        return super().encode_texts(texts, batch_size)


def test_captions_encode_while_images_do(tmp_path):
    items = read_pairs(make_pairs(tmp_path / "src", 12))
    enc = OverlapProbe()
    t = time.perf_counter()
    out = EncoderProducer(enc, overlap_captions=True).produce(items, 0, 0)
    assert enc.images_waited_for_texts == [True], "encode_texts did not start before encode_images finished"
    assert time.perf_counter() - t < 5
    ref = EncoderProducer(FakeEncoder(32)).produce(items, 0, 0)
    for k in ("item", "image", "text", "failed_item"):
        np.testing.assert_array_equal(out[k], ref[k])


def test_background_error_surfaces_with_a_note(tmp_path):
    items = read_pairs(make_pairs(tmp_path / "src", 10))

    class Broken(FakeEncoder):
        def encode_texts(self, texts, batch_size=256):
            raise RuntimeError("text tower exploded")

    with pytest.raises(RuntimeError, match="text tower exploded") as ei:
        build_memory(tmp_path / "mem", items, Broken(32, concurrent=True), chunk_size=4, progress=False,
                     overlap_captions=True)
    assert any("caption-encoding thread" in n and "items 0..3" in n for n in ei.value.__notes__)
    assert not _caption_threads()
    assert not list((tmp_path / "mem" / ".build" / "chunks").glob("chunk_*.npz"))


def test_background_error_on_captions_of_failed_images_only_is_the_serial_outcome(tmp_path):
    """The serial path never encodes the caption of an undecodable image: neither may the overlapped one fail on it."""
    items = read_pairs(make_pairs(tmp_path / "src", 10, bad=(4,)))
    poison = items[4]["caption"]

    class Picky(BatchFake):
        def encode_texts(self, texts, batch_size=256):
            if poison in texts:
                raise ValueError("cannot tokenize")
            return super().encode_texts(texts, batch_size)

    build_memory(tmp_path / "serial", items, Picky(False), chunk_size=8, progress=False)
    build_memory(tmp_path / "overlap", items, Picky(True), chunk_size=8, progress=False, overlap_captions=True)
    _same_files(tmp_path / "serial", tmp_path / "overlap")


def test_interrupt_waits_for_the_caption_thread_and_resumes_to_the_same_bytes(tmp_path):
    items = read_pairs(make_pairs(tmp_path / "src", 24, bad=(5,)))
    build_memory(tmp_path / "ref", items, BatchFake(False), chunk_size=8, progress=False)
    finished = []

    class Interrupted(BatchFake):
        def encode_images(self, paths, **kw):
            if any(str(p).endswith("00017.jpg") for p in paths):  # third chunk: Ctrl-C while its captions encode
                raise KeyboardInterrupt
            return super().encode_images(paths, **kw)

        def encode_texts(self, texts, batch_size=256):
            time.sleep(0.3)  # still running when the interrupt arrives
            out = super().encode_texts(texts, batch_size)
            finished.append(len(texts))
            return out

    with pytest.raises(KeyboardInterrupt):
        build_memory(tmp_path / "mem", items, Interrupted(True), chunk_size=8, progress=False, overlap_captions=True)
    assert not _caption_threads()  # joined before the interrupt propagated
    # chunk 0: the speculative call + the re-encode (item 5 failed); chunk 1: one; chunk 2: one, waited for
    assert len(finished) == 4
    chunks = tmp_path / "mem" / ".build" / "chunks"
    assert sorted(p.name for p in chunks.iterdir()) == ["chunk_000000.npz", "chunk_000001.npz"]
    build_memory(tmp_path / "mem", items, BatchFake(True), chunk_size=8, progress=False, resume=True,
                 overlap_captions=True)
    _same_files(tmp_path / "ref", tmp_path / "mem")


@pytest.mark.parametrize("name", ["reco-mini", "reco-mini-int8"])
@pytest.mark.parametrize("broken", [False, True], ids=["all-decode", "one-corrupt"])
def test_real_encoder_overlapped_equals_serial(tmp_path, name, broken):
    if not (weights_dir() / name / "encoder.json").is_file():
        pytest.skip(f"weights/{name} not shipped")
    from reco_ref.encoders import load

    # the corrupt item's caption is the longest of its chunk: dropping it changes the trimmed length (and the
    # int8 scale) of the caption batch, so reusing the speculative call's rows would change bits
    long = "a much longer caption about a yellow flower with green leaves in the sun"
    items = read_pairs(make_jpeg_pairs(tmp_path / "src", 14, broken_caption=long if broken else None))
    enc = load(name)
    assert enc.concurrent_towers is True  # separate ONNX Runtime sessions per tower (see EncoderPair)
    build_memory(tmp_path / "serial", items, enc, chunk_size=8, progress=False)  # the default: serial
    build_memory(tmp_path / "overlap", items, enc, chunk_size=8, progress=False, overlap_captions=True)
    _same_files(tmp_path / "serial", tmp_path / "overlap")
    assert Memory.open(tmp_path / "overlap").manifest["counts"]["failed"] == int(broken)


def test_cli_overlap_captions(tmp_path):
    """`--overlap-captions` builds and adds the same bytes as without; it is refused, by name, where nothing is
    encoded (arrays), for sharded builds, and for an encoder that does not declare concurrent_towers."""
    from test_memory_estimate_cli import _cli

    pairs = make_pairs(tmp_path / "src", 20, bad=(3,))
    more = make_pairs(tmp_path / "src2", 6, name="more.csv", start=20)
    for name, extra in (("serial", []), ("overlap", ["--overlap-captions"])):
        out = tmp_path / name
        p = _cli("build-memory", "--pairs", pairs, "--out", out, "--model", "memory_testlib:fake32_concurrent",
                 "--chunk-size", 8, "--no-progress", *extra)
        assert p.returncode == 0, p.stderr
        p = _cli("memory-add", out, "--pairs", more, "--model", "memory_testlib:fake32_concurrent", "--no-progress",
                 *extra)
        assert p.returncode == 0, p.stderr
    _same_files(tmp_path / "serial", tmp_path / "overlap")
    p = _cli("build-memory", "--pairs", pairs, "--out", tmp_path / "x", "--model", "memory_testlib:fake32",
             "--no-progress", "--overlap-captions")
    assert p.returncode == 1 and "does not declare concurrent_towers" in p.stderr, p.stderr
    np.save(tmp_path / "a.npy", np.eye(4, 8, dtype=np.float32))
    p = _cli("build-memory", "--image-embeddings", tmp_path / "a.npy", "--text-embeddings", tmp_path / "a.npy",
             "--encoder-name", "e", "--encoder-fingerprint", "f", "--out", tmp_path / "y", "--overlap-captions")
    assert p.returncode == 1 and "--overlap-captions: precomputed arrays are not encoded" in p.stderr, p.stderr
    p = _cli("build-memory", "--pairs", pairs, "--out", tmp_path / "z", "--model", "memory_testlib:fake32_concurrent",
             "--shards", 2, "--overlap-captions")
    assert p.returncode == 1 and "not available for sharded" in p.stderr, p.stderr
