"""A small, safe expression language over columns, for rules (``tx_amount > 220``) and row costs.

Parsed with :mod:`ast` and evaluated on NumPy arrays: only column names, numbers, arithmetic,
comparisons, ``and``/``or``/``not`` and a few functions are allowed, so a spec can never run code.
"""

from __future__ import annotations

import ast
from collections.abc import Mapping
from typing import Any

import numpy as np

_FUNCTIONS = {
    "abs": np.abs,
    "log1p": np.log1p,
    "min": np.minimum,
    "max": np.maximum,
}
_BINOPS = {
    ast.Add: np.add,
    ast.Sub: np.subtract,
    ast.Mult: np.multiply,
    ast.Div: np.divide,
}
_COMPARE = {
    ast.Gt: np.greater,
    ast.GtE: np.greater_equal,
    ast.Lt: np.less,
    ast.LtE: np.less_equal,
    ast.Eq: np.equal,
    ast.NotEq: np.not_equal,
}


class ExpressionError(ValueError):
    """The expression uses something outside the allowed language."""


def parse(text: str) -> ast.Expression:
    """Parse and check an expression; raise :class:`ExpressionError` saying what is not allowed."""
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as exc:
        raise ExpressionError(f"is not a valid expression ({exc.msg}): {text!r}") from exc
    for node in ast.walk(tree):
        allowed = (
            ast.Expression, ast.Name, ast.Load, ast.Constant, ast.BinOp, ast.UnaryOp, ast.USub,
            ast.UAdd, ast.Not, ast.Compare, ast.BoolOp, ast.And, ast.Or, ast.Call,
            *_BINOPS, *_COMPARE,
        )
        if not isinstance(node, allowed):
            raise ExpressionError(
                f"uses {type(node).__name__}, which is not allowed in {text!r}; use column names, numbers,"
                " + - * /, comparisons, and/or/not, abs(), log1p(), min(), max()."
            )
        if isinstance(node, ast.Call) and not (
            isinstance(node.func, ast.Name) and node.func.id in _FUNCTIONS
        ):
            raise ExpressionError(f"calls a function that is not one of {sorted(_FUNCTIONS)}: {text!r}")
        if isinstance(node, ast.Constant) and not isinstance(node.value, int | float | bool):
            raise ExpressionError(f"may hold only numbers as constants: {text!r}")
    return tree


def columns(text: str) -> set[str]:
    """Column names an expression reads."""
    tree = parse(text)
    called = {id(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)}
    return {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and id(n) not in called}


def evaluate(text: str, frame: Mapping[str, Any]) -> np.ndarray:
    """Evaluate on a mapping of column name to array (a DataFrame works); returns a float array."""
    tree = parse(text)

    def run(node: ast.AST) -> Any:
        if isinstance(node, ast.Expression):
            return run(node.body)
        if isinstance(node, ast.Constant):
            return float(node.value)
        if isinstance(node, ast.Name):
            if node.id not in frame:
                raise ExpressionError(f"reads column {node.id!r}, which the data does not have")
            return np.asarray(frame[node.id], dtype=float)
        if isinstance(node, ast.BinOp):
            return _BINOPS[type(node.op)](run(node.left), run(node.right))
        if isinstance(node, ast.UnaryOp):
            value = run(node.operand)
            if isinstance(node.op, ast.Not):
                return np.logical_not(value).astype(float)
            return -value if isinstance(node.op, ast.USub) else value
        if isinstance(node, ast.Compare):
            left = run(node.left)
            result: Any = True
            for op, comparator in zip(node.ops, node.comparators, strict=True):
                right = run(comparator)
                result = np.logical_and(result, _COMPARE[type(op)](left, right))
                left = right
            return np.asarray(result, dtype=float)
        if isinstance(node, ast.BoolOp):
            values = [np.asarray(run(v), dtype=bool) for v in node.values]
            combine = np.logical_and if isinstance(node.op, ast.And) else np.logical_or
            out = values[0]
            for v in values[1:]:
                out = combine(out, v)
            return out.astype(float)
        if isinstance(node, ast.Call):
            assert isinstance(node.func, ast.Name)
            return _FUNCTIONS[node.func.id](*[run(a) for a in node.args])
        raise ExpressionError(f"cannot evaluate {type(node).__name__}")  # pragma: no cover - parse() rejects it

    n = len(next(iter(frame.values()))) if len(frame) else 1
    return np.broadcast_to(np.asarray(run(tree), dtype=float), (n,)).astype(float)
