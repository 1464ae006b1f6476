"""The verbs that open a memory run unchanged against a served one (issue 23, item 1 and its third Done-when line).

``eval`` (zero-shot and ``--pairs``), ``query``, ``train`` and ``classify train|eval`` are run twice through the
command line on the same 8-shard memory: in process (``ShardedMemory``) and with ``--scheduler`` (each shard resident
on a worker of a 2-process ``LocalCluster``). Their outputs must be **bit-identical**: every JSON number equal as a
float, every weight array equal bit for bit. Why that holds, and so why nothing looser is accepted: the served
search answers with the bits of the in-process one (the same ``Memory.search`` on the same files, merged by the same
``merge_topk``), row reads (``image``, ``text``, ``image_keys``: :class:`~reco_ref.memory.shards.ShardedArray`) return
the stored bits in row order, and everything after them (fusion, losses, AdamW, metrics) runs here in this process
on the same inputs in the same order.

Exact and HNSW search, uni- and cross-modal search (the text -> image-embedding exact search of a keyed memory reads
the whole ``image`` array), memory-relative score maps (read shard by shard) and a single memory served whole (the
validation memory) are all crossed. The eval/query/classify part needs weights/reco-mini (skipped without it).
"""

from __future__ import annotations

import csv
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from reco_ref.cli import main
from reco_ref.memory import ShardedMemory, build_memory_from_arrays, open_memory, write_shards_manifest
from reco_ref.memory import shards as shards_mod
from reco_ref.paths import weights_dir

distributed = pytest.importorskip("distributed")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))  # train_testlib: D=32 class-structured rows
import train_testlib  # noqa: E402

N_SHARDS = 8
DEMO = weights_dir() / "demo"
HAVE_RECO_MINI = (weights_dir() / "reco-mini" / "encoder.json").is_file()
needs_reco_mini = pytest.mark.skipif(not HAVE_RECO_MINI, reason="weights/reco-mini not present")


@pytest.fixture(scope="module")
def cluster():
    """A 2-process cluster and a client that is *not* the process's default: a verb's ``--scheduler`` runs as it
    would in a fresh process (a call that fell back on ``distributed.default_client()`` failed there, unseen)."""
    with distributed.LocalCluster(n_workers=2, processes=True, threads_per_worker=1, dashboard_address=None,
                                  worker_dashboard_address=None) as c, \
            distributed.Client(c, set_as_default=False) as client:
        client.wait_for_workers(2)
        yield c.scheduler_address, client


def _shard(root: Path, image, text, keys, items, *, name: str, fingerprint: str) -> Path:
    """``root``: N_SHARDS memories of consecutive rows and their shards.json."""
    bounds = np.linspace(0, len(image), N_SHARDS + 1).astype(int)
    dirs = []
    for s, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        dirs.append(f"shard_{s:03d}")
        build_memory_from_arrays(root / dirs[-1], image[lo:hi], text[lo:hi], keys=None if keys is None else keys[lo:hi],
                                 items=items[lo:hi], name=name, fingerprint=fingerprint, num_threads=1, progress=False)
    write_shards_manifest(root, dirs)
    return root


@pytest.fixture(scope="module")
def train_data(tmp_path_factory):
    """train_testlib's 20-class rows (D=32, keys Dk=48): 320 training rows in 8 shards, 80 validation rows whole."""
    root = tmp_path_factory.mktemp("served-train")
    image, text, keys, labels, _ = train_testlib.clustered(400, 32, train_testlib.N_CLASSES, seed=0, key_dim=48)
    names = train_testlib.CLASS_NAMES
    items = [{"image": "", "caption": f"a photo of a {names[c]}.", "source": f"array:{i}", "label": int(c),
              "split": "train", "tags": None} for i, c in enumerate(labels)]
    mem = _shard(root / "train8", image[:320], text[:320], keys[:320], items[:320], name="fake",
                 fingerprint=train_testlib.FINGERPRINT)
    train_testlib.build(root / "val", image[320:], text[320:], keys[320:], labels[320:], names)
    manifest = root / "manifest.csv"
    manifest.write_text("file,label,class_name,split\n" + "".join(f"x{c}.jpg,{c},{n},train\n" for c, n in
                                                                   enumerate(names)))
    return {"root": root, "mem": mem, "val": root / "val", "manifest": manifest}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The shipped clip-art: 6 'train' images per category (66 rows, 8 shards, reco-mini), 2 'test' per category
    (one of them also a train image: excluded from its own retrieval), a pairs CSV of 10 test images."""
    if not HAVE_RECO_MINI:
        pytest.skip("weights/reco-mini not present")
    from reco_ref.encoders import load
    from reco_ref.eval.data import embed_split, read_split
    from reco_ref.memory import read_pairs_csv
    from reco_ref.reco.weights import init_reco_weights, save_reco_weights

    root = tmp_path_factory.mktemp("served-demo")
    with open(DEMO / "pairs.csv", newline="", encoding="utf-8") as fh:
        pairs = [p for p in csv.DictReader(fh) if p["split"] == "memory"]
    rows, taken = [], {}
    for p in pairs:
        n = taken.get(p["label"], 0)
        taken[p["label"]] = n + 1
        if n < 6:
            rows.append([str(DEMO / p["image"]), p["label"], p["category"], "train"])
        if n in (5, 6):  # the 6th train image again, and one more
            rows.append([str(DEMO / p["image"]), p["label"], p["category"], "test"])
    manifest = root / "data" / "manifest.csv"
    manifest.parent.mkdir()
    with open(manifest, "w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows([["file", "label", "class_name", "split"], *rows])
    enc = load("reco-mini", threads=1)
    items = read_pairs_csv(manifest, split="train", caption_template="a drawing of a {class_name}.",
                           allow_outside=True)
    img, keys = embed_split(read_split(manifest, "train"), enc, cache_dir=root / "cache")
    mem = _shard(root / "mem8", img, enc.encode_texts([it["caption"] for it in items]), keys, items, name=enc.name,
                 fingerprint=enc.fingerprint)
    # the copy init reads the neighbours (x + α·mean), the relevance bias their scores against the searched memory's
    # own score map: every retrieved bit reaches the output
    w = init_reco_weights(enc.dim, init="copy", k=5, relevance=True, rel_source="memory",
                          meta={"encoder_name": enc.name, "encoder_fingerprint": enc.fingerprint})
    save_reco_weights(root / "copy.npz", w)
    (root / "pairs").mkdir()
    lines = ["image,caption"]
    for i, r in enumerate(x for x in rows if x[3] == "test"):
        if i < 10:
            shutil.copy(r[0], root / "pairs" / f"{i}.png")
            lines.append(f"{i}.png,a drawing of a {r[2]}.")
    (root / "pairs" / "pairs.csv").write_text("\n".join(lines) + "\n")
    return {"root": root, "manifest": manifest, "mem": mem, "w": root / "copy.npz",
            "image": next(r[0] for r in rows if r[3] == "test")}


def _twice(argv_of, address, capsys) -> tuple[str, str]:
    """Run the verb in process, then served; ``argv_of(tag)`` names distinct outputs per run. Returns both stdouts."""
    outs = []
    for tag, extra in (("local", []), ("served", ["--scheduler", address])):
        assert main(argv_of(tag) + extra) == 0, capsys.readouterr().err
        outs.append(capsys.readouterr().out)
    return outs[0], outs[1]


def _same_npz(a: Path, b: Path) -> None:
    with np.load(a, allow_pickle=False) as x, np.load(b, allow_pickle=False) as y:
        assert sorted(x.files) == sorted(y.files)
        for key in x.files:
            assert x[key].dtype == y[key].dtype and np.array_equal(x[key], y[key]), key


# ------------------------------------------------------------------------------------------- the row reads
def test_row_reads_are_the_stored_rows_in_order(train_data, cluster, monkeypatch):
    """``image``/``text``/``image_keys``/``vectors`` of a sharded and a served memory read exactly the shards' rows;
    a whole-array gather beyond GATHER_RAM_BYTES goes to a memory-mapped temporary file."""
    local = ShardedMemory.open(train_data["mem"], verify="size")
    want = {name: np.concatenate([np.asarray(getattr(m, name)) for m in local.shards])
            for name in ("image", "text", "image_keys")}
    rng = np.random.default_rng(0)
    idx = rng.integers(-320, 320, (7, 5))  # any shape, negatives from the end, repeats
    mask = rng.random(320) < 0.3
    with open_memory(train_data["mem"], client=cluster[1], verify="size") as served:
        for mem in (local, served):
            for name, full in want.items():
                a = getattr(mem, name)
                assert a.shape == full.shape and a.dtype == full.dtype and len(a) == 320
                for key in (idx, mask, slice(35, 205), slice(None, None, 7), slice(300, 500), 41, -1, [],
                            np.array([319, 0, 40, 39])):
                    got = a[key]
                    assert got.dtype == full.dtype and np.array_equal(got, full[key]), (name, key)
                assert np.array_equal(np.asarray(a), full)
            assert mem.vectors("image").shape == (320, 48) and mem.vectors("text").shape == (320, 32)
            with pytest.raises(IndexError):
                mem.image[320]
            with pytest.raises(IndexError):
                mem.image[0, 1]
        assert [len(s) for s in served.shards] == [len(s) for s in local.shards]
        assert [s.manifest for s in served.shards] == [s.manifest for s in local.shards]
        assert np.array_equal(np.asarray(served.shards[3].text), np.asarray(local.shards[3].text))
        monkeypatch.setattr(shards_mod, "GATHER_RAM_BYTES", 1000)  # beyond it: a memmap on a temporary file
        monkeypatch.setattr(shards_mod, "GATHER_ROWS", 16)  # several requests per shard (40 rows each)
        big = served.image_keys.__array__()  # np.asarray returns a plain view of the same mapping
        assert isinstance(big, np.memmap) and np.array_equal(big, want["image_keys"])
        assert np.array_equal(np.asarray(local.text), want["text"])


# ------------------------------------------------------------------------------------------------- train
@pytest.mark.parametrize("recipe", [[], ["--exact", "--search", "cross", "--irrelevant-fraction", "0.25"]],
                         ids=["hnsw-uni", "exact-cross"])
def test_train_served_gives_the_same_weights(train_data, cluster, tmp_path, capsys, recipe):
    d = train_data

    def argv(tag):
        return ["train", "--memory", str(d["mem"]), "--val-memory", str(d["val"]), "--val-retrieval", str(d["mem"]),
                "--val-classes", str(d["manifest"]), "--model", "train_testlib:class_encoder", "--epochs", "2",
                "--steps-per-epoch", "2", "--batch-size", "32", "-k", "5", "--heads", "4", "--lr", "1e-3",
                "--warmup-steps", "1", "--init", "copy", "--relevance", "--rel-map", "memory", "--no-progress",
                "--out", str(tmp_path / tag), *recipe]

    _twice(argv, cluster[0], capsys)
    for name in ("best.npz", "last.npz"):
        _same_npz(tmp_path / "local" / name, tmp_path / "served" / name)
    for name in ("log.jsonl", "result.json"):
        assert (tmp_path / "local" / name).read_text() == (tmp_path / "served" / name).read_text()
    log = [json.loads(line) for line in (tmp_path / "local" / "log.jsonl").read_text().splitlines()]
    assert len(log) == 3 and log[-1]["train_loss"] is not None  # epochs 0, 1, 2 validated; steps were taken
    assert not any(keys for keys in _held(cluster[1]).values())  # every shard released when the verb ended


def _held(client) -> dict:
    return client.run(lambda dask_worker: sorted(getattr(dask_worker, "_reco_ref_shards", {})))


# ------------------------------------------------------------------------------------------- eval, query
@needs_reco_mini
@pytest.mark.parametrize("extra", [[], ["--exact", "--search", "cross", "--fuse", "uni"]], ids=["hnsw", "exact-cross"])
def test_eval_served_gives_the_same_json(demo, cluster, tmp_path, capsys, extra):
    def argv(tag):
        return ["eval", "--memory", str(demo["mem"]), "--dataset", str(demo["manifest"]), "--split", "test",
                "--weights", str(demo["w"]), "-k", "5", "--templates", "single", "--cache-dir",
                str(demo["root"] / "cache"), "--quiet", "--json", str(tmp_path / f"{tag}.json"), *extra]

    _twice(argv, cluster[0], capsys)
    local, served = (json.loads((tmp_path / f"{t}.json").read_text()) for t in ("local", "served"))
    assert served == local
    assert local["excluded_own_rows"] >= 11 and local["reco"] != local["frozen"] and local["knn_vote"] is not None


@needs_reco_mini
def test_eval_pairs_served_gives_the_same_json(demo, cluster, tmp_path, capsys):
    def argv(tag):
        return ["eval", "--memory", str(demo["mem"]), "--pairs", str(demo["root"] / "pairs" / "pairs.csv"),
                "--split", "all", "--weights", str(demo["w"]), "-k", "5", "--cache-dir", str(demo["root"] / "cache"), "--quiet",
                "--json", str(tmp_path / f"{tag}.json")]

    _twice(argv, cluster[0], capsys)
    local, served = (json.loads((tmp_path / f"{t}.json").read_text()) for t in ("local", "served"))
    assert served == local and local["n"] == 10


@needs_reco_mini
@pytest.mark.parametrize("what", ["image", "text"])
def test_query_served_gives_the_same_json(demo, cluster, capsys, what):
    q = [demo["image"]] if what == "image" else ["--text", "a drawing of a boat."]

    def argv(tag):
        return ["query", *q, "--memory", str(demo["mem"]), "--weights", str(demo["w"]), "--classes",
                str(demo["manifest"]), "--templates", "single", "-k", "5", "--json", "-"]

    local, served = (json.loads(out) for out in _twice(argv, cluster[0], capsys))
    assert served == local and len(local["neighbours"]) == 5 and local["reco_top"]


# ---------------------------------------------------------------------------------------------- classify
@needs_reco_mini
def test_classify_served_gives_the_same_weights_and_json(demo, cluster, tmp_path, capsys):
    common = ["--dataset", str(demo["manifest"]), "--memory", str(demo["mem"]), "--model", "reco-mini",
              "--cache-dir", str(demo["root"] / "cache"), "--quiet", "--no-progress"]

    def train(tag):
        return ["classify", "train", *common, "--split", "train", "--out", str(tmp_path / f"{tag}.npz"),
                "--epochs", "2", "--batch-size", "16", "--width", "8", "--heads", "2", "-k", "4"]

    def evaluate(tag):
        return ["classify", "eval", *common, "--weights", str(tmp_path / "local.npz"), "--split", "test",
                "--json", str(tmp_path / f"{tag}.json")]

    _twice(train, cluster[0], capsys)
    _same_npz(tmp_path / "local.npz", tmp_path / "served.npz")
    _twice(evaluate, cluster[0], capsys)
    local, served = (json.loads((tmp_path / f"{t}.json").read_text()) for t in ("local", "served"))
    assert served == local and local["n"] == 22 and "knn_vote" in local["baselines"]
