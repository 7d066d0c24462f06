"""Batch scoring on the local engine: features, scores, decisions, rejects, streaming, atomicity, idempotence."""

from __future__ import annotations

import io
import json
from datetime import datetime, timedelta
from pathlib import Path

import lightgbm as lgb
import numpy as np
import pandas as pd
import pytest

from keel.artifact import DecisionModel
from keel.data.simulate import simulate
from keel.data.sources import open_source
from keel.errors import DataError, ScoringError
from keel.features import OnlineStore, compute_features, feature_names, resolve_definitions
from keel.score import score
from keel.spec import load_spec

SPEC = load_spec(Path(__file__).resolve().parents[2] / "examples" / "card-fraud" / "keel.toml")
DEFS = resolve_definitions(SPEC.features, SPEC.data)
NAMES = feature_names(DEFS)
NOW = datetime(2030, 1, 1)
KEYS = ["transaction_id", "tx_datetime", "customer_id", "terminal_id"]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Small simulated data in Parquet, a LightGBM trained on its features, the last 6 days (unlabelled) to score."""
    folder = tmp_path_factory.mktemp("score")
    tx = simulate(n_customers=300, n_terminals=600, n_days=40).transactions
    feats = compute_features(tx, DEFS, timestamp="tx_datetime", label="tx_fraud")
    booster = lgb.train(
        {"objective": "binary", "num_leaves": 15, "verbose": -1, "num_threads": 1, "seed": 1},
        lgb.Dataset(feats[NAMES].to_numpy(), tx["tx_fraud"].to_numpy()),
        30,
    )
    model = DecisionModel(kind="lightgbm", feature_names=NAMES, estimator=booster, threshold=0.3)
    full = folder / "tx.parquet"
    tx.to_parquet(full, index=False)
    cut = tx["tx_datetime"].max().normalize() - pd.Timedelta(days=5)
    recent = tx[tx["tx_datetime"] >= cut].drop(columns=["tx_fraud", "tx_fraud_scenario"])
    recent_path = folder / "recent.parquet"
    recent.to_parquet(recent_path, index=False)
    return {"tx": tx, "features": feats, "model": model, "full": full, "recent": recent_path, "n_recent": len(recent)}


def run(world: dict, source: Path, out: Path, **kw) -> object:
    kw.setdefault("now", NOW)
    return score(SPEC, open_source(source), out, model=world["model"], model_version="7", **kw)


def test_scores_equal_the_model_on_offline_features_with_decisions_and_summary(world: dict, tmp_path: Path) -> None:
    out = tmp_path / "scores.parquet"
    summary = run(world, world["full"], out)
    got = pd.read_parquet(out)
    tx, model = world["tx"], world["model"]
    assert list(got.columns) == [*KEYS, "score", "decision", "model_version"]
    assert got["transaction_id"].tolist() == tx["transaction_id"].tolist()
    expected = model.scores(world["features"][NAMES])
    np.testing.assert_array_equal(got["score"].to_numpy(), expected)
    assert got["decision"].tolist() == model.decide(expected).tolist()
    assert set(got["model_version"]) == {"7"}
    on_disk = json.loads((tmp_path / "scores.summary.json").read_text())
    assert on_disk["rows"] == summary.rows == len(tx) and summary.rejected == 0
    assert on_disk["decisions"] == {"approve": int((expected < 0.3).sum()), "review": int((expected >= 0.3).sum())}
    assert abs(on_disk["score_quantiles"]["p50"] - np.quantile(expected, 0.5)) < 1e-4
    assert abs(on_disk["score_mean"] - expected.mean()) < 1e-9
    assert on_disk["rows_per_second"] > 0


def test_a_tiny_chunk_size_gives_exactly_the_one_chunk_output(world: dict, tmp_path: Path) -> None:
    seen: list[tuple[int, int]] = []
    run(world, world["recent"], tmp_path / "one.parquet", history=open_source(world["full"]))
    run(world, world["recent"], tmp_path / "many.parquet", history=open_source(world["full"]), chunk_rows=977,
        progress=lambda done, total: seen.append((done, total)))
    one, many = pd.read_parquet(tmp_path / "one.parquet"), pd.read_parquet(tmp_path / "many.parquet")
    pd.testing.assert_frame_equal(one, many, check_exact=True)
    n = world["n_recent"]
    assert len(seen) == 1 + -(-n // 977) and seen[-1] == (n, n)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert pq_row_groups(tmp_path / "many.parquet") > 1


def pq_row_groups(path: Path) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).num_row_groups


def test_history_warms_up_windows_so_a_recent_slice_scores_like_the_full_run(world: dict, tmp_path: Path) -> None:
    run(world, world["full"], tmp_path / "full.parquet")
    summary = run(world, world["recent"], tmp_path / "warm.parquet", history=open_source(world["full"]))
    run(world, world["recent"], tmp_path / "cold.parquet")
    full = pd.read_parquet(tmp_path / "full.parquet").set_index("transaction_id")
    warm = pd.read_parquet(tmp_path / "warm.parquet").set_index("transaction_id")
    cold = pd.read_parquet(tmp_path / "cold.parquet").set_index("transaction_id")
    # The input has no labels and spans less than the label delay: the terminal risk windows (delay 7d) read
    # only history rows, whose labels are known, exactly as in the full run.
    np.testing.assert_array_equal(warm["score"].to_numpy(), full.loc[warm.index, "score"].to_numpy())
    assert summary.history_rows > 0
    assert not np.array_equal(cold["score"].to_numpy(), warm["score"].to_numpy())


def test_bad_rows_go_to_rejects_with_their_reason_and_are_not_scored(world: dict, tmp_path: Path) -> None:
    frame = pd.read_parquet(world["recent"]).head(400).copy()
    frame["tx_datetime"] = frame["tx_datetime"].dt.strftime("%Y-%m-%d %H:%M:%S").astype(object)
    frame["customer_id"] = frame["customer_id"].astype("Int64")
    frame.loc[3, "customer_id"] = pd.NA
    frame.loc[5, "tx_datetime"] = None
    frame.loc[7, "tx_datetime"] = "yesterday-ish"
    frame.loc[9, "tx_datetime"] = "2031-06-01 10:00:00"
    frame.loc[11, "tx_amount"] = -5.0
    source = tmp_path / "in.csv"
    frame.to_csv(source, index=False)
    summary = run(world, source, tmp_path / "out.parquet")
    rejects = pd.read_parquet(tmp_path / "out.rejects.parquet").set_index("transaction_id")
    ids = frame["transaction_id"]
    assert rejects["reject_reason"].to_dict() == {
        ids[3]: "null entity key 'customer_id'",
        ids[5]: "null timestamp 'tx_datetime'",
        ids[7]: "unparseable timestamp 'tx_datetime'",
        ids[9]: "timestamp 'tx_datetime' in the future (after 2030-01-01 00:05:00)",
        ids[11]: "'tx_amount' below 0",
    }
    assert rejects.loc[ids[7], "tx_datetime"] == "yesterday-ish"  # rejects keep the raw input values
    scored = pd.read_parquet(tmp_path / "out.parquet")
    assert len(scored) == 395 and not set(rejects.index) & set(scored["transaction_id"])
    assert summary.rejected == 5 and summary.rows == 395
    assert summary.reject_reasons["'tx_amount' below 0"] == 1


def test_a_missing_column_stops_the_job_before_any_write(world: dict, tmp_path: Path) -> None:
    source = tmp_path / "in.parquet"
    pd.read_parquet(world["recent"]).drop(columns=["terminal_id"]).to_parquet(source)
    with pytest.raises(DataError, match=r"Column 'terminal_id' needed to score is missing from .*in\.parquet"):
        run(world, source, tmp_path / "out" / "scores.parquet")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_model_reading_unknown_features_is_refused(world: dict, tmp_path: Path) -> None:
    odd = DecisionModel(kind="lightgbm", feature_names=["nope"], estimator=world["model"].estimator)
    with pytest.raises(ScoringError, match=r"features \['nope'\] that keel.toml \[features\] does not define"):
        score(SPEC, open_source(world["recent"]), tmp_path / "o.parquet", model=odd, model_version="1")


def test_an_interrupted_run_leaves_the_old_output_and_no_temporary_file(world: dict, tmp_path: Path) -> None:
    out = tmp_path / "scores.parquet"
    out.write_bytes(b"previous output")

    def stop(done: int, total: int) -> None:
        if done > 2000:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(world, world["recent"], out, chunk_rows=1000, progress=stop)
    assert out.read_bytes() == b"previous output"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scores.parquet"]
    out.unlink()
    with pytest.raises(KeyboardInterrupt):
        run(world, world["recent"], out, chunk_rows=1000, progress=stop)
    assert list(tmp_path.iterdir()) == []


def test_rerunning_replaces_and_day_partitions_are_rewritten_one_by_one(world: dict, tmp_path: Path) -> None:
    out = tmp_path / "scores"
    history = open_source(world["full"])
    first = run(world, world["recent"], out, partition_by_day=True, history=history)
    days = sorted(p.name for p in out.glob("date=*"))
    assert first.partitions == days and len(days) == 6
    assert all(sorted(f.name for f in (out / d).iterdir()) == ["part.parquet"] for d in days)
    whole = pd.read_parquet(out / days[0] / "part.parquet")
    assert (pd.DatetimeIndex(whole["tx_datetime"]).strftime("date=%Y-%m-%d") == days[0]).all()
    before = {d: (out / d / "part.parquet").read_bytes() for d in days}

    run(world, world["recent"], out, partition_by_day=True, history=history)
    total = sum(len(pd.read_parquet(out / d / "part.parquet")) for d in days)
    assert total == world["n_recent"]  # replaced, not appended

    # A scheduler re-runs one day: only that partition is rewritten, the others keep their bytes.
    one_day = tmp_path / "day.parquet"
    recent = pd.read_parquet(world["recent"])
    day = pd.Timestamp(days[3].removeprefix("date="))
    recent[recent["tx_datetime"].dt.normalize() == day].to_parquet(one_day)
    rerun = run(world, one_day, out, partition_by_day=True, history=history)
    assert rerun.partitions == [days[3]]
    after = {d: (out / d / "part.parquet").read_bytes() for d in days}
    assert {d for d in days if after[d] != before[d]} <= {days[3]}
    pd.testing.assert_frame_equal(
        pd.read_parquet(out / days[3] / "part.parquet"),
        pd.read_parquet(io.BytesIO(before[days[3]])),
    )


def test_batch_scores_equal_the_online_path_for_the_same_events(world: dict, tmp_path: Path) -> None:
    tx, model = world["tx"], world["model"]
    run(world, world["full"], tmp_path / "scores.parquet")
    batch = pd.read_parquet(tmp_path / "scores.parquet").set_index("transaction_id")
    targets = tx.iloc[[-1500, -900, -400, -120, -3]]
    # Windows only read same-entity events: replay the targets' customers and terminals through the store.
    mask = tx["customer_id"].isin(targets["customer_id"]) | tx["terminal_id"].isin(targets["terminal_id"])
    events = tx[mask & (tx["transaction_id"] <= targets["transaction_id"].max())]
    delay = SPEC.data.label_delay
    due = sorted(zip(events["tx_datetime"] + delay, events["transaction_id"], events["tx_fraud"], strict=True))
    wanted = set(targets["transaction_id"])
    online: dict[int, float] = {}
    with OnlineStore(tmp_path / "online.sqlite", DEFS, timestamp="tx_datetime", label="tx_fraud",
                     id_column="transaction_id") as store:
        k = 0
        for event in events.drop(columns=["tx_fraud", "tx_fraud_scenario"]).to_dict("records"):
            while k < len(due) and due[k][0] <= event["tx_datetime"]:
                store.add_label(due[k][1], due[k][2], due[k][0])
                k += 1
            if event["transaction_id"] in wanted:
                row = store.features(event)
                online[event["transaction_id"]] = float(model.scores(pd.DataFrame([row])[NAMES])[0])
            store.update(event)
    assert len(online) == 5
    for tid, value in online.items():
        assert value == batch.loc[tid, "score"], tid


def test_chunk_rows_and_partition_output_are_checked(world: dict, tmp_path: Path) -> None:
    with pytest.raises(ScoringError, match=r"chunk_rows must be a positive number of rows\. Got 0 instead"):
        run(world, world["recent"], tmp_path / "o.parquet", chunk_rows=0)
    with pytest.raises(ScoringError, match="partition_by_day the output is a folder"):
        run(world, world["recent"], tmp_path / "o.parquet", partition_by_day=True)


def test_future_skew_uses_the_spec_window(world: dict, tmp_path: Path) -> None:
    frame = pd.read_parquet(world["recent"]).head(50)
    last = frame["tx_datetime"].max()
    source = tmp_path / "in.parquet"
    frame.to_parquet(source)
    summary = run(world, source, tmp_path / "o.parquet", now=last - timedelta(minutes=30))
    late = int((frame["tx_datetime"] > last - timedelta(minutes=30) + SPEC.data.max_future_skew).sum())
    assert late >= 1 and summary.rejected == late
