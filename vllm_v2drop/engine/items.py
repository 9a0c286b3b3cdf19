"""Where a request's vision items lie in its prompt (engine core: the whole-item rule)."""

from __future__ import annotations

import numpy as np

__all__ = ["item_bounds"]


def item_bounds(request) -> tuple[np.ndarray, np.ndarray]:
    """``(starts, ends)`` of a request's placeholder ranges, cached on the request."""
    bounds = request.__dict__.get("_v2drop_item_bounds")
    if bounds is None:
        pos = sorted((f.mm_position.offset, f.mm_position.length) for f in request.mm_features or ())
        starts = np.asarray([o for o, _ in pos], dtype=np.int64)
        bounds = request._v2drop_item_bounds = (starts, starts + np.asarray([n for _, n in pos], dtype=np.int64))
    return bounds
