"""Serving: the generation loop with continuous batching, TierSet selection, the HTTP server."""
