"""One error type per failure family.

Every message names the thing that is wrong (file, field, array), what was expected and what
was found, so a user can act on it without reading the code.  All inherit from
:class:`RecoError`, which itself is a :class:`ValueError` so generic callers still catch them.
"""


class RecoError(ValueError):
    """Base class of every error this package raises on bad input or bad files."""


class ShapeError(RecoError):
    """An array has the wrong shape, dtype, or holds NaN/inf where finite values are required."""


class ParamsFormatError(RecoError):
    """A parameter file (.npz + JSON header) is missing entries, has wrong shapes/dtypes, or is corrupt."""


class EncoderConfigError(RecoError):
    """An encoder config or ONNX graph does not match what the config promises."""


class ImageDecodeError(RecoError):
    """An image could not be read or decoded (corrupt, truncated, too large, unsupported)."""


class TokenizerError(RecoError):
    """A tokenizer vocabulary / merges file is missing or malformed."""


class MemoryFormatError(RecoError):
    """A memory directory is incomplete, corrupt, or does not match the encoder in use."""


class SearchError(RecoError):
    """A search request cannot be answered as asked (bad k, wrong modality, dimension mismatch)."""


class CheckpointError(RecoError):
    """A training checkpoint is missing, corrupt, or belongs to a different run configuration."""


class BackendUnavailableError(RecoError, ImportError):
    """A compute backend (``numba``, ``cuda``) is unknown, not installed, or has no usable device.

    Also an :class:`ImportError`, so ``except ImportError`` around optional backends keeps working.
    """


class DatasetError(RecoError):
    """A dataset manifest (``file,label,class_name,split``) is unreadable, malformed, or lacks the asked split."""
