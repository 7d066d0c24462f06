"""Shared by the bench scripts: replace one marked section of bench/RESULTS.md, atomically."""

from __future__ import annotations

import platform
import re
import sys
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "RESULTS.md"
sys.path.insert(0, str(HERE.parent / "src"))

from keel.io import atomic_write_text  # noqa: E402


def machine() -> str:
    """One line naming where and when a result was measured."""
    import os

    return (f"Run {date.today():%Y-%m-%d} on {platform.machine()}, {os.cpu_count()} cores, "
            f"Python {platform.python_version()}.")


def write_section(name: str, body: str) -> Path:
    """Replace the text between ``<!-- name:start -->`` and ``<!-- name:end -->`` (append when absent)."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{body.rstrip()}\n{end}"
    text = RESULTS.read_text() if RESULTS.exists() else "# Bench results\n"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _m: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    return atomic_write_text(RESULTS, text)


def reference_dir() -> Path | None:
    """The handbook's published data, when present (../shared/data/fraud-handbook or $KEEL_REFERENCE_DIR)."""
    import os

    path = Path(os.environ.get("KEEL_REFERENCE_DIR") or HERE.parents[1] / "shared" / "data" / "fraud-handbook")
    return path if (path / "simulated_raw_2018-04-01_2018-09-30.parquet").exists() else None
