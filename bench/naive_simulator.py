"""A straightforward loop implementation of the handbook's simulator: the speed anchor of bench_simulate.py.

Same process as ``keel.data.simulate`` (see its module docstring), written the way the handbook's reference
code is: one Python loop over customers, days and transactions with scalar random draws, then one pandas
filter over the whole table per day for each fraud scenario. Not used by the library; not vectorised on
purpose. Same output columns as ``keel.data.simulate.simulate``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def naive_simulate(
    n_customers: int = 5000,
    n_terminals: int = 10000,
    n_days: int = 183,
    start_date: str = "2018-04-01",
    radius: float = 5.0,
    seed: int = 0,
) -> pd.DataFrame:
    """Loop-by-loop simulation; returns the transactions frame."""
    rng = np.random.default_rng(seed)

    customers = []
    for customer_id in range(n_customers):
        x, y = rng.uniform(0, 100), rng.uniform(0, 100)
        mean_amount = rng.uniform(5, 100)
        customers.append((customer_id, x, y, mean_amount, mean_amount / 2, rng.uniform(0, 4)))

    terminals = []
    for terminal_id in range(n_terminals):
        terminals.append((terminal_id, rng.uniform(0, 100), rng.uniform(0, 100)))
    terminal_xy = np.array([(x, y) for _, x, y in terminals])

    # Per customer: distances to every terminal.
    reachable = []
    for _, x, y, *_rest in customers:
        distance = np.sqrt(((terminal_xy - np.array([x, y])) ** 2).sum(axis=1))
        reachable.append(list(np.flatnonzero(distance < radius)))

    rows = []
    for (customer_id, _x, _y, mean_amount, std_amount, mean_nb), terminals_near in zip(
        customers, reachable, strict=True
    ):
        for day in range(n_days):
            for _ in range(rng.poisson(mean_nb)):
                time_of_day = int(rng.normal(43200, 20000))
                if not 0 < time_of_day < 86400:
                    continue
                amount = rng.normal(mean_amount, std_amount)
                if amount < 0:
                    amount = rng.uniform(0, 2 * mean_amount)
                amount = round(amount, 2)
                if terminals_near:
                    terminal_id = terminals_near[rng.integers(len(terminals_near))]
                    rows.append((day * 86400 + time_of_day, day, customer_id, int(terminal_id), amount))

    tx = pd.DataFrame(rows, columns=["seconds", "day", "customer_id", "terminal_id", "tx_amount"])
    tx = tx.sort_values("seconds", kind="stable").reset_index(drop=True)
    tx["tx_fraud"] = 0
    tx["tx_fraud_scenario"] = 0

    over = tx["tx_amount"] > 220
    tx.loc[over, "tx_fraud"] = 1
    tx.loc[over, "tx_fraud_scenario"] = 1

    for day in range(n_days):
        compromised = rng.choice(n_terminals, size=2, replace=False)
        hit = (tx["day"] >= day) & (tx["day"] < day + 28) & tx["terminal_id"].isin(compromised)
        tx.loc[hit, "tx_fraud"] = 1
        tx.loc[hit, "tx_fraud_scenario"] = 2

    for day in range(n_days):
        compromised = rng.choice(n_customers, size=3, replace=False)
        candidates = tx.index[
            (tx["day"] >= day) & (tx["day"] < day + 14) & tx["customer_id"].isin(compromised)
        ]
        chosen = rng.choice(candidates, size=len(candidates) // 3, replace=False)
        tx.loc[chosen, "tx_amount"] = (tx.loc[chosen, "tx_amount"] * 5).round(2)
        tx.loc[chosen, "tx_fraud"] = 1
        tx.loc[chosen, "tx_fraud_scenario"] = 3

    tx["tx_datetime"] = pd.Timestamp(start_date) + pd.to_timedelta(tx["seconds"], unit="s")
    tx["transaction_id"] = np.arange(len(tx), dtype=np.int64)
    return tx[
        [
            "transaction_id",
            "tx_datetime",
            "customer_id",
            "terminal_id",
            "tx_amount",
            "tx_fraud",
            "tx_fraud_scenario",
        ]
    ]
