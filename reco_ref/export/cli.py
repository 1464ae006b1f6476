"""``reco-ref export-clip`` and ``export-fusion``: argument parsing only (logic: :mod:`reco_ref.export.clip`,
:mod:`reco_ref.export.fusion`).

Registering the verbs imports nothing heavy; torch, open_clip and onnx are imported when a verb runs, and their
absence is a one-line error naming the extra (``clip-export``, ``export``).
"""

from __future__ import annotations

import argparse


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
    e.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    e.add_argument("--seed", type=int, default=0, help="torch seed for random init (pretrained none)")
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
    p.add_argument("--fusion", required=True, metavar="WEIGHTS", help="fusion parameter set (.npz)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.set_defaults(func=_export_fusion)


def _export_clip(args: argparse.Namespace) -> int:
    from .clip import export_open_clip

    cfg = export_open_clip(args.model, args.pretrained, args.out, name=args.name, opset=args.opset, seed=args.seed)
    print(f"{args.out}: exported {cfg['name']} (embed_dim {cfg['embed_dim']}); load it with reco_ref.encoders.load({args.out!r})")
    return 0


def _export_fusion(args: argparse.Namespace) -> int:
    from .fusion import MANIFEST, export_fusion

    manifest = export_fusion(args.fusion, args.out)
    for prefix, m in manifest["modules"].items():
        print(f"{args.out}/{m['file']}: φ_{prefix} (D={m['dim']}, heads={m['heads']}, mlp_ratio={m['mlp_ratio']}, "
              f"weights sha256 {m['params_sha256'][:12]})")
    print(f"{args.out}/{MANIFEST}: manifest (extras: {', '.join(manifest['extras']) or 'none'})")
    return 0
