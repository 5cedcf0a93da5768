"""Errors raised by the model package.

model/ depends on torch only (it must run alone on a GPU machine), so it has its own base
error instead of ``infra.errors.SomnaError``. Callers outside model/ catch ``ModelError``.
"""

from __future__ import annotations


class ModelError(Exception):
    """Base of every error raised on purpose by model/."""


class ConfigError(ModelError, ValueError):
    """A ``HybridConfig`` field has a bad value; the message names the field and value."""


class InputError(ModelError, ValueError):
    """Tokens, lengths or tensors handed to the model are malformed."""


class EmptyChunkError(InputError):
    """A sleep (or wake) was asked to run over zero tokens."""


class DuplicateEventError(InputError):
    """wake(offset=...) got an offset not after the last one recorded (a redelivery)."""


class StateMismatchError(ModelError, ValueError):
    """A MemoryState or fast-weight artifact belongs to a different model config."""


class WatermarkError(ModelError, ValueError):
    """Swapping in fast weights would open a gap in the scope's history."""


class ArtifactError(ModelError):
    """A fast-weight artifact is unreadable, tampered with, or fails its sha256 check."""
