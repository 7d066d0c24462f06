"""Statistics the simulator's generative process implies, on a small world (500 x 1000 x 60 days)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from keel.data.simulate import Shift, Simulation, make_shift, simulate, write_simulation
from keel.errors import DataError

SMALL = {"n_customers": 500, "n_terminals": 1000, "n_days": 60, "radius": 5.0}
SEED = 11


@pytest.fixture(scope="module")
def sim() -> Simulation:
    return simulate(**SMALL, seed=SEED)


@pytest.fixture(scope="module")
def tx(sim: Simulation) -> pd.DataFrame:
    """Transactions joined with their customer's profile and day index."""
    t = sim.transactions.merge(sim.customers, on="customer_id", how="left")
    t["day"] = (t["tx_datetime"] - sim.start_date).dt.days
    return t


def _reachable(sim: Simulation) -> np.ndarray:
    """Brute-force customer x terminal reach matrix (distance < radius)."""
    c = sim.customers[["x", "y"]].to_numpy()
    t = sim.terminals[["x", "y"]].to_numpy()
    return np.hypot(c[:, None, 0] - t[None, :, 0], c[:, None, 1] - t[None, :, 1]) < sim.radius


def _keep_probability() -> float:
    """P(0 < int(N(43200, 20000)) < 86400): the share of drawn times that survive."""
    return float(stats.norm.cdf(86400, 43200, 20000) - stats.norm.cdf(1, 43200, 20000))


# --- shape and order -------------------------------------------------------------------------------------


def test_transactions_have_the_documented_columns_types_and_order(sim: Simulation) -> None:
    t = sim.transactions
    assert list(t.columns) == [
        "transaction_id",
        "tx_datetime",
        "customer_id",
        "terminal_id",
        "tx_amount",
        "tx_fraud",
        "tx_fraud_scenario",
    ]
    assert t["transaction_id"].dtype == np.int64
    assert t["tx_datetime"].dtype == np.dtype("datetime64[ns]")
    assert t["customer_id"].dtype == np.int64 and t["terminal_id"].dtype == np.int64
    assert t["tx_amount"].dtype == np.float64
    assert np.array_equal(t["transaction_id"].to_numpy(), np.arange(len(t)))
    assert t["tx_datetime"].is_monotonic_increasing
    assert set(t["tx_fraud"].unique()) == {0, 1}
    assert set(t["tx_fraud_scenario"].unique()) == {0, 1, 2, 3}
    assert ((t["tx_fraud"] == 1) == (t["tx_fraud_scenario"] > 0)).all()
    assert t["tx_datetime"].min() >= pd.Timestamp("2018-04-01")
    assert t["tx_datetime"].max() < pd.Timestamp("2018-04-01") + pd.Timedelta(days=60)
    # Amounts are in cents.
    assert np.allclose(t["tx_amount"] * 100, np.round(t["tx_amount"] * 100), atol=1e-6)
    assert list(sim.customers.columns) == [
        "customer_id",
        "x",
        "y",
        "mean_amount",
        "std_amount",
        "mean_nb_tx_per_day",
        "nb_terminals",
    ]
    assert list(sim.terminals.columns) == ["terminal_id", "x", "y"]


def test_profiles_follow_their_distributions(sim: Simulation) -> None:
    c, t = sim.customers, sim.terminals
    for col, lo, hi in (("x", 0, 100), ("y", 0, 100), ("mean_amount", 5, 100), ("mean_nb_tx_per_day", 0, 4)):
        assert stats.kstest(c[col], stats.uniform(lo, hi - lo).cdf).pvalue > 1e-3, col
    assert np.allclose(c["std_amount"], c["mean_amount"] / 2)
    for col in ("x", "y"):
        assert stats.kstest(t[col], stats.uniform(0, 100).cdf).pvalue > 1e-3, col


def test_summary_matches_the_frame(sim: Simulation) -> None:
    s = sim.summary()
    t = sim.transactions
    assert s["n_transactions"] == len(t)
    assert s["n_fraud"] == int(t["tx_fraud"].sum())
    assert sum(s["scenario_counts"].values()) == s["n_fraud"]
    assert s["scenario_counts"][2] == int((t["tx_fraud_scenario"] == 2).sum())
    assert s["fraud_rate"] == pytest.approx(t["tx_fraud"].mean())
    assert s["transactions_per_day"] == pytest.approx(len(t) / 60)
    assert sum(s["scenario_shares"].values()) == pytest.approx(1.0)
    assert (s["start_date"], s["end_date"]) == ("2018-04-01", "2018-05-30")


# --- transactions ----------------------------------------------------------------------------------------


def test_every_terminal_is_within_reach_of_its_customer(sim: Simulation, tx: pd.DataFrame) -> None:
    term = sim.terminals.set_index("terminal_id").loc[tx["terminal_id"]]
    dist = np.hypot(tx["x"].to_numpy() - term["x"].to_numpy(), tx["y"].to_numpy() - term["y"].to_numpy())
    assert (dist < sim.radius).all()
    assert np.array_equal(sim.customers["nb_terminals"].to_numpy(), _reachable(sim).sum(axis=1))


def test_terminal_is_uniform_among_the_reachable_ones(sim: Simulation, tx: pd.DataFrame) -> None:
    # Pooled Pearson chi-square over every customer's reachable terminals: ~1 per degree of freedom.
    reach = _reachable(sim)
    used = pd.crosstab(tx["customer_id"], tx["terminal_id"])
    chi2, dof = 0.0, 0
    for cid, row in used.iterrows():
        terminals = np.flatnonzero(reach[cid])
        observed = row.reindex(terminals, fill_value=0).to_numpy()
        expected = observed.sum() / len(terminals)
        chi2 += float(((observed - expected) ** 2 / expected).sum())
        dof += len(terminals) - 1
    assert dof > 1000
    assert abs(chi2 / dof - 1) < 4 * math.sqrt(2 / dof)


def test_customers_with_no_reachable_terminal_make_no_transaction() -> None:
    sparse = simulate(n_customers=200, n_terminals=20, n_days=20, seed=3)
    stranded = sparse.customers.loc[sparse.customers["nb_terminals"] == 0, "customer_id"]
    assert len(stranded) > 50
    assert not sparse.transactions["customer_id"].isin(stranded).any()
    assert len(sparse.transactions) > 0


def test_transaction_rate_per_customer_is_poisson_with_truncated_times(sim: Simulation) -> None:
    c = sim.customers[sim.customers["nb_terminals"] > 0]
    counts = sim.transactions["customer_id"].value_counts().reindex(c["customer_id"], fill_value=0).to_numpy()
    expected = c["mean_nb_tx_per_day"].to_numpy() * 60 * _keep_probability()
    # Total within 4 sigma of its Poisson expectation; without the truncation it would be 3 % (~9 sigma) higher.
    assert abs(counts.sum() - expected.sum()) < 4 * math.sqrt(expected.sum())
    # Per customer: Pearson dispersion of a Poisson is 1 (a constant count or a wrong rate is far from it).
    dispersion = float(((counts - expected) ** 2 / expected).mean())
    assert abs(dispersion - 1) < 4 * math.sqrt(2 / len(c))


def test_time_of_day_is_a_truncated_normal_around_noon(sim: Simulation) -> None:
    t = sim.transactions["tx_datetime"]
    seconds = (t - t.dt.normalize()).dt.total_seconds().to_numpy()
    assert seconds.min() > 0 and seconds.max() < 86400
    lo, hi = (1 - 43200) / 20000, (86400 - 43200) / 20000
    # int() truncation makes the times integers: compare x + 0.5 with the continuous law.
    assert stats.kstest(seconds + 0.5, stats.truncnorm(lo, hi, 43200, 20000).cdf).statistic < 0.01


def test_amounts_follow_each_customers_normal_with_negative_redraws(tx: pd.DataFrame) -> None:
    # Scenario 3 multiplies amounts; every other transaction keeps its customer's drawn amount.
    t = tx[tx["tx_fraud_scenario"] != 3]
    y = (t["tx_amount"] / t["mean_amount"]).to_numpy()
    p_negative = stats.norm.cdf(-2)

    def cdf(v: np.ndarray) -> np.ndarray:
        # amount / mean = 1 + Z / 2 when positive, else U(0, 2).
        return stats.norm.cdf((v - 1) / 0.5) - p_negative + p_negative * np.clip(v / 2, 0, 1)

    assert (y >= 0).all()
    assert stats.kstest(y, cdf).pvalue > 1e-3


# --- fraud -----------------------------------------------------------------------------------------------


def test_scenario1_is_exactly_amount_above_220_before_scenario3(tx: pd.DataFrame) -> None:
    kept = tx[tx["tx_fraud_scenario"] <= 1]
    assert ((kept["tx_amount"] > 220) == (kept["tx_fraud_scenario"] == 1)).all()
    assert (kept["tx_fraud_scenario"] == 1).sum() > 10
    # Scenario 3 comes after 1 (its x5 amounts above 220 are labelled 3, not 1), and 2 overwrites 1.
    assert ((tx["tx_fraud_scenario"] == 3) & (tx["tx_amount"] > 220)).sum() > 10


def test_scenario2_marks_terminals_for_28_day_windows(sim: Simulation, tx: pd.DataFrame) -> None:
    # Each day 2 of 1000 terminals start a 28-day compromise: a terminal is compromised on day d with
    # probability 1 - (1 - 2/T)^min(d + 1, 28); scenario 3 may later overwrite a few of them.
    p_day = 1 - (1 - 2 / 1000) ** np.minimum(np.arange(60) + 1, 28)
    expected = p_day[tx["day"]].sum()
    observed = (tx["tx_fraud_scenario"] == 2).sum()
    assert 0.75 * expected < observed < 1.2 * expected
    # Compromise is per terminal-day: on a day a terminal is compromised, none of its transactions is
    # genuine (scenario 3 may have taken some on top, scenario 1 none).
    flags = pd.DataFrame(
        {
            "terminal_id": tx["terminal_id"],
            "day": tx["day"],
            "s2": tx["tx_fraud_scenario"] == 2,
            "clean": tx["tx_fraud_scenario"] <= 1,
        }
    )
    day_state = flags.groupby(["terminal_id", "day"])[["s2", "clean"]].any()
    assert day_state["s2"].sum() > 100
    assert not (day_state["s2"] & day_state["clean"]).any()


def test_scenario3_takes_a_third_of_compromised_customers_transactions_times_five(
    sim: Simulation, tx: pd.DataFrame
) -> None:
    # Conditional on the transactions, each day 3 of C customers give floor(n/3) of their next 14 days.
    per_day = tx.groupby(["customer_id", "day"]).size().unstack(fill_value=0)
    per_day = per_day.reindex(columns=range(60), fill_value=0).to_numpy()
    window = np.stack([per_day[:, d : d + 14].sum(axis=1) for d in range(60)], axis=1)
    expected = (3 / 500) * (window // 3).sum()
    s3 = tx[tx["tx_fraud_scenario"] == 3]
    assert 0.75 * expected < len(s3) < 1.2 * expected
    ratio = (s3["tx_amount"] / s3["mean_amount"]).median()
    genuine = tx[tx["tx_fraud_scenario"] == 0]
    assert 4.0 < ratio < 6.5
    assert 0.85 < (genuine["tx_amount"] / genuine["mean_amount"]).median() < 1.15
    # Only compromised customers: with 3 of 500 drawn on 60 days, at most 180 distinct.
    assert 0 < s3["customer_id"].nunique() <= 180


def test_fraud_rate_and_scenario_shares_at_small_size(sim: Simulation) -> None:
    s = sim.summary()
    # Scenario 2 dominates (2 of 1000 terminals per day for 28 days), then 3, then 1 (amounts > 220 are rare).
    assert 0.04 < s["fraud_rate"] < 0.10
    shares = s["scenario_shares"]
    assert shares[2] > shares[3] > shares[1] > 0


# --- determinism -----------------------------------------------------------------------------------------


def test_same_seed_same_world(sim: Simulation) -> None:
    again = simulate(**SMALL, seed=SEED)
    pd.testing.assert_frame_equal(again.transactions, sim.transactions)
    pd.testing.assert_frame_equal(again.customers, sim.customers)
    pd.testing.assert_frame_equal(again.terminals, sim.terminals)


def test_different_seeds_differ(sim: Simulation) -> None:
    other = simulate(**SMALL, seed=SEED + 1)
    assert not other.customers[["x", "y"]].equals(sim.customers[["x", "y"]])
    assert not other.terminals[["x", "y"]].equals(sim.terminals[["x", "y"]])
    assert len(other.transactions) != len(sim.transactions) or not other.transactions.equals(sim.transactions)


# --- shift -----------------------------------------------------------------------------------------------

SHIFT_DAY = 30


def _before(frame: pd.DataFrame, day: int = SHIFT_DAY) -> pd.DataFrame:
    return frame[frame["tx_datetime"] < pd.Timestamp("2018-04-01") + pd.Timedelta(days=day)]


def _after(frame: pd.DataFrame, day: int = SHIFT_DAY) -> pd.DataFrame:
    return frame[frame["tx_datetime"] >= pd.Timestamp("2018-04-01") + pd.Timedelta(days=day)]


def test_amount_inflation_changes_amounts_from_its_start_day_only(sim: Simulation) -> None:
    shifted = simulate(**SMALL, seed=SEED, shift=Shift(start_day=SHIFT_DAY, amount_factor=1.5))
    a, b = sim.transactions, shifted.transactions
    pd.testing.assert_frame_equal(_before(a), _before(b))
    pd.testing.assert_frame_equal(shifted.customers, sim.customers)
    # Same transactions after the start, amounts x1.5 (rounded to cents).
    aa, bb = _after(a), _after(b)
    assert np.array_equal(aa["customer_id"].to_numpy(), bb["customer_id"].to_numpy())
    plain = (aa["tx_fraud_scenario"].to_numpy() != 3) & (bb["tx_fraud_scenario"].to_numpy() != 3)
    assert np.allclose(bb["tx_amount"].to_numpy()[plain], 1.5 * aa["tx_amount"].to_numpy()[plain], atol=0.011)
    # Scenario 1 keeps its meaning: its threshold moves with prices.
    kept = bb[bb["tx_fraud_scenario"] <= 1]
    assert ((kept["tx_amount"] > 220 * 1.5) == (kept["tx_fraud_scenario"] == 1)).all()
    assert ((kept["tx_amount"] > 220) & (kept["tx_fraud"] == 0)).sum() > 10


def test_extra_compromised_terminals_raise_scenario2_after_start_only(sim: Simulation) -> None:
    shifted = simulate(
        **SMALL, seed=SEED, shift=Shift(start_day=SHIFT_DAY, extra_compromised_terminals_per_day=4)
    )
    a, b = sim.transactions, shifted.transactions
    pd.testing.assert_frame_equal(_before(a), _before(b))
    s2_a = (_after(a)["tx_fraud_scenario"] == 2).sum()
    s2_b = (_after(b)["tx_fraud_scenario"] == 2).sum()
    assert s2_b > 2 * s2_a
    assert np.array_equal(_after(a)["tx_amount"], _after(b)["tx_amount"])


def test_card_testing_adds_small_far_away_frauds_from_start_day(sim: Simulation) -> None:
    shift = Shift(start_day=SHIFT_DAY, card_testing_cards_per_day=4, card_testing_tx_per_card=8)
    shifted = simulate(**SMALL, seed=SEED, shift=shift)
    a, b = sim.transactions, shifted.transactions
    pd.testing.assert_frame_equal(_before(a), _before(b))
    s4 = b[b["tx_fraud_scenario"] == 4]
    assert len(s4) == 4 * 8 * (60 - SHIFT_DAY)
    assert (s4["tx_fraud"] == 1).all()
    assert s4["tx_datetime"].min() >= pd.Timestamp("2018-04-01") + pd.Timedelta(days=SHIFT_DAY)
    assert s4["tx_amount"].between(0.5, 5.0).all()
    # Spread across the map: most of these terminals are out of the card holder's reach, and many distinct.
    reach = _reachable(shifted)
    in_reach = reach[s4["customer_id"].to_numpy(), s4["terminal_id"].to_numpy()]
    assert in_reach.mean() < 0.1
    # Terminals drawn uniformly from the whole map: as many distinct ones as n uniform draws give.
    distinct = 1000 * (1 - (1 - 1 / 1000) ** len(s4))
    assert abs(s4["terminal_id"].nunique() - distinct) < 0.05 * distinct
    # The base transactions are unchanged; only scenario 4 is added.
    base = b[b["tx_fraud_scenario"] != 4].drop(columns="transaction_id").reset_index(drop=True)
    pd.testing.assert_frame_equal(base, a.drop(columns="transaction_id").reset_index(drop=True))
    assert np.array_equal(b["transaction_id"].to_numpy(), np.arange(len(b)))


def test_make_shift_maps_the_cli_flags() -> None:
    assert make_shift(10) == Shift(start_day=10)
    shift = make_shift(10, 1.2, new_fraud=True)
    assert (shift.start_day, shift.amount_factor) == (10, 1.2)
    assert shift.card_testing_cards_per_day > 0
    sim = simulate(n_customers=50, n_terminals=100, n_days=15, seed=2, shift=shift)
    assert (sim.transactions["tx_fraud_scenario"] == 4).sum() == 5 * shift.card_testing_cards_per_day * 10


# --- errors ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_customers": 0}, r"'n_customers' must be a positive integer\. Got 0"),
        ({"n_customers": -5}, r"'n_customers' must be a positive integer\. Got -5"),
        ({"n_customers": 2.5}, r"'n_customers' must be a positive integer\. Got 2\.5"),
        ({"n_customers": True}, r"'n_customers' must be a positive integer\. Got True"),
        ({"n_terminals": 0}, r"'n_terminals' must be a positive integer"),
        ({"n_days": 0}, r"'n_days' must be a positive integer"),
        ({"radius": 0}, r"'radius' must be a positive finite number\. Got 0"),
        ({"radius": -1.0}, r"'radius' must be a positive finite number"),
        ({"radius": float("nan")}, r"'radius' must be a positive finite number"),
        ({"radius": float("inf")}, r"'radius' must be a positive finite number"),
        ({"start_date": "not a date"}, r"'start_date' must be a date like '2018-04-01'\. Got 'not a date'"),
        ({"start_date": "2018-13-01"}, r"'start_date' must be a date like '2018-04-01'"),
        ({"start_date": None}, r"'start_date' must be a date like '2018-04-01'\. Got None"),
        ({"start_date": "2018-04-01 12:00"}, r"'start_date' must be a date at midnight"),
        ({"seed": -1}, r"'seed' must be a non-negative integer\. Got -1"),
        ({"shift": Shift(start_day=-1)}, r"'start_day' must be an integer day in \[0, 10\)"),
        ({"shift": Shift(start_day=10)}, r"'start_day' must be an integer day in \[0, 10\)"),
        ({"shift": Shift(start_day=2, amount_factor=0)}, r"'amount_factor' must be a positive number"),
        (
            {"shift": Shift(start_day=2, extra_compromised_terminals_per_day=-1)},
            r"'extra_compromised_terminals_per_day' must be a non-negative integer",
        ),
        (
            {"shift": Shift(start_day=2, extra_compromised_terminals_per_day=51)},
            r"'extra_compromised_terminals_per_day' \(51\) cannot exceed n_terminals \(50\)",
        ),
        (
            {"shift": Shift(start_day=2, card_testing_cards_per_day=-2)},
            r"'card_testing_cards_per_day' must be a non-negative integer",
        ),
        ({"shift": Shift(start_day=2, card_testing_tx_per_card=0)}, r"'card_testing_tx_per_card' must be"),
        ({"shift": Shift(start_day=2, card_testing_max_amount=0.1)}, r"'card_testing_max_amount' must be"),
        ({"shift": "tomorrow"}, r"'shift' must be a Shift or None\. Got str"),
    ],
)
def test_invalid_parameters_raise_data_error(kwargs: dict[str, object], match: str) -> None:
    params: dict[str, object] = {"n_customers": 20, "n_terminals": 50, "n_days": 10, **kwargs}
    with pytest.raises(DataError, match=match):
        simulate(**params)  # type: ignore[arg-type]


# --- writing ---------------------------------------------------------------------------------------------


def test_write_simulation_writes_three_parquet_files_atomically(sim: Simulation, tmp_path) -> None:
    out = tmp_path / "nested" / "data"
    paths = write_simulation(sim, out)
    assert set(paths) == {"transactions", "customers", "terminals"}
    assert sorted(p.name for p in out.iterdir()) == [
        "customers.parquet",
        "terminals.parquet",
        "transactions.parquet",
    ]
    pd.testing.assert_frame_equal(pd.read_parquet(paths["transactions"]), sim.transactions)
    pd.testing.assert_frame_equal(pd.read_parquet(paths["customers"]), sim.customers)
    pd.testing.assert_frame_equal(pd.read_parquet(paths["terminals"]), sim.terminals)
    # Overwriting replaces the files in place and leaves no temporary file behind.
    small = simulate(n_customers=10, n_terminals=20, n_days=3, seed=1)
    write_simulation(small, out)
    assert len(pd.read_parquet(paths["transactions"])) == len(small.transactions)
    assert sorted(p.name for p in out.iterdir()) == [
        "customers.parquet",
        "terminals.parquet",
        "transactions.parquet",
    ]


def test_write_simulation_into_a_file_path_raises_data_error(sim: Simulation, tmp_path) -> None:
    blocker = tmp_path / "taken"
    blocker.write_text("not a folder")
    with pytest.raises(DataError, match=r"Cannot create the simulation output folder .*taken"):
        write_simulation(sim, blocker / "data")


def test_reach_is_strictly_less_than_the_radius() -> None:
    from keel.data.simulate import _reachable_terminals

    # Terminal 0 is at distance exactly 5 (3-4-5 triangle): out of reach; terminal 1 is just inside.
    offsets, reach = _reachable_terminals(np.array([[0.0, 0.0]]), np.array([[3.0, 4.0], [3.0, 3.9]]), 5.0)
    assert offsets.tolist() == [0, 1]
    assert reach.tolist() == [1]


def test_a_failed_write_keeps_the_previous_file_and_leaves_no_temp(
    sim: Simulation, tmp_path, monkeypatch
) -> None:
    import os

    paths = write_simulation(sim, tmp_path)
    before = paths["transactions"].read_bytes()
    umask = os.umask(0)
    os.umask(umask)
    assert paths["transactions"].stat().st_mode & 0o777 == 0o666 & ~umask

    def broken(self, path, **kwargs):  # type: ignore[no-untyped-def]
        with open(path, "wb") as f:
            f.write(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pd.DataFrame, "to_parquet", broken)
    with pytest.raises(DataError, match=r"Cannot write .*transactions\.parquet: No space left on device"):
        write_simulation(simulate(n_customers=10, n_terminals=20, n_days=3, seed=1), tmp_path)
    assert paths["transactions"].read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "customers.parquet",
        "terminals.parquet",
        "transactions.parquet",
    ]
