"""Exceptions with one-line messages; the CLI prints them as `Error: ...` and exits non-zero."""


class CompactorError(Exception):
    """Base class: anything the user can fix (bad input, wrong model, damaged artifact)."""


class DocumentError(CompactorError):
    """A document is missing, empty, binary, or longer than the model's context."""


class ModelError(CompactorError):
    """A model name/folder/hub id cannot be resolved or loaded, or its family is unsupported."""


class ArtifactError(CompactorError):
    """An .h5 artifact is missing, truncated, corrupted, of an unknown version, or made for another model."""


class CalibrationError(ArtifactError):
    """A calibration file is missing, damaged, invalid, or made for another model."""
