"""The one way V2Drop replaces a vLLM attribute: :func:`patch`.

Every replacement (a class's method, an instance's method, a module's function) goes through it,
so every one is idempotent the same way: the replacement carries :data:`MARK`, and a second
:func:`patch` of the same attribute finds it and changes nothing. Replacements wrap the original
with ``functools.update_wrapper``, so :func:`inspect.signature` (the seam check) still sees
vLLM's signature through them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

__all__ = ["MARK", "is_patched", "patch"]

MARK = "__v2drop__"


def is_patched(owner, name: str) -> bool:
    """Whether ``owner.name`` is already V2Drop's replacement."""
    return getattr(getattr(owner, name, None), MARK, False)


def patch(owner, name: str, wrap: Callable) -> bool:
    """Set ``owner.name`` to ``wrap(original)``, once; False (and nothing changed) if already done.

    ``owner`` is a class (every instance and subclass sees the replacement), an instance (only
    it does: the replacement lands in its ``__dict__``) or a module.
    """
    original = getattr(owner, name)
    if getattr(original, MARK, False):
        return False
    replacement = wrap(original)
    try:
        functools.update_wrapper(replacement, original)
    except (AttributeError, TypeError):  # an original without a name or docstring (a partial)
        pass
    setattr(replacement, MARK, True)
    setattr(owner, name, replacement)
    return True
