"""How many vision rows a schedule keeps: per item and stage, per layer, on average.

Pure Python + NumPy (no torch, no vLLM), like the request plan, the step plan and the
batch planner built on it, so the API server, the scheduler side (KV blocks, compact
sequence lengths) and the worker side (attention metadata, row gathers) call the same
functions and can never disagree.

Vocabulary
----------
* A *schedule* is ``layers = (layer_1, ..., layer_S)`` with
  ``1 <= layer_1 < ... < layer_S < num_layers`` and ``keep_ratios`` of the
  same length, each in ``[0, 1]`` and relative to the rows still present.
* *Stage* ``s`` (``0..S``) is the part of the model that sees the rows kept
  after the ``s``-th drop: stage 0 is layers ``0 .. layer_1 - 1``, stage
  ``s >= 1`` is layers ``layer_s .. layer_{s+1} - 1`` (the last one runs to
  ``num_layers - 1``).
* ``n_0`` is an item's candidate vision rows, ``n_s`` the rows it still has in
  stage ``s``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

__all__ = [
    "FLOOR_EPS",
    "SolvedRatios",
    "average_retention",
    "check_schedule",
    "keep_counts",
    "rows_per_layer",
    "solve_keep_ratios",
    "stage_of_layer",
]

#: Added before flooring ``ratio * n`` so that products that are mathematically
#: integers but land just below them in binary floating point are not floored
#: one too low (``0.29 * 100 == 28.999999999999996`` must keep 29 rows, and
#: ``0.1 * 30`` must keep 3). It is far smaller than any genuine fractional
#: part of ``ratio * n`` for a ratio given with up to 8 decimals.
FLOOR_EPS = 1e-9


def keep_counts(n0: int, keep_ratios: Sequence[float], min_keep: int = 1) -> tuple[int, ...]:
    """Rows an item of ``n0`` rows keeps after each stage: ``(n_1, ..., n_S)``.

    ``n_s = min(n_{s-1}, max(min_keep, floor(ratio_s * n_{s-1} + FLOOR_EPS)))``:
    a stage keeps at least ``min_keep`` rows but never adds rows back (an item
    smaller than ``min_keep`` keeps what it has).
    """
    if n0 < 0:
        raise ValueError(f"n0 must be >= 0, got {n0}")
    if min_keep < 1:
        raise ValueError(f"min_keep must be >= 1, got {min_keep}")
    counts: list[int] = []
    n = int(n0)
    for ratio in keep_ratios:
        n = min(n, max(min_keep, math.floor(float(ratio) * n + FLOOR_EPS)))
        counts.append(n)
    return tuple(counts)


def check_schedule(layers: Sequence[int], keep_ratios: Sequence[float], num_layers: int) -> None:
    """Raise ``ValueError`` unless ``(layers, keep_ratios)`` is a valid schedule for ``num_layers``."""
    if len(layers) != len(keep_ratios):
        raise ValueError(
            f"layers and keep_ratios must have the same length, got {len(layers)} and {len(keep_ratios)}"
        )
    prev = 0
    for layer in layers:
        if not prev < layer < num_layers:
            raise ValueError(
                f"layers must be strictly increasing within [1, {num_layers - 1}] "
                f"(num_layers={num_layers}), got {list(layers)}"
            )
        prev = layer
    for ratio in keep_ratios:
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"keep_ratios must lie in [0, 1], got {list(keep_ratios)}")


def stage_of_layer(layers: Sequence[int], num_layers: int) -> np.ndarray:
    """Stage index of every layer ``0 .. num_layers-1`` (0 before ``layer_1``), as int64."""
    return np.searchsorted(np.asarray(layers, dtype=np.int64), np.arange(num_layers), side="right").astype(
        np.int64
    )


def rows_per_layer(
    n0: int, layers: Sequence[int], keep_ratios: Sequence[float], num_layers: int, min_keep: int = 1
) -> list[int]:
    """Vision rows of one item of ``n0`` rows present at each layer ``0 .. num_layers-1``."""
    check_schedule(layers, keep_ratios, num_layers)
    per_stage = (int(n0), *keep_counts(n0, keep_ratios, min_keep))
    return [per_stage[s] for s in stage_of_layer(layers, num_layers)]


def average_retention(
    n0: int, layers: Sequence[int], keep_ratios: Sequence[float], num_layers: int, min_keep: int = 1
) -> float:
    """Mean vision rows per layer over all ``num_layers`` layers, divided by ``n0``.

    This is the paper's budget measure: LLaVA-1.5's (3, 17, 22) / (0.5, 0.5, 0.0)
    schedule on 576 rows averages 202.8 rows, i.e. 0.352.
    """
    if n0 <= 0:
        raise ValueError(f"n0 must be >= 1, got {n0}")
    return sum(rows_per_layer(n0, layers, keep_ratios, num_layers, min_keep)) / (num_layers * n0)


def _ratios_at(u: float, num_stages: int) -> tuple[float, ...]:
    """The solver's one-parameter family of schedules, non-decreasing in ``u`` in ``[0, 2]``."""
    if num_stages == 1:
        return (min(u, 1.0),)
    if u <= 1.0:
        return (u,) * (num_stages - 1) + (0.0,)
    return (1.0,) * (num_stages - 1) + (min(u - 1.0, 1.0),)


class SolvedRatios(NamedTuple):
    """What :func:`solve_keep_ratios` found."""

    keep_ratios: tuple[float, ...]
    achieved: float  # average_retention of ``keep_ratios`` for an item of ``n0`` rows


def solve_keep_ratios(
    layers: Sequence[int],
    num_layers: int,
    target_retention: float,
    n0: int = 576,
    min_keep: int = 1,
) -> SolvedRatios:
    """Keep ratios for ``layers`` whose average retention is closest to ``target_retention``.

    Returns ``SolvedRatios(keep_ratios, achieved)``, ``achieved`` being
    :func:`average_retention` of the result for an item of ``n0`` rows.

    Strategy (deterministic). The search runs over a one-parameter family that
    follows the paper's reference schedule, whose last stage keeps only
    ``min_keep`` rows:

    * ``u`` in ``[0, 1]``: every stage but the last keeps the common ratio
      ``r = u`` (a geometric decay ``n_s ~ r**s * n0``), the last keeps 0;
    * ``u`` in ``(1, 2]`` (only for targets the first part cannot reach): all
      stages but the last keep everything, the last keeps ``u - 1``;
    * a one-stage schedule simply uses ``r = u`` (capped at 1).

    The average rows per layer, computed with the exact integer counts of
    :func:`keep_counts`, is a non-decreasing step function of ``u``. Bisection
    finds the two steps around the target; the closer one wins (the lower one
    on a tie). The ratio returned is the shortest decimal (up to 9 digits) that
    lands on that step, so presets read like ``0.46`` rather than
    ``0.4598388671875``. Whenever the target lies inside the family's range the
    result is within one row of it for ``n0 = 576``; the tests check
    ``0.333 / 0.222 / 0.111`` on ``(3, 17, 22)`` with 32 layers against
    192 / 128 / 64 rows. Targets outside the range give its nearest end.
    """
    if not layers:
        raise ValueError("solve_keep_ratios needs at least one layer")
    if not 0.0 < target_retention <= 1.0:
        raise ValueError(f"target_retention must lie in (0, 1], got {target_retention}")
    num_stages = len(layers)
    check_schedule(layers, (0.0,) * num_stages, num_layers)
    u_max = 1.0 if num_stages == 1 else 2.0

    def avg(u: float) -> float:
        return average_retention(n0, layers, _ratios_at(u, num_stages), num_layers, min_keep)

    def bisect(value: float) -> tuple[float, float]:
        """``(lo, hi)``, adjacent to bisection precision, with ``avg(lo) < value <= avg(hi)``."""
        lo, hi = 0.0, u_max
        for _ in range(64):
            mid = (lo + hi) / 2
            if avg(mid) >= value:
                hi = mid
            else:
                lo = mid
        return lo, hi

    lowest, highest = avg(0.0), avg(u_max)
    if target_retention <= lowest:
        best = lowest
    elif target_retention >= highest:
        best = highest
    else:  # the two steps around the target: avg(lo) < target <= avg(hi)
        lo, hi = bisect(target_retention)
        below, above = avg(lo), avg(hi)
        best = above if above - target_retention < target_retention - below else below
    # ``a``: the smallest u that lands on ``best``; then its shortest decimal at or above it.
    a = 0.0 if best == lowest else bisect(best)[1]
    u = a
    for digits in range(1, 10):
        scale = 10**digits
        cand = math.ceil(a * scale - 1e-9) / scale
        if cand <= u_max and avg(cand) == best:
            u = cand
            break
    ratios = tuple(round(r, 9) for r in _ratios_at(u, num_stages))
    return SolvedRatios(ratios, average_retention(n0, layers, ratios, num_layers, min_keep))
