"""The safe expression language for rules and per-row costs."""

from __future__ import annotations

import numpy as np
import pytest

from keel.expressions import ExpressionError, columns, evaluate


def test_arithmetic_comparison_and_logic() -> None:
    frame = {"a": np.array([1.0, 250.0, 300.0]), "b": np.array([0.0, 1.0, 0.0])}
    np.testing.assert_array_equal(evaluate("a > 220", frame), [0, 1, 1])
    np.testing.assert_array_equal(evaluate("a > 220 and b == 1", frame), [0, 1, 0])
    np.testing.assert_array_equal(evaluate("not b", frame), [1, 0, 1])
    np.testing.assert_allclose(evaluate("2.0 + 0.01 * a", frame), [2.01, 4.5, 5.0])
    np.testing.assert_allclose(evaluate("max(a, 100)", frame), [100, 250, 300])
    np.testing.assert_allclose(evaluate("2", frame), [2, 2, 2])  # constants broadcast to the frame
    assert columns("log1p(a) / max(b, 1)") == {"a", "b"}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("__import__('os').system('x')", "not allowed|calls a function"),
        ("a.b", "Attribute.*not allowed"),
        ("a[0]", "Subscript.*not allowed"),
        ("'text'", "only numbers"),
        ("open(1)", "calls a function that is not one of"),
        ("a >", "not a valid expression"),
    ],
)
def test_unsafe_or_broken_expressions_are_refused(text: str, message: str) -> None:
    with pytest.raises(ExpressionError, match=message):
        evaluate(text, {"a": np.zeros(2)})


def test_unknown_column_is_named() -> None:
    with pytest.raises(ExpressionError, match="reads column 'amount'"):
        evaluate("amount > 1", {"a": np.zeros(2)})
