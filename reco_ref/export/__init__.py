"""Export: tools that write ONNX graphs from other frameworks' models.

They need the export extras (``clip-export``: torch, open_clip_torch, onnx) and are never imported at run
time: the folders they write are loaded by the runtime rooms (:func:`reco_ref.encoders.load` for an encoder
pair), which need only ONNX Runtime.

* :mod:`reco_ref.export.clip` — an OpenCLIP / OpenAI CLIP model → ``image.onnx`` + ``text.onnx`` +
  ``encoder.json`` (verb ``reco-ref export-clip``, :mod:`reco_ref.export.cli`).
* ``reco_ref/export/fusion.py`` (planned, added by the edge-deployment work) — trained fusion weights → ONNX.

Build-only converters used solely by the rebuild scripts (the TF GraphDef → ONNX converter of reco-mini)
live in ``scripts/tools/``, not here. Nothing is imported by this ``__init__``: ``import reco_ref.export``
stays free of torch.
"""
