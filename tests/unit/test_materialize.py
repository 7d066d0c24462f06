"""Warming the online store from the source: the first live events see the same features as the offline table."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from keel.data.simulate import simulate, write_simulation
from keel.features.definitions import feature_names, resolve_definitions
from keel.features.materialize import warm_online_store
from keel.features.offline import compute_features
from keel.features.online import OnlineStore
from keel.spec import load_spec

FLAGSHIP = Path(__file__).resolve().parents[2] / "examples" / "card-fraud" / "keel.toml"


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("warm")
    sim = simulate(n_customers=150, n_terminals=300, n_days=60, seed=3)
    write_simulation(sim, root / "data")
    (root / "keel.toml").write_text(FLAGSHIP.read_text())
    spec = load_spec(root / "keel.toml")
    return spec, sim.transactions


def test_warm_store_matches_offline_features_for_live_events(project, tmp_path: Path) -> None:
    spec, tx = project
    cut = tx["tx_datetime"].min() + pd.Timedelta(days=50)
    history_path = tmp_path / "history.parquet"
    tx[tx["tx_datetime"] <= cut].to_parquet(history_path)
    from keel.data.sources import open_source

    store = OnlineStore.from_spec(spec, path=tmp_path / "online.sqlite")
    result = warm_online_store(spec, store, source=open_source(history_path))
    assert result.until == cut.to_pydatetime() or result.until <= cut.to_pydatetime()
    assert result.events == int(((tx["tx_datetime"] > cut - pd.Timedelta(days=37)) & (tx["tx_datetime"] <= cut)).sum())
    assert result.labels > 0
    # Live events after the cut: labels arrive only once due (event time + 7 days), as the service receives them.
    defs = resolve_definitions(spec.features, spec.data)
    offline = compute_features(tx, defs, timestamp="tx_datetime", label="tx_fraud")
    live = tx[tx["tx_datetime"] > cut].head(400)
    pending = tx[(tx["tx_datetime"] > cut - pd.Timedelta(days=7))].sort_values("tx_datetime")
    pending_at = pending["tx_datetime"] + pd.Timedelta(days=7)
    j = 0
    for _, event in live.iterrows():
        while j < len(pending) and pending_at.iloc[j] <= event["tx_datetime"]:
            store.add_label(pending["transaction_id"].iloc[j], float(pending["tx_fraud"].iloc[j]),
                            at=pending_at.iloc[j])
            j += 1
        row = store.features(event.to_dict())
        expected = offline.loc[event.name, feature_names(defs)]
        np.testing.assert_allclose([row[n] for n in feature_names(defs)], expected.to_numpy(dtype=float),
                                   rtol=0, atol=1e-9)
        store.update(event.to_dict())
    # Warming twice double-counts nothing: the next event's features are the same before and after.
    following = tx[tx["tx_datetime"] > cut].iloc[400].to_dict()
    before = dict(store.features(following))
    warm_online_store(spec, store, source=open_source(history_path))
    assert dict(store.features(following)) == before
    store.close()
