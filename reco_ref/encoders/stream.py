"""Encode many images or texts to one ``.npy``, in chunks that survive an interruption.

Files written for ``--out emb.npy`` (every write atomic, through :mod:`reco_ref.io`)::

    emb.npy            float32 [M,D]   L2-normalised embeddings, one row per item that worked
    emb.keys.npy       float32 [M,Dk]  image search keys (image runs of a pair with image.key_output)
    emb.ok_index.npy   int64   [M]     position in the item list of each row (images; texts keep all rows)
    emb.items.txt                      the item list, one per line (images: resolved paths; texts: not written);
                                       a name holding a line break or control character is refused
    emb.meta.json                      model name + fingerprint, dims, counts, the errors (index, item, message)
    emb.parts/                         while running: plan.json + chunk_000000.npz ...; removed at the end

Resuming: a re-run with the same model, items and chunk size finds ``emb.parts/`` and encodes only the
chunks that are missing (each chunk file appears atomically, so a killed run leaves no half chunk).  A
``plan.json`` that does not match (other model / items / chunk size) is an error, never a silent mix.
The plan, the chunk files and the resume check are the shared primitive of :mod:`reco_ref.chunks` (the memory
builds use it too); the policy (resume by default, ``--restart`` discards) is this module's.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np

from ..chunks import PLAN, chunk_path, missing_chunks, plan_differences, read_state_json, write_chunks
from ..errors import RecoError
from ..io import atomic_save_npy, atomic_write_json, atomic_write_text, load_npz
from ..paths import printable
from .images import ImageError, list_images


def sidecar(out: Path, suffix: str) -> Path:
    """``emb.npy`` -> ``emb<suffix>`` (e.g. ``.meta.json``)."""
    out = Path(out)
    stem = out.name[:-4] if out.name.endswith(".npy") else out.name
    return out.with_name(stem + suffix)


def read_image_list(source: str | Path) -> list[Path]:
    """A folder (recursively, sorted) or a text file with one path per line (relative to the file's folder;
    blank lines and ``#`` comments skipped)."""
    src = Path(source)
    if src.is_dir():
        return list_images(src)
    if not src.is_file():
        raise FileNotFoundError(f"{src}: neither a folder of images nor a list file")
    out = []
    for line in src.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            p = Path(line)
            out.append(p if p.is_absolute() else src.parent / p)
    return out


def read_text_lines(path: str | Path) -> list[str]:
    """One text per line (UTF-8); the final newline does not make an extra empty text."""
    from ..paths import file_problem

    p = Path(path)
    problem = file_problem(p)  # a folder, a device or a named pipe is named as such, not called missing
    if problem == "no such file":
        raise FileNotFoundError(f"{p}: no such texts file")
    if problem:
        raise RecoError(f"{p}: {problem}; expected a UTF-8 text file, one text per line")
    try:
        return p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise RecoError(f"{p}: not UTF-8 text ({exc})") from None


# characters that end a line for str.splitlines (\n \r \x0b \x0c \x1c-\x1e \x85 \u2028 \u2029) or are other
# control characters, and lone surrogates (an undecodable file name: not writable as UTF-8)
_NOT_IN_A_LINE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")


def check_item_names(names: Sequence[str]) -> None:
    """Refuse image names that the one-name-per-line ``.items.txt`` sidecar cannot hold.

    A name with a line break used to split into two lines (every later line then names the wrong row of
    ``.ok_index.npy``), and one with an undecodable byte stopped the run at its very end.  Checked before
    anything is written; the message shows the name escaped.
    """
    for i, name in enumerate(names):
        m = _NOT_IN_A_LINE.search(name)
        if m:
            ch = m.group().encode("unicode_escape", "backslashreplace").decode("ascii")
            raise RecoError(f"item {i} {printable(name)!s:.300}: the name holds {ch} (a line break, control character "
                            "or undecodable byte); the .items.txt sidecar lists one name per line: rename the file")


def _items_digest(items: Sequence[str]) -> str:
    h = hashlib.sha256()
    for it in items:
        h.update(it.encode("utf-8", "surrogatepass") + b"\0")
    return h.hexdigest()


def _open_parts(parts: Path, plan: dict, resume: bool) -> None:
    plan_path = parts / PLAN
    if parts.exists() and not resume:
        shutil.rmtree(parts)
    if plan_path.is_file():
        remedy = "re-run with --restart to discard it"
        diff = plan_differences(read_state_json(plan_path, remedy=remedy), plan)
        if diff:
            raise RecoError(
                f"{plan_path}: an interrupted run with different settings ({', '.join(diff)} differ); "
                f"{remedy}, or with the same model, items and chunk size to resume"
            )
    else:
        parts.mkdir(parents=True, exist_ok=True)
        atomic_write_json(plan_path, plan)


def encode_to_file(enc, items: Sequence, out: str | Path, *, kind: str, chunk_size: int = 1024,
                   batch_size: int | None = None, resume: bool = True, progress: bool = True) -> dict:
    """Encode ``items`` (image paths, or texts for ``kind="texts"``) chunk by chunk into ``out`` (.npy).

    Returns the meta dict also written to ``<out stem>.meta.json``.
    """
    if kind not in ("images", "texts"):
        raise ValueError(f"kind: expected 'images' or 'texts', got {kind!r}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size: expected >= 1, got {chunk_size}")
    out = Path(out)
    names = [str(x) for x in items]
    if kind == "images":
        check_item_names(names)
    with_keys = kind == "images" and bool(enc.config.image.key_output)
    plan = {"kind": kind, "model": enc.name, "fingerprint": enc.fingerprint, "n_items": len(names),
            "items_sha256": _items_digest(names), "chunk_size": chunk_size}
    parts = sidecar(out, ".parts")
    _open_parts(parts, plan, resume)
    n_chunks = (len(names) + chunk_size - 1) // chunk_size
    todo = missing_chunks(parts, n_chunks)
    bar = None
    if progress:
        from tqdm import tqdm

        remaining = sum(len(names[c * chunk_size : (c + 1) * chunk_size]) for c in todo)
        bar = tqdm(total=len(names), initial=len(names) - remaining, unit=kind[:-1], desc=f"{enc.name} {kind}")

    def produce(c: int) -> dict[str, np.ndarray]:
        chunk = list(items[c * chunk_size : (c + 1) * chunk_size])
        arrays: dict[str, np.ndarray] = {}
        if kind == "texts":
            arrays["emb"] = enc.encode_texts(chunk, **({"batch_size": batch_size} if batch_size else {}))
            arrays["ok_index"] = np.arange(c * chunk_size, c * chunk_size + len(chunk), dtype=np.int64)
            errors: list = []
        else:
            res = enc.encode_images(chunk, on_error="skip", with_keys=with_keys, **({"batch_size": batch_size} if batch_size else {}))
            arrays["emb"] = res.embeddings
            arrays["ok_index"] = res.ok_index + c * chunk_size
            if with_keys:
                arrays["keys"] = res.keys
            errors = [[e.index + c * chunk_size, e.item, e.message] for e in res.errors]
        arrays["errors_json"] = np.array(json.dumps(errors))  # a 0-d unicode array: no pickle needed
        return arrays

    def written(c: int, _k: int) -> None:
        if bar is not None:
            bar.update(len(names[c * chunk_size : (c + 1) * chunk_size]))

    try:
        write_chunks(parts, todo, produce, after=written)
    finally:
        if bar is not None:
            bar.close()

    embs, keys, oks, errors = [], [], [], []
    for c in range(n_chunks):
        z = load_npz(chunk_path(parts, c))
        embs.append(z["emb"])
        oks.append(z["ok_index"])
        if with_keys:
            keys.append(z["keys"])
        errors.extend(ImageError(*e) for e in json.loads(str(z["errors_json"])))
    emb = np.concatenate(embs) if embs else np.zeros((0, enc.dim), np.float32)
    ok_index = np.concatenate(oks) if oks else np.zeros((0,), np.int64)
    atomic_save_npy(out, emb.astype(np.float32))
    files = {"embeddings": out.name}
    if kind == "images":
        atomic_save_npy(sidecar(out, ".ok_index.npy"), ok_index.astype(np.int64))
        atomic_write_text(sidecar(out, ".items.txt"), "".join(n + "\n" for n in names))
        files.update(ok_index=sidecar(out, ".ok_index.npy").name, items=sidecar(out, ".items.txt").name)
    if with_keys:
        key = np.concatenate(keys) if keys else np.zeros((0, enc.key_dim or 0), np.float32)
        atomic_save_npy(sidecar(out, ".keys.npy"), key.astype(np.float32))
        files["keys"] = sidecar(out, ".keys.npy").name
    meta = {
        "kind": kind, "model": enc.name, "fingerprint": enc.fingerprint, "dim": enc.dim,
        "key_dim": enc.key_dim if with_keys else None, "n_items": len(names), "n_ok": int(emb.shape[0]),
        "items_sha256": plan["items_sha256"], "files": files,
        "errors": [{"index": int(e.index), "item": e.item, "message": e.message} for e in errors],
    }
    atomic_write_json(sidecar(out, ".meta.json"), meta)
    shutil.rmtree(parts)
    return meta
