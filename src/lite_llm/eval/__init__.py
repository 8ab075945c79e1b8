"""Evaluation: loss and bits per byte per domain (retention and growth reports build on it)."""

from .perplexity import DomainScore, evaluate

__all__ = ["DomainScore", "evaluate"]
