"""Domain exceptions. Each message says what went wrong and what to do about it."""


class CdccaError(Exception):
    """Base class of every error CD-CCA raises on purpose."""


class ModelNotFoundError(CdccaError, FileNotFoundError):
    """A model directory is missing or is not a checkpoint (nothing is ever downloaded at run time)."""


class CheckpointError(CdccaError, ValueError):
    """A checkpoint directory exists but cannot be used (wrong format, mismatched pair, corrupt file)."""
