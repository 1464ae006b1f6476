"""Launch configuration of the CUDA kernels (tile edge, threads per block, kernel versions).

Tile sizes are parameters, not constants baked into the kernels: kernels that need compile-time
sizes (shared-memory tiles) are built by small factories keyed by those sizes and cached.  Under the
CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``: every GPU thread is a Python thread) the default
configuration uses tiny blocks so the test-suite stays fast; on a real GPU it uses sizes that fill
the streaming multiprocessors.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from numba import config as _numba_config

__all__ = ["KernelConfig", "SIMULATOR", "get_config", "set_config"]

#: True when numba runs CUDA kernels in its Python simulator (no GPU, or forced for tests).
SIMULATOR = bool(_numba_config.ENABLE_CUDASIM)


@dataclass(frozen=True)
class KernelConfig:
    """How kernels are launched.

    Attributes
    ----------
    tile : int
        GEMM tile edge: a ``tile × tile`` block computes a ``tile × tile`` output tile (v2), or
        ``(tile·reg) × (tile·reg)`` with the register-blocked v3.
    reg : int
        Outputs per thread along each axis in the register-blocked GEMM (v3).
    threads : int
        Threads per block for row kernels (LayerNorm, L2 norm, softmax, attention, reductions);
        a power of two (block tree reductions halve it).
    gemm_version : int
        1 = naive (one thread per output), 2 = shared-memory tiles, 3 = tiles + register blocking.
    ln_version : int
        1 = one thread per row, 2 = one block per row with a shared-memory tree reduction.
    reduce_chunks : int
        Row chunks of the two-stage column reduction (bias gradients).
    """

    tile: int = 16
    reg: int = 4
    threads: int = 128
    gemm_version: int = 3
    ln_version: int = 2
    reduce_chunks: int = 64

    def __post_init__(self):
        for name in ("tile", "reg", "threads", "reduce_chunks"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"KernelConfig.{name}: expected a positive int, got {v!r}")
        if self.threads & (self.threads - 1):
            raise ValueError(f"KernelConfig.threads: expected a power of two, got {self.threads}")
        if self.tile * self.tile > 1024:
            raise ValueError(f"KernelConfig.tile: tile² = {self.tile ** 2} exceeds 1024 threads per block")
        if self.gemm_version not in (1, 2, 3):
            raise ValueError(f"KernelConfig.gemm_version: expected 1, 2 or 3, got {self.gemm_version}")
        if self.ln_version not in (1, 2):
            raise ValueError(f"KernelConfig.ln_version: expected 1 or 2, got {self.ln_version}")

    def with_(self, **changes) -> "KernelConfig":
        """A copy with some fields changed."""
        return replace(self, **changes)


_DEFAULT = (KernelConfig(tile=4, reg=2, threads=8, reduce_chunks=2) if SIMULATOR
            else KernelConfig())  # fmt: skip
_current = [_DEFAULT]


def get_config() -> KernelConfig:
    """The configuration used when a call passes none."""
    return _current[0]


def set_config(cfg: KernelConfig | None) -> KernelConfig:
    """Set the default configuration (``None`` restores the built-in default); returns the old one."""
    old = _current[0]
    _current[0] = _DEFAULT if cfg is None else cfg
    return old
