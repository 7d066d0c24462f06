"""Typed errors. Library code raises these; only ``keel.cli`` turns them into text and exit codes."""

from __future__ import annotations


class KeelError(Exception):
    """Base of every error Keel raises on purpose.

    ``message`` says what is wrong and where; ``hint`` says how to fix it. ``exit_code`` is what the CLI
    returns (2 = bad input or configuration, 1 = a check found problems).
    """

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} {self.hint}"


class SpecError(KeelError):
    """keel.toml is missing, malformed or inconsistent."""


class DataError(KeelError):
    """A data source cannot be read or does not have the shape the spec expects."""


class ContractViolation(DataError):
    """Data was read but breaks the contract (nulls, ranges, duplicates, future timestamps...)."""

    exit_code = 1


class FeatureError(KeelError):
    """A feature definition cannot be computed (unknown column, bad window, schema change)."""


class TrainingError(KeelError):
    """Training or evaluation cannot produce an honest result."""


class LeakageError(TrainingError):
    """A severe leakage finding stopped training."""


class RegistryError(KeelError):
    """Tracking or registry operation failed or was refused."""


class IntegrityError(RegistryError):
    """An artifact does not match its manifest (tampered, truncated or swapped)."""


class ServingError(KeelError):
    """The service cannot start or answer."""


class ScoringError(KeelError):
    """A batch scoring job cannot run."""


class MonitorError(KeelError):
    """Monitoring cannot compute what it was asked for."""


__all__ = [
    "ContractViolation",
    "DataError",
    "FeatureError",
    "IntegrityError",
    "KeelError",
    "LeakageError",
    "MonitorError",
    "RegistryError",
    "ScoringError",
    "ServingError",
    "SpecError",
    "TrainingError",
]
