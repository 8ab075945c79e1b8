"""Serving: continuous batching with a TierSet per row, and the OpenAI-compatible HTTP server."""
