"""The OpenAI-compatible API of a causal LM: ``/v1/models``, ``/v1/completions`` and ``/v1/chat/completions``,
streaming or not, with the request's ``model`` naming the adapter (or the base model), as multi-LoRA servers do.

Requests are checked in full before they reach the batch: a bad one gets an OpenAI-style error body
(``{"error": {"message", "type", "param", "code"}}``, 4xx) and never costs the others anything. ``errors`` makes
those bodies, ``schemas`` holds the request and response models, ``routes`` the router.
"""

from .errors import OpenAIError, error_body, install_errors, validation_error
from .routes import LMLimits, router

__all__ = ["LMLimits", "OpenAIError", "error_body", "install_errors", "router", "validation_error"]
