"""Errors of the offline half (sleep workers, registry, retraction, rollback)."""

from __future__ import annotations

from infra.errors import SomnaError


class ConsolidationError(SomnaError):
    """Base of the errors raised by ``consolidation``."""


class ArtifactRejected(ConsolidationError):
    """A fast-weights artifact failed a check (sha256, scope, lineage) and must not be served."""


class VersionNotFound(ConsolidationError):
    """A scope or version that the registry does not hold."""


class BaseModelMissing(ConsolidationError):
    """No base model is registered and no shipped checkpoint can be found to register."""


class InvalidJob(ConsolidationError):
    """A sleep job that cannot be run as given (the worker dead-letters it)."""


class HistoryError(ConsolidationError):
    """The Parquet history cannot be read or rewritten as needed."""
