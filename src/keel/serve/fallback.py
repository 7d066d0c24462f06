"""The documented rule that answers when the model cannot: no model, model error, timeout, abstain, stale state.

The rule is the spec's ``serving.fallback_rule`` (default ``models.rule``), an expression from
:mod:`keel.expressions` over the event's raw fields and its features, e.g. ``tx_amount > 220``. True means the
positive action. Without a rule the service answers the negative action (never block a payment on an error),
and says so.

Example::

    rule = FallbackRule("tx_amount > 220", positive_action="review", negative_action="approve")
    rule.decide([{"tx_amount": 250.0}, {"tx_amount": 12.0}])   # ['review', 'approve']
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from keel import expressions
from keel.errors import ServingError

# Why the fallback answered (the response's fallback_reason and the metric label).
MODEL_UNAVAILABLE = "model_unavailable"
MODEL_ERROR = "model_error"
MODEL_TIMEOUT = "model_timeout"
ABSTAIN = "abstain"
STALE_FEATURES = "stale_features"
FEATURES_UNAVAILABLE = "features_unavailable"
REASONS = (MODEL_UNAVAILABLE, MODEL_ERROR, MODEL_TIMEOUT, ABSTAIN, STALE_FEATURES, FEATURES_UNAVAILABLE)


class FallbackRule:
    """A safe expression answering ``positive_action`` where true, ``negative_action`` elsewhere.

    ``expression`` None: every answer is ``default_action`` (the negative action unless given).
    """

    def __init__(
        self,
        expression: str | None,
        *,
        positive_action: str = "review",
        negative_action: str = "approve",
        default_action: str | None = None,
    ) -> None:
        self.expression = expression
        self.positive_action = positive_action
        self.negative_action = negative_action
        self.default_action = default_action or negative_action
        self.columns: frozenset[str] = frozenset(expressions.columns(expression)) if expression else frozenset()

    def __repr__(self) -> str:
        return f"FallbackRule({self.expression!r})"

    def check_columns(self, available: Iterable[str]) -> None:
        """Refuse a rule reading a column that neither the request nor the features provide."""
        missing = sorted(self.columns - set(available))
        if missing:
            raise ServingError(
                f"The fallback rule {self.expression!r} reads {missing}, which is neither a request field nor a"
                " feature.",
                hint="Fix serving.fallback_rule (or models.rule) in keel.toml to use request fields or features.",
            )

    def decide(self, rows: Sequence[Mapping[str, Any]]) -> list[str]:
        """Actions for rows mapping names to numbers (raw fields merged with features). Missing/NaN reads false."""
        if not rows:
            return []
        if not self.expression:
            return [self.default_action] * len(rows)
        frame = {c: np.array([_number(r.get(c)) for r in rows], dtype=float) for c in self.columns}
        with np.errstate(all="ignore"):
            hits = expressions.evaluate(self.expression, frame)
        return [self.positive_action if h > 0 and not math.isnan(h) else self.negative_action for h in hits]


def _number(value: Any) -> float:
    if value is None or isinstance(value, str):
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


__all__ = ["REASONS", "FallbackRule"]
