"""The spec loader: every user-facing message is pinned; good specs parse to the right values."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from keel.durations import format_duration, parse_duration
from keel.errors import SpecError
from keel.spec import load_spec, parse_spec

FLAGSHIP = Path(__file__).resolve().parents[2] / "examples" / "card-fraud" / "keel.toml"


def minimal(**over: dict) -> dict:
    base = {
        "project": {"name": "p"},
        "decision": {"question": "Act?", "positive_class": "bad"},
        "data": {"source": "t.csv", "label": "y", "timestamp": "t"},
    }
    for key, value in over.items():
        base[key] = {**base.get(key, {}), **value}
    return base


def test_flagship_spec_loads_with_typed_values() -> None:
    spec = load_spec(FLAGSHIP)
    assert spec.data.label_delay == timedelta(days=7)
    assert spec.decision.costs.false_negative == "tx_amount"
    assert spec.decision.costs.false_positive == 2.0
    assert spec.decision.capacity is not None and spec.decision.capacity.max_positives == 100
    assert spec.gap == timedelta(days=7)  # default gap is the label delay
    assert spec.resolve(spec.data.source) == FLAGSHIP.parent / "data" / "transactions.parquet"
    assert len(spec.features.windows) == 4


def test_spec_hash_is_stable_and_sensitive() -> None:
    a = parse_spec(minimal())
    b = parse_spec(minimal(), root="/elsewhere")
    c = parse_spec(minimal(data={"label_delay": "1d"}))
    assert a.spec_hash() == b.spec_hash()
    assert a.spec_hash() != c.spec_hash()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (minimal(decision={"costs": {"false_positive": -5}}),
         r"'decision\.costs\.false_positive' value in keel\.toml must be a non-negative number.*Got -5\.0 instead"),
        (minimal(data={"label_delay": "seven days"}),
         r"'data\.label_delay' value in keel\.toml must be a duration such as '7d'.*Got 'seven days' instead"),
        (minimal(data={"colour": 1}), r"The key 'data\.colour' in keel\.toml is not a known setting"),
        ({**minimal(), "modles": {}}, r"The key 'modles'.*Did you mean 'models'\?"),
        ({"project": {"name": "p"}, "data": {"source": "a", "label": "y"}},
         r"The key 'decision' in keel\.toml is required but missing"),
        (minimal(decision={"costs": {"false_negative": "amount *"}}),
         r"'decision\.costs\.false_negative'.*not a valid expression"),
        (minimal(decision={"costs": {"false_negative": "__import__('os')"}}),
         r"'decision\.costs\.false_negative'.*calls a function that is not one of"),
        (minimal(data={"timestamp": None}), r"split\.strategy is 'time' but data\.timestamp is not set"),
        (minimal(data={"entity_keys": ["y"]}), r"data\.label 'y' is also used as an id"),
        (minimal(features={"raw": ["y"]}), r"features\.raw lists the label"),
        (minimal(models={"abstain_band": [0.7, 0.2]}), r"'models\.abstain_band'.*0 <= low < high <= 1"),
        (minimal(decision={"headline_metric": "card_precision_at_k"}), r"needs a \[decision\.precision_at_k\]"),
        (minimal(features={"windows": [{"entity": "c", "aggregates": ["mean"], "windows": ["1d"]}]}),
         r"need 'column'"),
        (minimal(data={"schema": {"a": "integer"}}), r"type of column 'a' must be one of"),
    ],
)
def test_bad_spec_messages(change: dict, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        parse_spec(change)


def test_all_problems_reported_at_once() -> None:
    with pytest.raises(SpecError, match=r"has 2 problems") as info:
        parse_spec(minimal(data={"label_delay": "x", "colour": 1}))
    assert "label_delay" in str(info.value) and "colour" in str(info.value)


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=r"No spec found at .*keel init"):
        load_spec(tmp_path / "nope.toml")
    bad = tmp_path / "keel.toml"
    bad.write_text("[project\nname = 1\n")
    with pytest.raises(SpecError, match=r"is not valid TOML"):
        load_spec(bad)
    assert load_spec  # the folder form finds keel.toml inside
    bad.write_text('[project]\nname="p"\n[decision]\nquestion="q"\npositive_class="p"\n[data]\nsource="a"\nlabel="y"\ntimestamp="t"\n')
    assert load_spec(tmp_path).root == tmp_path.resolve()


@pytest.mark.parametrize(
    ("text", "seconds"), [("7d", 604800), ("12h", 43200), ("30m", 1800), ("45s", 45), ("2w", 1209600), ("0", 0)]
)
def test_durations_round_trip(text: str, seconds: int) -> None:
    value = parse_duration(text)
    assert value.total_seconds() == seconds
    assert parse_duration(format_duration(value)) == value


@pytest.mark.parametrize("text", ["7 days", "d7", "-1d", "", "1y", True])
def test_bad_durations(text: object) -> None:
    with pytest.raises(ValueError, match="must be a duration"):
        parse_duration(text)
