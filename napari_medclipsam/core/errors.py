"""Exceptions shared by the core modules (no heavy imports)."""

from __future__ import annotations


class CancelledError(RuntimeError):
    """Raised inside long computations when their ``should_stop`` callable returns True."""


class InputError(ValueError):
    """The user's input (an image, a prompt, a file) cannot be used; the message says why."""
