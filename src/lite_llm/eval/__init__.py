"""Evaluation: loss and bits per byte per domain, and retention reports built on it."""

from ..train.validation import DomainScore, evaluate
from .retention import RetentionReport

__all__ = ["DomainScore", "RetentionReport", "evaluate"]
