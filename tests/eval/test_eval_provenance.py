"""Every report marks RECO rows whose weights saw the evaluated dataset's train split (issue 18, Build 6)."""

from __future__ import annotations

import json

from reco_ref.eval.evaluate import weights_saw
from reco_ref.eval.report import method_rows, zero_shot_chart_groups, zero_shot_markdown
from reco_ref.io import sha256_file
from reco_ref.paths import weights_file
from reco_ref.reco.weights import init_reco_weights, load_reco_weights


def _manifest(tmp_path, name, body):
    p = tmp_path / name
    p.write_text(body, encoding="utf-8")
    return p


def test_weights_saw_reads_the_manifest_digest(tmp_path):
    a = _manifest(tmp_path, "a.csv", "file,label,class_name,split\nx.jpg,0,rose,train\n")
    b = _manifest(tmp_path, "b.csv", "file,label,class_name,split\ny.jpg,0,wren,train\n")
    w = init_reco_weights(8, heads=2, meta={"saw_datasets": [{"name": "a", "manifest_sha256": sha256_file(a)}]})
    assert weights_saw(w, a) == "in-domain"
    assert weights_saw(w, b) == "never saw"
    assert weights_saw(init_reco_weights(8, heads=2), a) == "unknown"  # no record: never claimed held-out


def test_reports_mark_the_reco_row():
    base = {"n": 10, "classes": 2, "k": 3, "mode": "both", "frozen": {"top1": 0.1}, "reco": {"top1": 0.9}}
    for saw, word in (("in-domain", "IN-DOMAIN"), ("never saw", "never saw"), ("unknown", "unknown")):
        r = dict(base, reco_weights_saw_dataset=saw)
        rows = dict((row[0].split(" — ")[0], row[0]) for row in method_rows(r))
        assert word in rows["RECO (trained fusion)"] and " — " not in rows["frozen encoder"]
        assert word in zero_shot_markdown(r)
    chart = zero_shot_chart_groups(dict(base, reco_weights_saw_dataset="in-domain"))
    assert "RECO (trained fusion) (in-domain)" in chart["top1"]


def test_shipped_weights_say_what_they_saw():
    names = {"fusion.npz": {"flowers102", "cub100"}, "lodo-flowers.npz": {"cub100"}, "lodo-cub.npz": {"flowers102"}}
    for f, want in names.items():
        w = load_reco_weights(weights_file("reco-mini-fusion", f))
        assert {e["name"] for e in w.meta["saw_datasets"]} == want, f
        assert all(len(e["manifest_sha256"]) == 64 for e in w.meta["saw_datasets"])
        assert "test" not in json.dumps(w.meta.get("selected", {}))
