"""Errors that reach users.

Every error Lite LLM raises on bad input is one of these, and its message is one sentence
that says what is wrong and what to do about it.  The CLI prints the message alone (no stack
trace) and exits non-zero.
"""

from __future__ import annotations


class LiteLLMError(Exception):
    """Base class of every user-facing Lite LLM error."""


class ConfigError(LiteLLMError, ValueError):
    """A configuration breaks an invariant (raised at construction, naming the field)."""


class TierSetError(LiteLLMError, ValueError):
    """A TierSet names a tier the model does not have, or selects nothing."""


class CheckpointError(LiteLLMError):
    """A checkpoint is missing, corrupt, truncated or of an unsupported version."""


class PromptError(LiteLLMError, ValueError):
    """Model inputs that cannot be computed with: an empty prompt or one longer than the model's
    context, token ids that are not integers or lie outside the vocabulary, labels that do not
    fit the inputs."""


class SamplingError(LiteLLMError, ValueError):
    """A sampling setting out of its range (temperature, top-k, top-p, penalties)."""


class DataError(LiteLLMError, ValueError):
    """A corpus, tokenizer or prepared dataset is missing, empty, corrupt or too small."""
