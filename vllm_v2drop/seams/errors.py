"""vLLM's request-validation error, which the OpenAI server answers with HTTP 400 (frontend).

A leaf of the seams package (no V2Drop import): :class:`vllm_v2drop.overrides.V2DropRequestError`
subclasses it. Declared in the frontend seam (:mod:`vllm_v2drop.seams.frontend`).
"""

from __future__ import annotations

__all__ = ["validation_error_base"]


class _NoVLLMValidationError(Exception):
    """Stands in for ``VLLMValidationError`` where vLLM is not installed (plain ``Exception`` and
    ``ValueError`` together have no consistent method resolution order)."""


def validation_error_base() -> type[Exception]:
    """vLLM's ``VLLMValidationError``, or a stand-in where vLLM is not installed (the plan and its
    tools work without it)."""
    try:
        from vllm.exceptions import VLLMValidationError

        return VLLMValidationError
    except ImportError:
        return _NoVLLMValidationError
