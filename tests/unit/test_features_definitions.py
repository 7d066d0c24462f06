"""Feature definitions: names, order, hash, leakage refusal, and schema-change errors (messages pinned)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from keel.errors import FeatureError
from keel.features.definitions import (
    RawDefinition,
    RowDefinition,
    WindowDefinition,
    definitions_hash,
    feature_names,
    required_columns,
    resolve_definitions,
    validate_schema,
)
from keel.spec import Data, Features, load_spec

FLAGSHIP = Path(__file__).resolve().parents[2] / "examples" / "card-fraud" / "keel.toml"
SCHEMA = {
    "transaction_id": "BIGINT",
    "tx_datetime": "TIMESTAMP_NS",
    "customer_id": "BIGINT",
    "terminal_id": "BIGINT",
    "tx_amount": "DOUBLE",
    "tx_fraud": "BIGINT",
}


def _data(**kw: object) -> Data:
    base = {"source": "x.parquet", "timestamp": "ts", "label": "y", "label_delay": "7d"}
    return Data.model_validate({**base, **kw})


@pytest.fixture(scope="module")
def flagship():
    spec = load_spec(FLAGSHIP)
    return spec, resolve_definitions(spec.features, spec.data)


def test_flagship_resolves_to_the_handbook_fifteen_in_order(flagship) -> None:
    _, defs = flagship
    assert feature_names(defs) == [
        "tx_amount",
        "tx_during_weekend",
        "tx_during_night",
        *[f"customer_id_nb_tx_{n}day_window" for n in (1, 7, 30)],
        *[f"customer_id_avg_amount_{n}day_window" for n in (1, 7, 30)],
        *[f"terminal_id_nb_tx_{n}day_window" for n in (1, 7, 30)],
        *[f"terminal_id_risk_{n}day_window" for n in (1, 7, 30)],
    ]
    risk7 = next(d for d in defs if d.name == "terminal_id_risk_7day_window")
    assert risk7 == WindowDefinition(
        name="terminal_id_risk_7day_window",
        entity="terminal_id",
        aggregate="label_rate",
        column=None,
        window=timedelta(days=7),
        delay=timedelta(days=7),
    )
    assert isinstance(defs[0], RawDefinition) and isinstance(defs[1], RowDefinition)


def test_name_template_fields_and_default_template() -> None:
    features = Features.model_validate(
        {
            "windows": [
                {"entity": "card", "aggregates": ["sum", "max"], "column": "amt", "windows": ["12h", "2d"]}
            ]
        }
    )
    names = feature_names(resolve_definitions(features))
    assert names == ["card_sum_12h", "card_max_12h", "card_sum_2d", "card_max_2d"]
    days = Features.model_validate(
        {"windows": [{"entity": "card", "aggregates": ["count"], "windows": ["12h"], "name": "n_{days}d"}]}
    )
    assert feature_names(resolve_definitions(days)) == ["n_0.5d"]


def test_duplicate_names_are_refused() -> None:
    features = Features.model_validate(
        {
            "windows": [
                {"entity": "card", "aggregates": ["count"], "windows": ["1d", "7d"], "name": "card_count"}
            ]
        }
    )
    with pytest.raises(FeatureError, match=r"Two features are named 'card_count'"):
        resolve_definitions(features)


def test_required_columns(flagship) -> None:
    _spec, defs = flagship
    assert required_columns(defs, timestamp="tx_datetime", label="tx_fraud") == [
        "tx_datetime",
        "tx_amount",
        "customer_id",
        "terminal_id",
        "tx_fraud",
    ]


def test_hash_is_stable_and_changes_with_any_definition(flagship) -> None:
    spec, defs = flagship
    again = resolve_definitions(spec.features, spec.data)
    assert definitions_hash(defs) == definitions_hash(again)
    assert len(definitions_hash(defs)) == 64
    changed = spec.features.model_copy(
        update={"windows": [spec.features.windows[0].model_copy(update={"windows": [timedelta(days=2)]})]}
    )
    assert definitions_hash(resolve_definitions(changed)) != definitions_hash(defs)
    shifted = [
        d
        if d.name != "terminal_id_risk_7day_window"
        else d.__class__(**{**d.__dict__, "delay": timedelta(days=8)})
        for d in defs
    ]
    assert definitions_hash(shifted) != definitions_hash(defs)


@pytest.mark.parametrize(
    ("block", "match"),
    [
        (
            {"entity": "t", "aggregates": ["label_rate"], "windows": ["7d"], "delay": "1d"},
            r"Feature 't_label_rate_7d' aggregates labels with delay 1d, shorter than data.label_delay 7d.*leakage",
        ),
        (
            {"entity": "t", "aggregates": ["label_count"], "windows": ["7d"]},
            r"delay 0d, shorter than data.label_delay 7d",
        ),
        (
            {"entity": "t", "aggregates": ["sum"], "column": "y", "windows": ["7d"], "delay": "2d"},
            r"Feature 't_sum_7d' aggregates labels with delay 2d",
        ),
    ],
)
def test_label_aggregates_younger_than_the_label_delay_are_leakage(block: dict, match: str) -> None:
    features = Features.model_validate({"windows": [block]})
    with pytest.raises(FeatureError, match=match):
        resolve_definitions(features, _data())


def test_label_aggregate_at_exactly_the_label_delay_is_allowed() -> None:
    features = Features.model_validate(
        {"windows": [{"entity": "t", "aggregates": ["label_rate"], "windows": ["7d"], "delay": "7d"}]}
    )
    assert feature_names(resolve_definitions(features, _data())) == ["t_label_rate_7d"]


def test_label_of_the_current_event_is_leakage_even_without_label_delay() -> None:
    features = Features.model_validate(
        {"windows": [{"entity": "t", "aggregates": ["label_count"], "windows": ["7d"]}]}
    )
    with pytest.raises(FeatureError, match=r"delay 0 and include_current = true: it would read the label"):
        resolve_definitions(features, _data(label_delay="0"))


def test_row_feature_on_the_label_is_leakage() -> None:
    features = Features.model_validate({"row": [{"name": "y_copy", "kind": "column", "column": "y"}]})
    with pytest.raises(FeatureError, match=r"Feature 'y_copy' reads the label column 'y' of its own row"):
        resolve_definitions(features, _data())


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (
            lambda s: s.pop("terminal_id"),
            r"Column 'terminal_id' needed by feature 'terminal_id_nb_tx_1day_window' \(its entity\) is missing",
        ),
        (
            lambda s: s.update({"TX_AMOUNT": s.pop("tx_amount")}),
            r"Column 'tx_amount' needed by feature 'tx_amount' is missing from src.parquet \(keel.toml data.schema "
            r"promises it as float\). A column 'TX_AMOUNT' exists; was it renamed\?",
        ),
        (
            lambda s: s.update({"tx_amount": "VARCHAR"}),
            r"Column 'tx_amount' needed by feature 'tx_amount' changed type in src.parquet: keel.toml data.schema "
            r"says float, the source has VARCHAR \(string\)",
        ),
        (
            lambda s: s.update({"tx_datetime": "VARCHAR"}),
            r"Column 'tx_datetime' needed by window feature 'customer_id_nb_tx_1day_window' \(the event time\) changed",
        ),
        (
            lambda s: s.pop("tx_fraud"),
            r"Column 'tx_fraud' needed by feature 'terminal_id_risk_1day_window' \(the label\) is missing",
        ),
    ],
)
def test_schema_changes_name_the_column_and_the_feature(flagship, change, match: str) -> None:
    spec, defs = flagship
    schema = dict(SCHEMA)
    change(schema)
    with pytest.raises(FeatureError, match=match):
        validate_schema(
            defs,
            schema,
            timestamp="tx_datetime",
            label="tx_fraud",
            expected=spec.data.schema_,
            source="src.parquet",
        )


def test_int_float_widening_is_not_a_schema_change(flagship) -> None:
    spec, defs = flagship
    validate_schema(
        defs,
        {**SCHEMA, "tx_amount": "BIGINT"},
        timestamp="tx_datetime",
        label="tx_fraud",
        expected=spec.data.schema_,
    )


def test_unknown_column_without_expected_schema_and_ratio_to_nothing() -> None:
    features = Features.model_validate(
        {
            "windows": [{"entity": "card", "aggregates": ["mean"], "column": "amount", "windows": ["1d"]}],
            "ratios": [{"name": "r", "numerator": "card_mean_1d", "denominator": "nope"}],
        }
    )
    defs = resolve_definitions(features)
    with pytest.raises(
        FeatureError, match=r"Column 'amount' needed by feature 'card_mean_1d' is missing from the source"
    ):
        validate_schema(defs, {"ts": "TIMESTAMP", "card": "BIGINT"}, timestamp="ts")
    with pytest.raises(
        FeatureError, match=r"Ratio feature 'r' references 'nope', which is neither a feature nor a column"
    ):
        validate_schema(defs, {"ts": "TIMESTAMP", "card": "BIGINT", "amount": "DOUBLE"}, timestamp="ts")
    with pytest.raises(
        FeatureError, match=r"Column 'amount' needed by feature 'card_mean_1d' has type VARCHAR \(string\)"
    ):
        validate_schema(defs, {"ts": "TIMESTAMP", "card": "BIGINT", "amount": "VARCHAR"}, timestamp="ts")
