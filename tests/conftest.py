"""Shared fixtures. The handbook reference data is optional on a user's machine and required in CI."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REFERENCE_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "fraud-handbook"


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """The published handbook dataset; skipped with a clear reason locally, a failure in CI when absent."""
    override = os.environ.get("KEEL_REFERENCE_DIR")
    path = Path(override) if override else REFERENCE_DIR
    if not (path / "simulated_raw_2018-04-01_2018-09-30.parquet").exists():
        message = (
            f"Handbook reference data not found at {path}; reference checks did not run. "
            "Set KEEL_REFERENCE_DIR or place ../shared/data/fraud-handbook beside the checkout."
        )
        if os.environ.get("CI"):
            pytest.fail(message + " CI must have it.")
        pytest.skip(message)
    return path
