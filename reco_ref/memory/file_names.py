"""The memory format's names: the files a memory directory holds, its build folder, the manifest's keys.

Their own module so that the format's parts (the commit protocol in :mod:`.format`, the manifest checks in
:mod:`.manifest`, the row binding in :mod:`.binding`) share them without importing one another in a circle;
:mod:`.format` re-exports every name, and its module doc describes the directory.
"""

from __future__ import annotations

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
IMAGE = "image.npy"
TEXT = "text.npy"
IMAGE_KEYS = "image_keys.npy"
META = "meta.sqlite"
IMAGE_INDEX = "image.hnsw"
TEXT_INDEX = "text.hnsw"
FAILURES = "failures.jsonl"
#: the row -> representative maps of indexes over arrays with identical rows (optional, see the module doc)
GROUPS = {"image": "image.groups.npy", "text": "text.groups.npy"}
BUILD_DIR = ".build"
COMMIT = "COMMIT.json"
SHARDS = "shards.json"
COMMIT_LOCK = ".commit.lock"  # readers hold it shared while they open; a commit holds it exclusively
MAX_MANIFEST_BYTES = 64 << 20  # a manifest is a few KB; a bigger file is not one (and is not read into RAM)

DTYPES = ("float16", "float32")
# Keys every manifest must hold; validate_manifest checks each (name, type).
MANIFEST_KEYS = {
    "format_version": int,
    "embed_dim": int,
    "key_dim": (int, type(None)),
    "dtype": str,
    "encoder": dict,  # {"name": str, "fingerprint": hex str}
    "counts": dict,  # {"rows": n, "items": inputs seen, "failed": n_failed}
    "files": dict,  # {file name: {"sha256": hex, "bytes": int}}
    "hnsw": dict,  # {"image": {...}, "text": {...}} each {"M", "ef_construction", "space", "dim", "count", "vectors"}
}


#: the files a commit may move into a memory: exactly the memory's own files (never the manifest, never a path)
COMMIT_FILES = (IMAGE, TEXT, IMAGE_KEYS, META, IMAGE_INDEX, TEXT_INDEX, FAILURES)
#: the optional files a commit may also move (kept apart: ``paths.MEMORY_FILES`` mirrors COMMIT_FILES, the files
#: that mark a folder as a memory, which these never do alone)
OPTIONAL_COMMIT_FILES = tuple(GROUPS.values())

META_COLUMNS = ("row", "item", "caption", "source", "label", "split", "tags")
