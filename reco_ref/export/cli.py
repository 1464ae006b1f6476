"""``reco-ref export-clip``: argument parsing only (logic: :mod:`reco_ref.export.clip`).

Registering the verb imports nothing heavy; torch and open_clip are imported when the verb runs, and their
absence is a one-line error naming the ``clip-export`` extra.
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


def _export_clip(args: argparse.Namespace) -> int:
    from .clip import export_open_clip

    cfg = export_open_clip(args.model, args.pretrained, args.out, name=args.name, opset=args.opset, seed=args.seed)
    print(f"{args.out}: exported {cfg['name']} (embed_dim {cfg['embed_dim']}); load it with reco_ref.encoders.load({args.out!r})")
    return 0
