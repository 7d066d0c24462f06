"""Data: sources read through DuckDB, the data contract, content fingerprints, the transaction simulator."""

from keel.data.contracts import ContractReport, Finding, check_contract
from keel.data.fingerprint import fingerprint_frame, fingerprint_source
from keel.data.simulate import Shift, Simulation, make_shift, simulate, write_simulation
from keel.data.sources import Source, open_source, require_columns, source_from_spec

__all__ = [
    "ContractReport",
    "Finding",
    "Shift",
    "Simulation",
    "Source",
    "check_contract",
    "fingerprint_frame",
    "fingerprint_source",
    "make_shift",
    "open_source",
    "require_columns",
    "simulate",
    "source_from_spec",
    "write_simulation",
]
