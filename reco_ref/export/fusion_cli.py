"""``reco-ref export-fusion``: argument parsing only (logic: :mod:`reco_ref.export.fusion`)."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser(
        "export-fusion",
        help="write the fusion modules φ_I / φ_T of a weights file as ONNX graphs (needs the export extra: onnx)",
        description="Read a fusion parameter set (image.*, text.*, logit_scale; reco_ref.fusion.save_param_set) and "
        "write OUT/phi_<module>.onnx per module (inputs query [B,D], retrieved [B,k,D], mask [B,k] bool; output "
        "out [B,D]; B and k dynamic, k = 0 allowed) plus OUT/fusion_onnx.json (configs, weight hashes, logit_scale). "
        "Run them with fusion backend 'onnx' (reco_ref.fusion.onnx_backend.attach(OUT, modules)): onnxruntime + numpy only.",
    )
    p.add_argument("--fusion", required=True, metavar="WEIGHTS", help="fusion parameter set (.npz)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.set_defaults(func=_export_fusion)


def _export_fusion(args: argparse.Namespace) -> int:
    from .fusion import MANIFEST, export_fusion

    manifest = export_fusion(args.fusion, args.out)
    for prefix, m in manifest["modules"].items():
        print(f"{args.out}/{m['file']}: φ_{prefix} (D={m['dim']}, heads={m['heads']}, mlp_ratio={m['mlp_ratio']}, "
              f"weights sha256 {m['params_sha256'][:12]})")
    print(f"{args.out}/{MANIFEST}: manifest (extras: {', '.join(manifest['extras']) or 'none'})")
    return 0
