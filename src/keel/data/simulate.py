"""Card-transaction simulator, vectorised with NumPy.

It follows the generative process of the *Reproducible Machine Learning for Credit Card Fraud Detection*
handbook (Le Borgne, Siblini, Lebichot, Bontempi; chapter 3.2), so the data has the handbook's statistics
(about 1.75 M transactions and 0.84 % fraud at the default size), and adds an optional :class:`Shift` that
changes the world from a given day for monitoring demos.

The process:

* customers: location ``x, y ~ U(0, 100)``; ``mean_amount ~ U(5, 100)``, ``std_amount = mean_amount / 2``;
  ``mean_nb_tx_per_day ~ U(0, 4)``.
* terminals: location ``x, y ~ U(0, 100)``. A customer uses the terminals at Euclidean distance ``< radius``.
* each customer-day: ``count ~ Poisson(mean_nb_tx_per_day)``; each draw gets a time of day
  ``int(N(43200, 20000))`` seconds and is discarded unless ``0 < t < 86400``; amount ``~ N(mean, std)``, a
  negative amount redrawn from ``U(0, 2 * mean)``, rounded to cents; terminal uniform among the reachable ones
  (a customer with no reachable terminal makes no transaction).
* fraud, in this order (a later scenario overwrites the label of an earlier one):

  1. every amount above 220 is fraud;
  2. each day ``d``, 2 terminals are drawn: all their transactions in days ``[d, d + 28)`` are fraud;
  3. each day ``d``, 3 customers are drawn: a third (rounded down) of their transactions in days
     ``[d, d + 14)``, sampled without replacement, get their amount multiplied by 5 and are fraud. A
     transaction drawn by two overlapping campaigns is multiplied twice, as in the handbook.

Every random component has its own stream spawned from ``seed``, so a :class:`Shift` leaves every
transaction before its ``start_day`` exactly as it is without the shift.
"""

from __future__ import annotations

import math
import os
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeGuard

import numpy as np
import pandas as pd
from scipy.spatial import cKDTree

from keel.errors import DataError

__all__ = ["Shift", "Simulation", "make_shift", "simulate", "write_simulation"]

SECONDS_PER_DAY = 86_400
_TIME_MEAN = SECONDS_PER_DAY / 2
_TIME_STD = 20_000.0
SCENARIO1_THRESHOLD = 220.0
SCENARIO2_TERMINALS_PER_DAY = 2
SCENARIO2_DAYS = 28
SCENARIO3_CUSTOMERS_PER_DAY = 3
SCENARIO3_DAYS = 14
SCENARIO3_FACTOR = 5.0
CARD_TESTING_BURST_SECONDS = 3_600

# One independent stream per component: adding or changing one never moves the draws of another.
_STREAMS = (
    "customers",
    "terminals",
    "counts",
    "times",
    "amounts",
    "negative_amounts",
    "terminal_choice",
    "scenario2",
    "scenario3",
    "shift_terminals",
    "shift_card_testing",
)

TRANSACTION_COLUMNS = (
    "transaction_id",
    "tx_datetime",
    "customer_id",
    "terminal_id",
    "tx_amount",
    "tx_fraud",
    "tx_fraud_scenario",
)


@dataclass(frozen=True)
class Shift:
    """A change of the world from ``start_day`` (0-based, counted from ``start_date``) onwards.

    Nothing before ``start_day`` changes: same transactions, same ids, same labels.

    * ``amount_factor``: price inflation. Every customer's amounts from ``start_day`` are multiplied by it.
      Scenario 1 keeps its meaning (an amount unusually large for the population), so its threshold moves
      with prices to ``220 * amount_factor``: a model that learned "amount > 220" starts raising false
      alarms on honest inflated payments while the amount distribution drifts.
    * ``extra_compromised_terminals_per_day``: more terminals compromised each day (scenario 2, 28 days).
    * ``card_testing_cards_per_day`` (scenario 4, new): each day that many cards are stolen and tested by a
      bot in one burst of ``card_testing_tx_per_card`` transactions within an hour, at random hours of day
      or night, for small amounts ``U(0.50, card_testing_max_amount)``, on terminals drawn uniformly from the
      whole map (far from the card holder). These are extra transactions, all fraud with scenario 4; the
      pattern — small amounts, many terminals, any hour — is one the base scenarios never produce.

    Example::

        simulate(n_days=120, shift=Shift(start_day=90, amount_factor=1.3, card_testing_cards_per_day=5))
    """

    start_day: int
    amount_factor: float = 1.0
    extra_compromised_terminals_per_day: int = 0
    card_testing_cards_per_day: int = 0
    card_testing_tx_per_card: int = 10
    card_testing_max_amount: float = 5.0


NEW_FRAUD_CARDS_PER_DAY = 5


def make_shift(start_day: int, amount_factor: float = 1.0, new_fraud: bool = False) -> Shift:
    """The :class:`Shift` behind ``keel simulate --shift-day N [--shift-amount-factor F] [--shift-new-fraud]``.

    ``new_fraud`` turns on scenario 4 (card testing) with ``NEW_FRAUD_CARDS_PER_DAY`` stolen cards a day,
    10 small transactions each; the parameters are checked by :func:`simulate`.
    """
    return Shift(
        start_day=start_day,
        amount_factor=amount_factor,
        card_testing_cards_per_day=NEW_FRAUD_CARDS_PER_DAY if new_fraud else 0,
    )


@dataclass(frozen=True, eq=False)
class Simulation:
    """The result of :func:`simulate`.

    ``transactions``: one row a transaction, columns ``transaction_id`` (int64, 0..n-1 in time order),
    ``tx_datetime`` (datetime64[ns]), ``customer_id``, ``terminal_id`` (int64), ``tx_amount`` (float64,
    cents), ``tx_fraud`` (int8, 0/1) and ``tx_fraud_scenario`` (int8: 0 genuine, 1-3 the handbook's
    scenarios, 4 card testing from a :class:`Shift`), sorted by ``tx_datetime`` then ``transaction_id``.
    ``customers``: ``customer_id, x, y, mean_amount, std_amount, mean_nb_tx_per_day, nb_terminals``.
    ``terminals``: ``terminal_id, x, y``.
    """

    transactions: pd.DataFrame
    customers: pd.DataFrame
    terminals: pd.DataFrame
    start_date: pd.Timestamp
    n_days: int
    radius: float
    seed: int
    shift: Shift | None = None

    def summary(self) -> dict[str, Any]:
        """Counts and rates as plain Python values (JSON-ready)."""
        tx = self.transactions
        n = len(tx)
        n_fraud = int(tx["tx_fraud"].sum())
        scenarios = tx["tx_fraud_scenario"].value_counts().sort_index()
        scenario_counts = {int(k): int(v) for k, v in scenarios.items() if k != 0}
        for k in (1, 2, 3):
            scenario_counts.setdefault(k, 0)
        return {
            "n_transactions": n,
            "n_customers": len(self.customers),
            "n_terminals": len(self.terminals),
            "n_days": self.n_days,
            "start_date": self.start_date.date().isoformat(),
            "end_date": (self.start_date + pd.Timedelta(days=self.n_days - 1)).date().isoformat(),
            "transactions_per_day": n / self.n_days,
            "n_fraud": n_fraud,
            "fraud_rate": n_fraud / n if n else 0.0,
            "scenario_counts": dict(sorted(scenario_counts.items())),
            "scenario_shares": {
                k: round(v / n_fraud, 4) if n_fraud else 0.0 for k, v in sorted(scenario_counts.items())
            },
            "mean_amount": float(tx["tx_amount"].mean()) if n else 0.0,
            "customers_without_terminals": int((self.customers["nb_terminals"] == 0).sum()),
            "seed": self.seed,
            "shift": asdict(self.shift) if self.shift is not None else None,
        }


def simulate(
    n_customers: int = 5000,
    n_terminals: int = 10000,
    n_days: int = 183,
    start_date: str = "2018-04-01",
    radius: float = 5.0,
    seed: int = 0,
    shift: Shift | None = None,
) -> Simulation:
    """Simulate card transactions with the handbook's three fraud scenarios (see the module docstring).

    Deterministic for a ``seed``. The default size gives about 1.75 M transactions in a few seconds.

    Example::

        sim = simulate(n_customers=500, n_terminals=1000, n_days=60, seed=7)
        sim.transactions.head()
        sim.summary()["fraud_rate"]

    Raises:
        DataError: a parameter is out of range (non-positive sizes, radius, unparseable date, bad shift).
    """
    start = _validate(n_customers, n_terminals, n_days, start_date, radius, seed, shift)
    rngs = dict(
        zip(
            _STREAMS,
            (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(len(_STREAMS))),
            strict=True,
        )
    )

    customers = _customer_profiles(rngs["customers"], n_customers)
    terminals_xy = rngs["terminals"].uniform(0.0, 100.0, size=(n_terminals, 2))
    offsets, reach = _reachable_terminals(customers[["x", "y"]].to_numpy(), terminals_xy, radius)
    nb_terminals = np.diff(offsets)
    customers["nb_terminals"] = nb_terminals

    cust, day, seconds, amount, terminal = _base_transactions(rngs, customers, n_days, offsets, reach, shift)
    threshold = np.full(len(amount), SCENARIO1_THRESHOLD)
    if shift is not None:
        threshold[day >= shift.start_day] *= shift.amount_factor
    scenario = np.where(amount > threshold, 1, 0).astype(np.int8)
    _scenario2(rngs, scenario, day, terminal, n_days, n_terminals, shift)
    amount = _scenario3(rngs["scenario3"], scenario, amount, cust, day, n_days, n_customers)

    if shift is not None and shift.card_testing_cards_per_day > 0:
        extra = _card_testing(rngs["shift_card_testing"], shift, n_days, n_customers, n_terminals)
        cust, day, seconds, amount, terminal = (
            np.concatenate([a, b]) for a, b in zip((cust, day, seconds, amount, terminal), extra, strict=True)
        )
        scenario = np.concatenate([scenario, np.full(len(extra[0]), 4, dtype=np.int8)])

    # Generation order (customer, day, draw) breaks ties in time, so ids are deterministic.
    order = np.argsort(seconds, kind="stable")
    start_ns = np.datetime64(start, "ns")
    transactions = pd.DataFrame(
        {
            "transaction_id": np.arange(len(order), dtype=np.int64),
            "tx_datetime": start_ns + (seconds[order] * 1_000_000_000).astype("timedelta64[ns]"),
            "customer_id": cust[order].astype(np.int64),
            "terminal_id": terminal[order].astype(np.int64),
            "tx_amount": amount[order],
            "tx_fraud": (scenario[order] > 0).astype(np.int8),
            "tx_fraud_scenario": scenario[order],
        }
    )
    terminals = pd.DataFrame(
        {
            "terminal_id": np.arange(n_terminals, dtype=np.int64),
            "x": terminals_xy[:, 0],
            "y": terminals_xy[:, 1],
        }
    )
    return Simulation(
        transactions=transactions,
        customers=customers,
        terminals=terminals,
        start_date=start,
        n_days=n_days,
        radius=float(radius),
        seed=seed,
        shift=shift,
    )


def write_simulation(sim: Simulation, out_dir: Path) -> dict[str, Path]:
    """Write ``transactions.parquet``, ``customers.parquet`` and ``terminals.parquet`` into ``out_dir``.

    Each file is written to a temporary file in ``out_dir`` and moved into place with ``os.replace``, so a
    reader never sees a half-written file. Returns ``{"transactions": path, "customers": ..., "terminals": ...}``.

    Raises:
        DataError: the folder cannot be created or a file cannot be written.
    """
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(
            f"Cannot create the simulation output folder {out_dir}: {e.strerror or e}.",
            hint="Choose a writable folder.",
        ) from e
    paths: dict[str, Path] = {}
    for name, frame in (
        ("transactions", sim.transactions),
        ("customers", sim.customers),
        ("terminals", sim.terminals),
    ):
        target = out_dir / f"{name}.parquet"
        # A fresh name beside the target (same file system, so os.replace is atomic); created by
        # to_parquet itself so the file gets the usual permissions, not mkstemp's 0600.
        tmp = out_dir / f".{name}.{uuid.uuid4().hex}.parquet.tmp"
        try:
            frame.to_parquet(tmp, index=False)
            os.replace(tmp, target)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise DataError(
                f"Cannot write {target}: {e.strerror or e}.", hint="Check free space and permissions."
            ) from e
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        paths[name] = target
    return paths


def _validate(
    n_customers: object,
    n_terminals: object,
    n_days: object,
    start_date: object,
    radius: object,
    seed: object,
    shift: Shift | None,
) -> pd.Timestamp:
    """Check every parameter; return the parsed start date."""
    for name, value in (("n_customers", n_customers), ("n_terminals", n_terminals), ("n_days", n_days)):
        if not _is_int(value) or value <= 0:
            raise DataError(f"The simulator's '{name}' must be a positive integer. Got {value!r} instead.")
    if not _is_number(radius) or not math.isfinite(radius) or radius <= 0:
        raise DataError(f"The simulator's 'radius' must be a positive finite number. Got {radius!r} instead.")
    if not _is_int(seed) or seed < 0:
        raise DataError(f"The simulator's 'seed' must be a non-negative integer. Got {seed!r} instead.")
    try:
        start = pd.Timestamp(start_date)  # type: ignore[arg-type]
    except (ValueError, TypeError) as e:
        raise DataError(
            f"The simulator's 'start_date' must be a date like '2018-04-01'. Got {start_date!r} instead."
        ) from e
    if start is pd.NaT or pd.isna(start):
        raise DataError(
            f"The simulator's 'start_date' must be a date like '2018-04-01'. Got {start_date!r} instead."
        )
    if start != start.normalize():
        raise DataError(
            f"The simulator's 'start_date' must be a date at midnight, without a time. Got {start_date!r} instead."
        )
    if start.tzinfo is not None:
        raise DataError(
            f"The simulator's 'start_date' must be a naive date, without a time zone. Got {start_date!r}."
        )
    if shift is not None:
        _validate_shift(shift, n_days, n_terminals)  # type: ignore[arg-type]
    return start


def _validate_shift(shift: Shift, n_days: int, n_terminals: int) -> None:
    """Check a Shift against the simulation it applies to."""
    if not isinstance(shift, Shift):
        raise DataError(
            f"The simulator's 'shift' must be a Shift or None. Got {type(shift).__name__} instead."
        )
    if not _is_int(shift.start_day) or not 0 <= shift.start_day < n_days:
        raise DataError(
            f"The shift's 'start_day' must be an integer day in [0, {n_days}) (n_days={n_days}). "
            f"Got {shift.start_day!r} instead."
        )
    if (
        not _is_number(shift.amount_factor)
        or not math.isfinite(shift.amount_factor)
        or shift.amount_factor <= 0
    ):
        raise DataError(
            f"The shift's 'amount_factor' must be a positive number. Got {shift.amount_factor!r} instead."
        )
    for name in ("extra_compromised_terminals_per_day", "card_testing_cards_per_day"):
        value = getattr(shift, name)
        if not _is_int(value) or value < 0:
            raise DataError(f"The shift's '{name}' must be a non-negative integer. Got {value!r} instead.")
    if shift.extra_compromised_terminals_per_day > n_terminals:
        raise DataError(
            f"The shift's 'extra_compromised_terminals_per_day' ({shift.extra_compromised_terminals_per_day}) "
            f"cannot exceed n_terminals ({n_terminals})."
        )
    if not _is_int(shift.card_testing_tx_per_card) or shift.card_testing_tx_per_card < 1:
        raise DataError(
            f"The shift's 'card_testing_tx_per_card' must be a positive integer. "
            f"Got {shift.card_testing_tx_per_card!r} instead."
        )
    m = shift.card_testing_max_amount
    if not _is_number(m) or not math.isfinite(m) or m <= 0.5:
        raise DataError(
            f"The shift's 'card_testing_max_amount' must be a number above 0.50. Got {m!r} instead."
        )


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _is_number(value: object) -> TypeGuard[float]:
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool)


def _customer_profiles(rng: np.random.Generator, n: int) -> pd.DataFrame:
    """Draw customer locations, spending amounts and frequencies."""
    xy = rng.uniform(0.0, 100.0, size=(n, 2))
    mean_amount = rng.uniform(5.0, 100.0, size=n)
    mean_nb = rng.uniform(0.0, 4.0, size=n)
    return pd.DataFrame(
        {
            "customer_id": np.arange(n, dtype=np.int64),
            "x": xy[:, 0],
            "y": xy[:, 1],
            "mean_amount": mean_amount,
            "std_amount": mean_amount / 2,
            "mean_nb_tx_per_day": mean_nb,
        }
    )


def _reachable_terminals(
    customers_xy: np.ndarray, terminals_xy: np.ndarray, radius: float
) -> tuple[np.ndarray, np.ndarray]:
    """Terminals within ``radius`` of each customer as CSR: ``reach[offsets[c]:offsets[c + 1]]``, sorted."""
    pairs = cKDTree(customers_xy).sparse_distance_matrix(cKDTree(terminals_xy), radius, output_type="ndarray")
    pairs = pairs[pairs["v"] < radius]  # the KD-tree keeps distance == radius; the process wants < r
    order = np.lexsort((pairs["j"], pairs["i"]))
    reach = pairs["j"][order].astype(np.int64)
    counts = np.bincount(pairs["i"], minlength=len(customers_xy))
    offsets = np.zeros(len(customers_xy) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    return offsets, reach


def _base_transactions(
    rngs: dict[str, np.random.Generator],
    customers: pd.DataFrame,
    n_days: int,
    offsets: np.ndarray,
    reach: np.ndarray,
    shift: Shift | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Draw every customer-day's transactions at once, in (customer, day, draw) order."""
    n_customers = len(customers)
    mean_nb = customers["mean_nb_tx_per_day"].to_numpy()
    counts = rngs["counts"].poisson(np.repeat(mean_nb[:, None], n_days, axis=1)).ravel()
    cust = np.repeat(np.repeat(np.arange(n_customers), n_days), counts)
    day = np.repeat(np.tile(np.arange(n_days), n_customers), counts)

    # Truncation towards zero then strict bounds, as the handbook's int(...) and (0 < t < 86400).
    t = np.trunc(rngs["times"].normal(_TIME_MEAN, _TIME_STD, size=len(cust))).astype(np.int64)
    nb_terminals = np.diff(offsets)
    keep = (t > 0) & (t < SECONDS_PER_DAY) & (nb_terminals[cust] > 0)
    cust, day, t = cust[keep], day[keep], t[keep]

    mean_amount = customers["mean_amount"].to_numpy()[cust]
    std_amount = customers["std_amount"].to_numpy()[cust]
    amount = rngs["amounts"].normal(mean_amount, std_amount)
    negative = amount < 0
    amount[negative] = rngs["negative_amounts"].uniform(0.0, 2.0 * mean_amount[negative])
    if shift is not None and shift.amount_factor != 1.0:
        amount[day >= shift.start_day] *= shift.amount_factor
    amount = np.round(amount, 2)

    u = rngs["terminal_choice"].random(len(cust))
    pick = offsets[cust] + (u * nb_terminals[cust]).astype(np.int64)
    terminal = reach[pick]
    seconds = day.astype(np.int64) * SECONDS_PER_DAY + t
    return cust, day, seconds, amount, terminal


def _sample_per_day(rng: np.random.Generator, n_days: int, k: int, population: int) -> np.ndarray:
    """``k`` distinct draws from ``range(population)`` for each day: shape (n_days, k)."""
    k = min(k, population)
    if k == 0:
        return np.empty((n_days, 0), dtype=np.int64)
    keys = rng.random((n_days, population))
    return np.argpartition(keys, k - 1, axis=1)[:, :k].astype(np.int64)


def _scenario2(
    rngs: dict[str, np.random.Generator],
    scenario: np.ndarray,
    day: np.ndarray,
    terminal: np.ndarray,
    n_days: int,
    n_terminals: int,
    shift: Shift | None,
) -> None:
    """Mark, in place, transactions at a terminal within 28 days of its compromise."""
    start_days = np.arange(n_days)
    picks = _sample_per_day(rngs["scenario2"], n_days, SCENARIO2_TERMINALS_PER_DAY, n_terminals)
    campaign_day = np.repeat(start_days, picks.shape[1])
    campaign_terminal = picks.ravel()
    if shift is not None and shift.extra_compromised_terminals_per_day > 0:
        extra = _sample_per_day(
            rngs["shift_terminals"], n_days, shift.extra_compromised_terminals_per_day, n_terminals
        )
        from_day = start_days >= shift.start_day
        campaign_day = np.concatenate([campaign_day, np.repeat(start_days[from_day], extra.shape[1])])
        campaign_terminal = np.concatenate([campaign_terminal, extra[from_day].ravel()])
    # A +1/-1 event per campaign, summed over days, gives how many campaigns hold each terminal each day.
    events = np.zeros((n_days + 1, n_terminals), dtype=np.int32)
    np.add.at(events, (campaign_day, campaign_terminal), 1)
    np.add.at(events, (np.minimum(campaign_day + SCENARIO2_DAYS, n_days), campaign_terminal), -1)
    active = np.cumsum(events, axis=0)[:n_days] > 0
    scenario[active[day, terminal]] = 2


def _scenario3(
    rng: np.random.Generator,
    scenario: np.ndarray,
    amount: np.ndarray,
    cust: np.ndarray,
    day: np.ndarray,
    n_days: int,
    n_customers: int,
) -> np.ndarray:
    """Mark, in place, a third of a compromised customer's next 14 days; return amounts with those x5."""
    picks = _sample_per_day(rng, n_days, SCENARIO3_CUSTOMERS_PER_DAY, n_customers)
    campaign_day = np.repeat(np.arange(n_days), picks.shape[1])
    campaign_cust = picks.ravel()
    # Transactions are in (customer, day) order, so a campaign's candidates are one contiguous block.
    key = cust.astype(np.int64) * n_days + day
    lo = np.searchsorted(key, campaign_cust * n_days + campaign_day, side="left")
    hi = np.searchsorted(
        key, campaign_cust * n_days + np.minimum(campaign_day + SCENARIO3_DAYS, n_days), side="left"
    )
    size = hi - lo
    total = int(size.sum())
    if total == 0:
        return amount
    campaign = np.repeat(np.arange(len(size)), size)
    first = np.cumsum(size) - size
    candidate = np.repeat(lo, size) + (np.arange(total) - first[campaign])
    # Sampling k of n without replacement per campaign: shuffle within the campaign, keep the first k.
    order = np.lexsort((rng.random(total), campaign))
    rank = np.arange(total) - first[campaign[order]]
    chosen = candidate[order][rank < (size // 3)[campaign[order]]]
    times_chosen = np.bincount(chosen, minlength=len(amount))
    hit = times_chosen > 0
    scenario[hit] = 3
    amount = amount.copy()
    amount[hit] = np.round(amount[hit] * SCENARIO3_FACTOR ** times_chosen[hit], 2)
    return amount


def _card_testing(
    rng: np.random.Generator, shift: Shift, n_days: int, n_customers: int, n_terminals: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Scenario 4: bursts of small transactions on stolen cards at terminals anywhere on the map."""
    days = np.arange(shift.start_day, n_days)
    cards = _sample_per_day(rng, len(days), shift.card_testing_cards_per_day, n_customers)
    burst_day = np.repeat(days, cards.shape[1])
    burst_card = cards.ravel()
    burst_start = rng.integers(0, SECONDS_PER_DAY - CARD_TESTING_BURST_SECONDS, size=len(burst_day))
    per = shift.card_testing_tx_per_card
    day = np.repeat(burst_day, per)
    cust = np.repeat(burst_card, per)
    t = np.repeat(burst_start, per) + rng.integers(0, CARD_TESTING_BURST_SECONDS, size=len(day))
    seconds = day.astype(np.int64) * SECONDS_PER_DAY + t
    amount = np.round(rng.uniform(0.5, shift.card_testing_max_amount, size=len(day)), 2)
    terminal = rng.integers(0, n_terminals, size=len(day))
    return cust, day, seconds, amount, terminal
