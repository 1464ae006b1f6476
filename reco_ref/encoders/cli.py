"""``reco-ref encode`` and ``reco-ref hf-clip-config``: argument parsing only (logic: stream.py, hf_layout.py)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..checks import int_option
from ..options import add_restart, add_threads
from ..paths import add_overwrite_option


def register(sub) -> None:
    p = sub.add_parser(
        "encode",
        help="embed a folder/list of images or a file of texts into one .npy (chunked, resumable)",
        description="Embed images (--images DIR|LIST) or texts (--texts FILE, one per line) with an encoder pair. "
        "Writes OUT (float32 [M,D], L2-normalised) and sidecars OUT-stem.meta.json (model fingerprint, "
        "errors), .ok_index.npy and .items.txt (images), .keys.npy (pairs with an image search key). "
        "Unreadable images are reported in the meta file and skipped. An interrupted run resumes from "
        "its finished chunks when re-run with the same arguments.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", metavar="DIR|LIST|IMAGE", help="folder (recursive), text file with one image path per line, or one image file")
    src.add_argument("--texts", metavar="FILE", help="UTF-8 text file, one text per line")
    p.add_argument("--model", default="reco-mini", help="shipped encoder name or folder with encoder.json (default reco-mini)")
    p.add_argument("--out", required=True, help="output .npy")
    add_threads(p, type=int_option(1, 4096))
    p.add_argument("--batch-size", type=int_option(1, 65_536), default=None, help="graph batch (default 64 images / 256 texts)")
    p.add_argument("--chunk-size", type=int_option(1, 1 << 22), default=1024, help="items per resumable chunk file (default 1024)")
    p.add_argument("--max-pixels", type=int_option(1, 1 << 40), default=None, help="largest accepted image (width*height); default from encoder.json (89,478,485)")
    add_restart(p, what="the finished chunks of an interrupted run")
    add_overwrite_option(p, what="OUT and its sidecars")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_encode)

    h = sub.add_parser(
        "hf-clip-config",
        help="write encoder.json for a Hugging Face ONNX CLIP export (separate vision/text models)",
        description="Read DIR/preprocessor_config.json and the two ONNX graphs, write DIR/encoder.json.",
    )
    h.add_argument("dir", help="folder with the vision and text ONNX models and preprocessor_config.json")
    h.add_argument("--vision", default="vision_model.onnx", help="vision graph file name (default vision_model.onnx)")
    h.add_argument("--text", default="text_model.onnx", help="text graph file name (default text_model.onnx)")
    h.add_argument("--name", default=None, help="encoder name (default: the folder name)")
    add_overwrite_option(h, what="an existing DIR/encoder.json")
    h.set_defaults(func=_hf_config)


def _encode(args: argparse.Namespace) -> int:
    from ..errors import RecoError
    from ..paths import check_output_files, file_problem, printable
    from .images import IMAGE_SUFFIXES
    from .onnx_pair import load
    from .stream import encode_to_file, read_image_list, read_text_lines, sidecar

    out = Path(args.out)
    if out.is_dir():
        raise RecoError(f"--out {out}: is a folder; name the output .npy file")
    # every file this run may write, checked before anything is loaded or written (the keys sidecar is only
    # written for an encoder with image search keys, so an unrelated file of that name is refused too)
    outputs = [out, sidecar(out, ".meta.json")] + ([sidecar(out, ".ok_index.npy"), sidecar(out, ".items.txt"),
                                                    sidecar(out, ".keys.npy")] if args.images else [])
    check_output_files(outputs, overwrite=args.overwrite)
    if not out.parent.is_dir():
        raise RecoError(f"--out {out}: its folder {out.parent} does not exist")
    source = Path(args.images or args.texts)
    if (source.exists() or source.is_symlink()) and not source.is_dir() and file_problem(source):
        raise RecoError(f"--{'images' if args.images else 'texts'} {source}: {file_problem(source)}")
    parts = sidecar(out, ".parts")  # an interrupted run's chunks: resumed, or deleted by --restart and at the end
    if (parts.exists() or parts.is_symlink()) and not (parts.is_dir() and not parts.is_symlink()
                                                       and (parts / "plan.json").is_file()):
        raise RecoError(f"--out {out}: {parts} exists and is not the chunk folder of an interrupted encode (no "
                        "plan.json); this run would write into it and delete it: move it, or choose another --out")
    if args.images and Path(args.images).is_file() and Path(args.images).suffix.lower() in IMAGE_SUFFIXES:
        items, kind = [args.images], "images"  # one image file (not a list of paths)
    elif args.images:
        items, kind = [str(p) for p in read_image_list(args.images)], "images"
    else:
        items, kind = read_text_lines(args.texts), "texts"
    if not items:  # before the model loads: an empty output would look like a finished run
        raise RecoError(f"--{kind} {source}: nothing to encode (no {kind} in it)")
    enc = load(args.model, threads=args.threads, max_pixels=args.max_pixels)
    meta = encode_to_file(enc, items, args.out, kind=kind, chunk_size=args.chunk_size, batch_size=args.batch_size,
                          resume=not args.restart, progress=not args.no_progress)
    for err in meta["errors"]:  # the messages name files from the user's folders: shown escaped
        print(f"skipped: {printable(err['message'])}", file=sys.stderr)
    summary = (f"{args.out}: {meta['n_ok']} of {meta['n_items']} {kind} embedded with {meta['model']} "
               f"(dim {meta['dim']}, fingerprint {meta['fingerprint'][:12]}); {len(meta['errors'])} error(s)")
    if not meta["n_ok"]:  # as build-memory: the files are written (the meta lists each failure), the run failed
        raise RecoError(f"{summary}: every item failed (each is listed above and in {sidecar(out, '.meta.json')})")
    print(printable(summary))
    return 0


def _hf_config(args: argparse.Namespace) -> int:
    from ..paths import check_output_dir
    from .hf_layout import write_hf_clip_config

    check_output_dir(args.dir, ["encoder.json"], overwrite=args.overwrite, what="DIR")
    cfg = write_hf_clip_config(args.dir, vision=args.vision, text=args.text, name=args.name)
    print(f"{args.dir}/encoder.json written ({cfg['name']}, embed_dim {cfg['embed_dim']})")
    return 0
