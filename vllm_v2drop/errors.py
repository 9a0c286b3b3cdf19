"""Errors that stop a V2Drop engine at start-up, and how they reach the user.

Each start-up refusal (an invalid ``v2drop`` config, an option V2Drop cannot run with, an
unsupported vLLM or a changed vLLM internal) is a :class:`V2DropStartupError` whose message
says what is wrong and what to do. They are ``ValueError`` s, as vLLM's own config errors
are; vLLM's config is a pydantic dataclass, so one raised from its config hook reaches the
caller wrapped in a pydantic ``ValidationError`` (the original is kept in its context).

A program that dies of one prints it as one line, not a traceback through vLLM's argument
parsing and pydantic: :func:`install_excepthook` (done by the plugin's ``register()``) makes
Python's handler of uncaught exceptions print ``ERROR: <message>`` for these, and leaves
every other exception to the handler it found. Code that catches the exception still gets
the exception itself (:func:`startup_error` finds ours inside pydantic's wrapper).
"""

from __future__ import annotations

import sys

__all__ = ["V2DropStartupError", "install_excepthook", "startup_error"]


class V2DropStartupError(ValueError):
    """V2Drop cannot start this engine; the message says why and what to change."""


def startup_error(exc: BaseException) -> V2DropStartupError | None:
    """``exc`` itself, or the V2Drop start-up error a pydantic ``ValidationError`` wraps, else None."""
    if isinstance(exc, V2DropStartupError):
        return exc
    errors = getattr(exc, "errors", None)
    if type(exc).__name__ == "ValidationError" and callable(errors):
        for err in errors():
            found = (err.get("ctx") or {}).get("error")
            if isinstance(found, V2DropStartupError):
                return found
    return None


def install_excepthook() -> None:
    """Print an uncaught V2Drop start-up error as one line (idempotent; chains to the previous hook)."""
    previous = sys.excepthook
    if getattr(previous, "_v2drop", False):
        return

    def excepthook(exc_type, exc, tb):
        found = startup_error(exc) if exc is not None else None
        if found is None:
            previous(exc_type, exc, tb)
            return
        sys.stderr.write(f"ERROR: {found}\n")
        sys.stderr.flush()

    excepthook._v2drop = True  # type: ignore[attr-defined]
    sys.excepthook = excepthook
