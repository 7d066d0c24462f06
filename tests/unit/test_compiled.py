"""LightGBM trees compiled with LLVM: bit-identical to Booster.predict, used by every DecisionModel path, or absent."""

from __future__ import annotations

import os
import pickle
import sys

import numpy as np
import pytest

lgb = pytest.importorskip("lightgbm")
pytest.importorskip("llvmlite")

from keel import compiled  # noqa: E402
from keel.artifact import DecisionModel  # noqa: E402
from keel.compiled import ENV_SWITCH, compile_forest, parse_model  # noqa: E402


def _data(n: int = 3000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6))
    x[:, 1] = rng.integers(0, 2, size=n)  # a 0/1 feature: LightGBM splits it at 1e-35
    x[rng.random(n) < 0.1, 2] = np.nan  # missing values: NaN default directions
    x[rng.random(n) < 0.3, 3] = 0.0
    y = ((x[:, 0] + x[:, 1] - np.nan_to_num(x[:, 2]) + (x[:, 3] == 0)) > 0.5).astype(float)
    return x, y


def _booster(x: np.ndarray, y: np.ndarray, **params: object) -> lgb.Booster:
    base = {"objective": "binary", "num_leaves": 15, "verbose": -1, "seed": 0, "min_data_in_leaf": 5}
    return lgb.train(base | params, lgb.Dataset(x, y), num_boost_round=12)


def _awkward_rows(x: np.ndarray) -> np.ndarray:
    """Rows with NaN, zeros of both signs and values below LightGBM's 1e-35 zero threshold in every column."""
    rows = np.array(x[:200])
    specials = np.array([np.nan, 0.0, -0.0, 1e-40, -1e-40, 1e-35, -1e-35, 1e300])
    rng = np.random.default_rng(1)
    mask = rng.random(rows.shape) < 0.3
    rows[mask] = rng.choice(specials, size=int(mask.sum()))
    return rows


@pytest.mark.parametrize(
    "params",
    [{}, {"zero_as_missing": True}, {"use_missing": False}, {"sigmoid": 0.7}],
    ids=["nan-missing", "zero-missing", "no-missing", "sigmoid"],
)
def test_scores_are_bit_identical_to_booster_predict(params: dict[str, object], tmp_path: object) -> None:
    x, y = _data()
    booster = _booster(x, y, **params)
    forest = compile_forest(booster.model_to_string(), booster, cache=False)
    assert forest is not None
    rows = np.vstack([x, _awkward_rows(x)])
    expected = booster.predict(rows)
    assert np.array_equal(forest.predict(rows), expected)  # equality, not closeness
    assert np.array_equal(forest.predict(rows, threads=2), expected)
    assert np.array_equal(forest.predict(np.asfortranarray(rows)), expected)  # read in place, any layout
    assert np.array_equal(forest.predict(rows[::2]), expected[::2])
    assert np.array_equal(forest.predict(rows[0]), expected[:1])  # one row


def test_a_few_rows_go_through_per_thread_buffers_with_the_same_scores() -> None:
    import threading

    x, y = _data()
    booster = _booster(x, y)
    forest = compile_forest(booster.model_to_string(), booster, cache=False)
    assert forest is not None
    rows = _awkward_rows(x)
    expected = booster.predict(rows)
    for n in (1, 2, 7, 8, 9):  # 9: past the buffers
        assert np.array_equal(forest.predict(rows[:n]), expected[:n])
        assert np.array_equal(forest.predict(np.asfortranarray(rows[:n])), expected[:n])
        assert np.array_equal(forest.predict(rows[1:2 * n + 1:2]), expected[1:2 * n + 1:2])
    first = forest.predict(rows[:1])
    forest.predict(rows[1:2])
    assert np.array_equal(first, expected[:1])  # a result is a copy: the next call does not overwrite it
    seen: list[bool] = []

    def worker(offset: int) -> None:  # threads score at once, each through its own buffers
        for i in range(300):
            k = (offset + i) % len(rows)
            seen.append(bool(np.array_equal(forest.predict(rows[k:k + 1]), expected[k:k + 1])))

    threads = [threading.Thread(target=worker, args=(j * 17,)) for j in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(seen) == 1200 and all(seen)


def test_the_missing_type_each_node_uses_is_reproduced() -> None:
    x, y = _data()
    types = set()
    for params in ({}, {"zero_as_missing": True}):
        _, _, trees = parse_model(_booster(x, y, **params).model_to_string())
        types |= {(d >> 2) & 3 for t in trees for d in t.decision_type}
    assert types == {0, 1, 2}  # None, Zero and NaN missing types all occur in the parametrized cases above


@pytest.mark.parametrize(
    "params",
    [{"objective": "regression"}, {"objective": "multiclass", "num_class": 3}, {"linear_tree": True}],
    ids=["regression", "multiclass", "linear"],
)
def test_models_the_compiler_does_not_reproduce_fall_back(params: dict[str, object]) -> None:
    x, y = _data()
    if params.get("objective") == "multiclass":
        y = (np.nan_to_num(x[:, 0]) > 0).astype(float) + (np.nan_to_num(x[:, 4]) > 0)
    booster = _booster(np.nan_to_num(x), y, **params)
    assert compile_forest(booster.model_to_string(), booster, cache=False) is None


def test_categorical_splits_fall_back() -> None:
    rng = np.random.default_rng(2)
    x = np.column_stack([rng.integers(0, 8, 2000), rng.normal(size=2000)]).astype(float)
    y = np.isin(x[:, 0], [1, 3, 6]).astype(float)
    booster = lgb.train(
        {"objective": "binary", "verbose": -1, "min_data_per_group": 5, "cat_smooth": 1},
        lgb.Dataset(x, y, categorical_feature=[0]),
        num_boost_round=5,
    )
    with pytest.raises(compiled.UnsupportedModel, match="categorical"):
        parse_model(booster.model_to_string())
    assert compile_forest(booster.model_to_string(), booster, cache=False) is None


def test_switch_and_missing_llvmlite_fall_back(monkeypatch: pytest.MonkeyPatch) -> None:
    x, y = _data()
    booster = _booster(x, y)
    monkeypatch.setenv(ENV_SWITCH, "0")
    assert compile_forest(booster.model_to_string(), booster, cache=False) is None
    monkeypatch.delenv(ENV_SWITCH)
    monkeypatch.setitem(sys.modules, "llvmlite", None)  # import llvmlite now raises ImportError
    assert compile_forest(booster.model_to_string(), booster, cache=False) is None


def test_a_forest_that_disagrees_with_lightgbm_on_a_probe_row_is_refused() -> None:
    x, y = _data()
    booster = _booster(x, y)

    class OffByOneUlp:
        def predict(self, rows: np.ndarray, num_threads: int = 0) -> np.ndarray:
            return np.nextafter(booster.predict(rows), 2.0)

    assert compile_forest(booster.model_to_string(), OffByOneUlp(), cache=False) is None


def test_cache_is_reused_verified_and_private(tmp_path: object, monkeypatch: pytest.MonkeyPatch) -> None:
    from pathlib import Path

    folder = Path(str(tmp_path)) / "trees"
    x, y = _data()
    booster = _booster(x, y)
    text = booster.model_to_string()
    first = compile_forest(text, booster, cache=folder)
    (cached,) = folder.glob("*.o")
    assert first is not None and oct(folder.stat().st_mode & 0o777) == "0o700"
    assert cached.read_bytes()[:64].decode() == __import__("hashlib").sha256(cached.read_bytes()[65:]).hexdigest()

    loads: list[bytes | None] = []
    original = compiled._cache_load
    monkeypatch.setattr(compiled, "_cache_load", lambda p: loads.append(original(p)) or loads[-1])
    again = compile_forest(text, booster, cache=folder)
    assert again is not None and loads[-1] is not None  # the second build took the cached code
    assert np.array_equal(again.predict(x), booster.predict(x))

    # Tampered code (digest no longer matches) is ignored, recompiled and rewritten.
    data = bytearray(cached.read_bytes())
    data[-1] ^= 0xFF
    cached.write_bytes(bytes(data))
    rebuilt = compile_forest(text, booster, cache=folder)
    assert loads[-1] is None and rebuilt is not None
    assert np.array_equal(rebuilt.predict(x), booster.predict(x))
    assert original(cached) is not None

    # A folder others can write is never read from (nor written to).
    os.chmod(folder, 0o777)
    assert original(cached) is None
    compile_forest(text, booster, cache=folder)
    assert loads[-1] is None


def test_decision_model_scores_through_the_compiled_forest_on_every_path(tmp_path: object) -> None:
    from pathlib import Path

    x, y = _data()
    booster = _booster(x, y)
    names = [f"f{i}" for i in range(x.shape[1])]
    model = DecisionModel(kind="lightgbm", feature_names=names, estimator=booster, threshold=0.5)
    loaded = DecisionModel.load(model.save(Path(str(tmp_path)) / "model"), threads=1)
    assert loaded._forest_built and loaded.compiled() is not None  # compiled at load, before the first request
    batch = loaded.scores(x)
    singles = np.array([loaded.scores(row)[0] for row in x[:50]])
    assert np.array_equal(batch, booster.predict(x))
    assert np.array_equal(singles, batch[:50])
    clone = pickle.loads(pickle.dumps(loaded))  # native code is dropped and rebuilt on use
    assert clone._forest is None and np.array_equal(clone.scores(x), batch)


def test_decision_model_without_the_compiler_gives_the_same_scores(monkeypatch: pytest.MonkeyPatch) -> None:
    x, y = _data()
    booster = _booster(x, y)
    names = [f"f{i}" for i in range(x.shape[1])]
    monkeypatch.setenv(ENV_SWITCH, "0")
    plain = DecisionModel(kind="lightgbm", feature_names=names, estimator=booster)
    assert plain.compiled() is None
    assert np.array_equal(plain.scores(x), booster.predict(x))
