"""The default-size simulation against the handbook's published dataset (1,754,155 transactions)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from scipy.stats import ks_2samp

from keel.data.simulate import simulate

pytestmark = pytest.mark.reference

REFERENCE_FILE = "simulated_raw_2018-04-01_2018-09-30.parquet"


@pytest.fixture(scope="module")
def published(reference_dir: Path) -> pd.DataFrame:
    return pd.read_parquet(
        reference_dir / REFERENCE_FILE, columns=["TX_TIME_DAYS", "TX_AMOUNT", "TX_FRAUD", "TX_FRAUD_SCENARIO"]
    )


@pytest.fixture(scope="module")
def ours(reference_dir: Path) -> pd.DataFrame:
    # Depends on reference_dir so that a missing dataset skips before the simulation runs.
    return simulate(seed=0).transactions


def _relative_gap(ours: float, theirs: float) -> float:
    return abs(ours - theirs) / theirs


def test_transactions_per_day_match_the_handbook(ours: pd.DataFrame, published: pd.DataFrame) -> None:
    theirs = len(published) / (published["TX_TIME_DAYS"].max() + 1)
    assert _relative_gap(len(ours) / 183, theirs) < 0.10
    # Every day, not just on average: the daily counts sit in the same band.
    daily = ours.groupby(ours["tx_datetime"].dt.normalize()).size()
    assert len(daily) == 183
    assert ((daily - theirs).abs() / theirs).max() < 0.10


def test_fraud_rate_matches_the_handbook(ours: pd.DataFrame, published: pd.DataFrame) -> None:
    assert _relative_gap(ours["tx_fraud"].mean(), published["TX_FRAUD"].mean()) < 0.10


@pytest.mark.parametrize("scenario", [1, 2, 3])
def test_scenario_shares_match_the_handbook(
    ours: pd.DataFrame, published: pd.DataFrame, scenario: int
) -> None:
    our_share = (ours["tx_fraud_scenario"] == scenario).sum() / ours["tx_fraud"].sum()
    their_share = (published["TX_FRAUD_SCENARIO"] == scenario).sum() / published["TX_FRAUD"].sum()
    assert _relative_gap(our_share, their_share) < 0.10


def test_amount_distribution_matches_the_handbook(ours: pd.DataFrame, published: pd.DataFrame) -> None:
    assert ks_2samp(ours["tx_amount"], published["TX_AMOUNT"]).statistic < 0.02
    # The fraud amounts too (scenario 3's x5 tail), more loosely: they are 1 % of the data.
    ours_fraud = ours.loc[ours["tx_fraud"] == 1, "tx_amount"]
    their_fraud = published.loc[published["TX_FRAUD"] == 1, "TX_AMOUNT"]
    assert ks_2samp(ours_fraud, their_fraud).statistic < 0.05
