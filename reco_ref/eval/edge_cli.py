"""``reco-ref export-image-weights`` and ``class-text``: the files a device needs to refine image queries with φ_I
alone (argument parsing only; logic: :mod:`reco_ref.eval.edge`).

They live in the evaluation room, not in ``export/``: they apply trained RECO weights (retrieve → fuse the class
text) and are read back by ``query``, while ``export/`` holds the graph writers that need other frameworks.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..options import ONNX_NOT_ATTACHED, add_backend, add_k, add_memory, add_threads, add_weights
from ..paths import add_overwrite_option, check_output_files, printable


def register(sub) -> None:
    w = sub.add_parser(
        "export-image-weights",
        help="write φ_I alone (the image module of RECO weights, ~half the file) for query --class-text on a device",
        description="Read RECO weights (image.*, text.*, tau, meta; the shipped fusion.npz or reco-ref train's) and "
        "write OUT with the image module φ_I, tau and the meta only, plus the digests of the source's φ_I and φ_T "
        "(a class-text file made with the full weights is checked against them). On the device: reco-ref query "
        "PHOTO --memory M --weights OUT --class-text CLASSES.npz. Needs numpy only.",
    )
    add_weights(w, required=True, help="RECO weights (.npz) holding φ_I and φ_T")
    w.add_argument("--out", required=True, metavar="FILE", help="output .npz (φ_I alone)")
    add_overwrite_option(w, what="FILE")
    w.set_defaults(func=_export_image_weights)

    c = sub.add_parser(
        "class-text",
        help="precompute the class text (frozen t_c, refined t̄_c = φ_T(t_c, …)) that query ranks against, so a "
             "device needs φ_I alone",
        description="On a build machine with the full RECO weights: compute, for the class names and templates "
        "query would use, the frozen class embeddings t_c and their refinement t̄_c = φ_T(t_c, memory neighbours) "
        "against MEMORY with k neighbours, and write them to OUT (float32 [C,D] each, a JSON header binding them "
        "to the class names, templates, k, the encoder, the weights' φ_I/φ_T digests and the memory's content). "
        "Then reco-ref query PHOTO --memory MEMORY --weights PHI_IMAGE.npz --class-text OUT gives the same classes "
        "and scores as query with the full weights.",
    )
    add_memory(c, help="the memory the device will search (same content)")
    c.add_argument("--classes", help="dataset manifest whose class names to rank")
    c.add_argument("--class-names", help="text file, one class name per line")
    c.add_argument("--templates", default=None, help="template set or file (default: the set eval uses for the "
                                                     "--classes dataset, else generic), as query picks it")
    add_k(c, default=10, help="neighbours, as query -k (default 10)")
    add_weights(c, help="full RECO weights .npz (default: the shipped weights of --model)")
    c.add_argument("--model", default="reco-mini", help="encoder name or folder holding encoder.json")
    add_backend(c, exclude={"onnx": ONNX_NOT_ATTACHED})
    add_threads(c, help="ONNX Runtime threads of the encoders (default all)")
    c.add_argument("--out", required=True, metavar="FILE", help="output .npz")
    add_overwrite_option(c, what="FILE")
    c.set_defaults(func=_class_text)


def _export_image_weights(args: argparse.Namespace) -> int:
    from ..io import require_file
    from .edge import save_image_weights

    check_output_files([args.out], overwrite=args.overwrite)
    require_file(Path(args.fusion))
    rec = save_image_weights(args.fusion, args.out, overwrite=args.overwrite)
    size = Path(args.out).stat().st_size / 1e6
    print(printable(f"{args.out}: φ_I alone ({size:.1f} MB; φ_I sha256 {rec['phi_image_sha256'][:12]}, cut from "
                    f"{rec['source']} whose φ_T is {rec['phi_text_sha256'][:12]})"))
    return 0


def _class_text(args: argparse.Namespace) -> int:
    import sys

    from ..errors import RecoError
    from .edge import save_class_text
    from .evaluate import make_class_text, read_class_names

    if bool(args.classes) == bool(args.class_names):
        raise RecoError("give exactly one of --classes MANIFEST or --class-names FILE")
    check_output_files([args.out], overwrite=args.overwrite)
    names = read_class_names(args.classes or args.class_names)
    header, frozen, refined = make_class_text(
        args.memory, names, templates=args.templates, classes_manifest=args.classes, k=args.k, fusion=args.fusion,
        model=args.model, backend=args.backend, threads=args.threads,
        say=lambda s: print(s, file=sys.stderr, flush=True))
    save_class_text(args.out, header, frozen, refined)
    size = Path(args.out).stat().st_size / 1e3
    print(printable(f"{args.out}: {len(names)} classes × {frozen.shape[1]} (frozen + refined, {size:.0f} kB), "
                    f"templates {header['templates']} ({len(header['template_list'])}), k = {header['k']}, memory "
                    f"{header['memory']['name']} ({header['memory']['rows']} rows)"))
    return 0
