"""Features: one declarative definition, computed point-in-time offline (tables) and online (per event).

Example::

    from keel.features import resolve_definitions, compute_features, OnlineStore

    defs = resolve_definitions(spec.features, spec.data)
    table = compute_features(events, defs, timestamp="tx_datetime", label="tx_fraud")
    store = OnlineStore.from_spec(spec)
    row = store.features(event); store.update(event)
"""

from keel.features.definitions import (
    Definition,
    RatioDefinition,
    RawDefinition,
    RowDefinition,
    WindowDefinition,
    definitions_hash,
    feature_names,
    required_columns,
    resolve_definitions,
    validate_schema,
)
from keel.features.offline import (
    BuildResult,
    FeatureStatus,
    build_feature_table,
    build_features,
    compute_features,
    feature_status,
    features_status,
    read_feature_table,
)
from keel.features.online import FeatureRow, OnlineStore

__all__ = [
    "BuildResult",
    "Definition",
    "FeatureRow",
    "FeatureStatus",
    "OnlineStore",
    "RatioDefinition",
    "RawDefinition",
    "RowDefinition",
    "WindowDefinition",
    "build_feature_table",
    "build_features",
    "compute_features",
    "definitions_hash",
    "feature_names",
    "feature_status",
    "features_status",
    "read_feature_table",
    "required_columns",
    "resolve_definitions",
    "validate_schema",
]
