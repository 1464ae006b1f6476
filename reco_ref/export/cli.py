"""``reco-ref export-clip`` and ``export-fusion``: argument parsing only
(logic: :mod:`reco_ref.export.clip`, :mod:`reco_ref.export.fusion`).

Registering the verbs imports nothing heavy; torch, open_clip and onnx are imported when a verb runs, and their
absence is a one-line error naming the extra (``clip-export``, ``export``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..checks import int_option
from ..options import add_weights
from ..paths import add_overwrite_option, check_output_dir, printable


def register(sub) -> None:
    e = sub.add_parser(
        "export-clip",
        help="export an OpenCLIP / OpenAI CLIP model to an ONNX encoder pair + encoder.json (needs the clip-export extra)",
        description="Export open_clip.create_model(MODEL, pretrained=PRETRAINED) to OUT/{image.onnx,text.onnx,encoder.json}. "
        "Needs torch and open_clip_torch (pip install 'reco_ref[clip-export]'); PRETRAINED is a tag open_clip "
        "knows (fetched by open_clip into its cache) or a local checkpoint file.",
    )
    e.add_argument("--model", required=True, help="open_clip architecture, e.g. ViT-B-32")
    e.add_argument("--pretrained", default=None, help="open_clip pretrained tag or checkpoint path (default: none = random init)")
    e.add_argument("--out", required=True, help="output folder")
    e.add_argument("--name", default=None, help="encoder name in encoder.json (default: derived from model/pretrained)")
    e.add_argument("--opset", type=int_option(7, 30), default=17, help="ONNX opset, 7 … 30 (default 17)")
    e.add_argument("--seed", type=int_option(0, 2**32 - 1), default=0,
                   help="torch seed for random init (pretrained none), 0 … 2³²−1")
    add_overwrite_option(e, what="OUT's image.onnx, text.onnx and encoder.json")
    e.set_defaults(func=_export_clip)

    p = sub.add_parser(
        "export-fusion",
        help="write the fusion modules φ_I / φ_T of a weights file as ONNX graphs (needs the export extra: onnx)",
        description="Read a fusion parameter set (image.*, text.*, logit_scale; reco_ref.fusion.save_param_set) and "
        "write OUT/phi_<module>.onnx per module (inputs query [B,D], retrieved [B,k,D], mask [B,k] bool, and for a "
        "module with the relevance bias scores [B,k] float32 = (cosine - center)/width, the map in the graph's "
        "metadata; output out [B,D]; B and k dynamic, k = 0 allowed) plus OUT/fusion_onnx.json (configs, weight hashes, logit_scale). "
        "Run them with fusion backend 'onnx' (reco_ref.fusion.onnx_backend.attach(OUT, modules)): onnxruntime + numpy only.",
    )
    add_weights(p, required=True, help="fusion parameter set (.npz)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--modules", type=_module_list, default=None, metavar="LIST",
                   help="comma list of the modules to export, e.g. 'image' for φ_I alone (default: all of the file's)")
    add_overwrite_option(p, what="DIR's phi_*.onnx and fusion_onnx.json")
    p.set_defaults(func=_export_fusion)


def _module_list(text: str) -> list[str]:
    """An argparse type: a comma list of fusion module names (``image``, ``text``)."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in ("image", "text")]
    if not names or bad:
        raise argparse.ArgumentTypeError(f"expected a comma list of image, text; got {text!r}")
    return names


def _export_clip(args: argparse.Namespace) -> int:
    from .clip import export_open_clip

    # checked before torch is imported or a model built: the export writes these three files into OUT
    check_output_dir(args.out, ("image.onnx", "text.onnx", "encoder.json"), overwrite=args.overwrite)
    cfg = export_open_clip(args.model, args.pretrained, args.out, name=args.name, opset=args.opset, seed=args.seed)
    print(f"{args.out}: exported {cfg['name']} (embed_dim {cfg['embed_dim']}); load it with reco_ref.encoders.load({args.out!r})")
    return 0


def _export_fusion(args: argparse.Namespace) -> int:
    from .fusion import MANIFEST, export_fusion

    from ..io import require_file

    # before the weights are read: the folder (export_fusion checks the graph files, named by the weights' modules)
    # and the input (a named pipe would block the read, a device never end it)
    check_output_dir(args.out, [MANIFEST], overwrite=args.overwrite)
    require_file(Path(args.fusion))
    manifest = export_fusion(args.fusion, args.out, overwrite=args.overwrite, modules=args.modules)
    for prefix, m in manifest["modules"].items():  # module and extra names come from the weights file: escaped
        print(printable(f"{args.out}/{m['file']}: φ_{prefix} (D={m['dim']}, heads={m['heads']}, "
                        f"mlp_ratio={m['mlp_ratio']}, weights sha256 {m['params_sha256'][:12]})"))
    print(printable(f"{args.out}/{MANIFEST}: manifest (extras: {', '.join(manifest['extras']) or 'none'})"))
    return 0
