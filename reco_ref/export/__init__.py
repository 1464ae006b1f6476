"""Build-time exporters: graphs written for other runtimes (ONNX). Needs the ``export`` extra (``onnx``); never imported at run time."""
