"""Keel: production-aware machine learning for tabular decisions."""

__version__ = "0.1.0"
__all__ = ["__version__"]
