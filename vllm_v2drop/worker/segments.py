"""The decoder layers between two drop points of the drop loop, run eagerly or compiled.

vLLM compiles its language model's forward as one graph over every layer; the drop loop cannot
use it, since rows leave between layers. It runs the layers between two drop points as one
segment instead: eagerly when vLLM runs the model eagerly (``--enforce-eager``), else as one
``torch.compile`` graph per segment with vLLM's own Inductor backend, traced once for every row
count (dynamic shapes). Attention stays vLLM's opaque custom op, so each stage's layers still read
their own metadata from the forward context.
"""

from __future__ import annotations

import types
from collections.abc import Callable

import torch


def _layers(lm, first: int, last: int, keep_prev: bool, positions, hidden, residual):
    """Decoder layers ``first .. last - 1``; with ``keep_prev``, also the residual stream entering the last."""
    prev = None
    for idx in range(first, last):
        if keep_prev and idx == last - 1:
            # Never the layer's input itself: a layer given residual=None makes its input the
            # residual, which vLLM's fused add + RMSNorm (its CUDA kernel) then updates in place.
            prev = hidden.clone() if residual is None else hidden + residual
        hidden, residual = lm.layers[idx](positions, hidden, residual)
    return hidden, residual, prev


class Segments:
    """Runs the drop loop's segments: ``backend`` None runs them eagerly."""

    def __init__(self, backend: str | None = None):
        self.backend = backend
        self._compiled: dict[tuple, Callable] = {}

    def __call__(self, lm, first: int, last: int, keep_prev: bool, positions, hidden, residual):
        if self.backend is None:
            return _layers(lm, first, last, keep_prev, positions, hidden, residual)
        key = (id(lm), first, last, keep_prev)
        fn = self._compiled.get(key)
        if fn is None:
            # a code object of its own per segment: torch.compile keeps its graphs (and its
            # recompilation limit) per code object, and each segment is a graph of its own
            code = _layers.__code__.replace(co_name=f"v2drop_layers_{first}_{last}")
            fn = self._compiled[key] = torch.compile(types.FunctionType(code, _layers.__globals__),
                                                     backend=self.backend, dynamic=True)
        return fn(lm, first, last, keep_prev, positions, hidden, residual)
