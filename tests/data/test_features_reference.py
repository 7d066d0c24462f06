"""Reference check: Keel's offline pipeline reproduces the fraud handbook's 14 published features exactly.

The flagship spec (examples/card-fraud/keel.toml) declares the handbook's features; computed from the raw
columns of ``simulated_transformed_2018-04-01_2018-09-30.parquet`` they must equal the file's own feature
columns to 1e-9 on all 1,754,155 rows.

Ties. The handbook sorts each customer's transactions with pandas' default ``sort_values`` (an unstable
quicksort), then runs a time-based ``rolling``, which counts same-second transactions only once they come
earlier in that sorted order. Keel's rule is the same ("earlier in event order counts"), with event order =
input order; on 10 of the 29 same-customer same-second pairs the handbook's quicksort reversed the
TRANSACTION_ID order, so this test feeds the rows in the handbook's own per-customer order. Terminal windows
end 7 days before the event, so their ties never matter.
"""

from __future__ import annotations

from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pytest

from keel.features.definitions import WindowDefinition, feature_names, resolve_definitions
from keel.features.offline import compute_features
from keel.spec import load_spec

pytestmark = pytest.mark.reference

FLAGSHIP = Path(__file__).resolve().parents[2] / "examples" / "card-fraud" / "keel.toml"
FILE = "simulated_transformed_2018-04-01_2018-09-30.parquet"
RAW = ["TRANSACTION_ID", "TX_DATETIME", "CUSTOMER_ID", "TERMINAL_ID", "TX_AMOUNT", "TX_FRAUD"]


@pytest.fixture(scope="module")
def reference(reference_dir: Path) -> pd.DataFrame:
    spec = load_spec(FLAGSHIP)
    published = [
        n.upper() for n in feature_names(resolve_definitions(spec.features, spec.data)) if n != "tx_amount"
    ]
    con = duckdb.connect()
    cols = ", ".join(RAW + published)
    frame = con.execute(
        f"select {cols} from read_parquet(?) order by TRANSACTION_ID", [str(reference_dir / FILE)]
    ).df()
    con.close()
    assert len(frame) == 1_754_155 and len(published) == 14
    return frame


def handbook_order(frame: pd.DataFrame) -> np.ndarray:
    """Row positions in the handbook's event order: TRANSACTION_ID order, same-customer ties as its sort left them."""
    order = np.arange(len(frame))
    tied = frame.duplicated(["CUSTOMER_ID", "TX_DATETIME"], keep=False)
    for customer in frame.loc[tied, "CUSTOMER_ID"].unique():
        rows = frame[frame["CUSTOMER_ID"] == customer]
        handbook = rows.sort_values("TX_DATETIME")  # what the handbook's per-customer function does
        for _, group in handbook[handbook.duplicated("TX_DATETIME", keep=False)].groupby(
            "TX_DATETIME", sort=False
        ):
            positions = np.sort(group.index.to_numpy())
            order[positions] = group.index.to_numpy()
    return order


def test_offline_pipeline_reproduces_the_handbook_features(reference: pd.DataFrame) -> None:
    spec = load_spec(FLAGSHIP)
    defs = resolve_definitions(spec.features, spec.data)
    order = handbook_order(reference)
    assert (order != np.arange(len(order))).sum() == 20  # the 10 reversed pairs described above
    ordered = reference.iloc[order].reset_index(drop=True)
    raw = ordered[RAW].rename(columns=str.lower)
    out = compute_features(raw, defs, timestamp="tx_datetime", label="tx_fraud", id_column="transaction_id")
    for name in feature_names(defs):
        expected = ordered[name.upper()].to_numpy(dtype=np.float64)
        got = out[name].to_numpy()
        worst = np.max(np.abs(got - expected))
        assert worst <= 1e-9, f"{name}: max abs difference {worst}"


def test_tie_order_is_the_only_difference_from_transaction_id_order(reference: pd.DataFrame) -> None:
    spec = load_spec(FLAGSHIP)
    customer = [
        d
        for d in resolve_definitions(spec.features, spec.data)
        if isinstance(d, WindowDefinition) and d.entity == "customer_id"
    ]
    raw = reference[RAW].rename(columns=str.lower)
    out = compute_features(raw, customer, timestamp="tx_datetime", label="tx_fraud")
    tied = reference.duplicated(["CUSTOMER_ID", "TX_DATETIME"], keep=False).to_numpy()
    for d in customer:
        diff = np.abs(out[d.name].to_numpy() - reference[d.name.upper()].to_numpy())
        assert diff[~tied].max() <= 1e-9, d.name
        assert 0 < (diff[tied] > 1e-9).sum() <= 20, d.name
