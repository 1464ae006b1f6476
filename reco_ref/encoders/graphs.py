"""The ONNX graphs of an encoder pair: execution providers, sessions, the checks of each graph's inputs and
outputs against ``encoder.json``, and running a graph that fixes its batch size.

Shapes: N items, L tokens, D = ``embed_dim``. A graph that does not match its config raises
:class:`EncoderConfigError` naming the graph file, the config field, what was expected and what was found.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple, Sequence

import numpy as np

from ..errors import EncoderConfigError
from .config import EncoderConfig

#: ONNX Runtime element types the pair accepts -> the NumPy dtype fed to / read from the graph
ORT_FLOAT = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}
ORT_INT = {"tensor(int64)": np.int64, "tensor(int32)": np.int32}


def choose_providers(providers: Sequence[str] | None) -> list[str]:
    """CUDA first when onnxruntime-gpu offers it, CPU always (last, as the fallback)."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if providers is None:
        chosen = ["CUDAExecutionProvider"] if "CUDAExecutionProvider" in available else []
    else:
        if isinstance(providers, str):
            providers = [providers]
        missing = [p for p in providers if p not in available]
        if missing:
            raise EncoderConfigError(
                f"providers: {', '.join(missing)} not available in this onnxruntime (available: {', '.join(available)})"
            )
        chosen = [p for p in providers if p != "CPUExecutionProvider"]
    return chosen + ["CPUExecutionProvider"]


def make_session(path: Path, threads: int | None, providers: list[str]):
    """An InferenceSession with ``threads`` intra-op threads (None: ONNX Runtime's default, all cores)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise EncoderConfigError(f"threads: expected a positive integer or None, found {threads!r}")
        opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1  # encoder graphs are chains; parallelism is inside the ops
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=providers)
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types
        raise EncoderConfigError(f"{path}: ONNX Runtime cannot load the graph ({type(exc).__name__}: {exc})") from None


class _IO(NamedTuple):
    dtype: str  # e.g. 'tensor(float)'
    shape: list  # ints for static dims, str/None for symbolic


def graph_io(session) -> tuple[dict[str, _IO], dict[str, _IO]]:
    ins = {a.name: _IO(a.type, list(a.shape)) for a in session.get_inputs()}
    outs = {a.name: _IO(a.type, list(a.shape)) for a in session.get_outputs()}
    return ins, outs


def _static(d: Any) -> int | None:
    return d if isinstance(d, int) and d > 0 else None


def _expect(cond: bool, path: Path, field: str, expected: str, found: Any) -> None:
    if not cond:
        raise EncoderConfigError(f"{path}: '{field}': expected {expected}, found {found}")


def check_image_graph(session, cfg: EncoderConfig, path: Path) -> tuple[int | None, int | None]:
    """Validate the image graph against ``cfg.image``; returns (static batch size or None, key dim or None)."""
    im = cfg.image
    ins, outs = graph_io(session)
    _expect(im.input in ins, path, "image.input", f"a graph input named {im.input!r}", f"inputs {sorted(ins)}")
    extra = sorted(set(ins) - {im.input})
    _expect(not extra, path, "image.input", "the only required graph input", f"further required inputs {extra}")
    spec = ins[im.input]
    _expect(spec.dtype in ORT_FLOAT, path, "image.input", "a float input", spec.dtype)
    _expect(len(spec.shape) == 4, path, "image.input", f"rank 4 ({im.layout})", f"shape {spec.shape}")
    want = [None, 3, im.size, im.size] if im.layout == "NCHW" else [None, im.size, im.size, 3]
    for axis in (1, 2, 3):
        got = _static(spec.shape[axis])
        _expect(got is None or got == want[axis], path, "image.input",
                f"shape [N,{','.join(str(w) for w in want[1:])}] for layout {im.layout} and size {im.size}",
                f"shape {spec.shape}")
    for field, name in (("image.output", im.output), ("image.key_output", im.key_output)):
        if name is None:
            continue
        _expect(name in outs, path, field, f"a graph output named {name!r}", f"outputs {sorted(outs)}")
        o = outs[name]
        _expect(o.dtype in ORT_FLOAT, path, field, "a float output", o.dtype)
        _expect(len(o.shape) == 2, path, field, "rank 2 [N,D]", f"shape {o.shape}")
    d = _static(outs[im.output].shape[1])
    _expect(d is None or d == cfg.embed_dim, path, "embed_dim", f"image output last dim == embed_dim {cfg.embed_dim}", d)
    key_dim = _static(outs[im.key_output].shape[1]) if im.key_output else None
    return _static(spec.shape[0]), key_dim


def check_text_graph(session, cfg: EncoderConfig, path: Path) -> tuple[int | None, int | None]:
    """Validate the text graph against ``cfg.text``; returns (static batch, static sequence length)."""
    tx = cfg.text
    ins, outs = graph_io(session)
    named = {role: name for role, name in tx.inputs.items() if name is not None}
    for role, name in named.items():
        _expect(name in ins, path, f"text.inputs.{role}", f"a graph input named {name!r}", f"inputs {sorted(ins)}")
    extra = sorted(set(ins) - set(named.values()))
    _expect(not extra, path, "text.inputs", "every required graph input named in the config", f"unnamed inputs {extra}")
    batch = seq = None
    for role, name in named.items():
        spec = ins[name]
        _expect(spec.dtype in ORT_INT, path, f"text.inputs.{role}", "an int64 or int32 input", spec.dtype)
        _expect(len(spec.shape) == 2, path, f"text.inputs.{role}", "rank 2 [N,L]", f"shape {spec.shape}")
        batch = batch or _static(spec.shape[0])
        seq = seq or _static(spec.shape[1])
    _expect(seq is None or seq == tx.context_length, path, "text.context_length",
            f"the graph's static sequence length {seq}", tx.context_length)
    _expect(tx.output in outs, path, "text.output", f"a graph output named {tx.output!r}", f"outputs {sorted(outs)}")
    o = outs[tx.output]
    _expect(o.dtype in ORT_FLOAT, path, "text.output", "a float output", o.dtype)
    rank = 2 if tx.pooling == "none" else 3
    _expect(len(o.shape) == rank, path, "text.output",
            f"rank {rank} ({'[N,D]' if rank == 2 else '[N,L,D]'} for pooling {tx.pooling!r})", f"shape {o.shape}")
    d = _static(o.shape[-1])
    _expect(d is None or d == cfg.embed_dim, path, "embed_dim", f"text output last dim == embed_dim {cfg.embed_dim}", d)
    return batch, seq


def run_in_batches(session, feeds: dict[str, np.ndarray], outputs: list[str], static_batch: int | None) -> list[np.ndarray]:
    """Run once, or in exact chunks of ``static_batch`` (zero-padding the last) when the graph fixes N."""
    n = next(iter(feeds.values())).shape[0]
    if static_batch is None or static_batch == n:
        return session.run(outputs, feeds)
    parts: list[list[np.ndarray]] = [[] for _ in outputs]
    for s in range(0, n, static_batch):
        chunk = {k: v[s : s + static_batch] for k, v in feeds.items()}
        m = next(iter(chunk.values())).shape[0]
        if m < static_batch:
            chunk = {k: np.concatenate([v, np.zeros((static_batch - m,) + v.shape[1:], v.dtype)]) for k, v in chunk.items()}
        for j, y in enumerate(session.run(outputs, chunk)):
            parts[j].append(y[:m])
    return [np.concatenate(p) for p in parts]
