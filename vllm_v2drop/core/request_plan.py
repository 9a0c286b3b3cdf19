"""How many vision rows V2Drop keeps: the single source of every count.

Pure Python + NumPy (no torch, no vLLM), so the scheduler side (KV blocks,
compact sequence lengths) and the worker side (attention metadata, row
gathers) call the same functions and can never disagree.

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

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np

__all__ = [
    "RequestPlan",
    "BatchPlanner",
    "SplitItemError",
    "average_retention",
    "check_schedule",
    "keep_counts",
    "plan_request",
    "whole_item_limit",
    "plan_step",
    "StepPlan",
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


def solve_keep_ratios(
    layers: Sequence[int],
    num_layers: int,
    target_retention: float,
    n0: int = 576,
    min_keep: int = 1,
) -> tuple[tuple[float, ...], float]:
    """Keep ratios for ``layers`` whose average retention is closest to ``target_retention``.

    Returns ``(keep_ratios, achieved)``, ``achieved`` being
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
    return ratios, average_retention(n0, layers, ratios, num_layers, min_keep)


@dataclass(frozen=True, eq=False)
class RequestPlan:
    """Per-item keep counts of one request, and the compaction they imply.

    Built by :func:`plan_request`. Items are the request's vision items (one
    image or video each), sorted and disjoint, in prompt positions.

    Attributes:
        num_prompt_tokens: the request's prompt length.
        positions: per item, the sorted prompt positions of its candidate rows.
        starts: first candidate position per item, int64 ``[num_items]``.
        ends: last candidate position + 1 per item, int64 ``[num_items]``.
        counts: rows per item and stage, int64 ``[num_items, num_stages + 1]``;
            ``counts[:, 0]`` is ``n0`` and ``counts[:, s]`` is ``n_s``.
        pruned: False for a plan built with ``prune=False`` (counts constant).
        keep_ratios, min_keep: what the counts were made with (they name a plan's layout in
            prefix-cache keys: two requests with the same prompt prefix and these lay out the
            prefix's KV rows identically).
        stable_end: where the counts start to depend on the prompt's length: the start of an
            item that lost the prompt's last row to the rule below; else ``2**62`` (everything,
            generated tokens included, is laid out the same in a longer prompt).
    """

    num_prompt_tokens: int
    positions: tuple[np.ndarray, ...]
    starts: np.ndarray
    ends: np.ndarray
    counts: np.ndarray
    pruned: bool
    keep_ratios: tuple[float, ...] = ()
    min_keep: int = 1
    stable_end: int = 2**62

    @property
    def num_items(self) -> int:
        return len(self.starts)

    @property
    def num_stages(self) -> int:
        """``S``, the number of drop stages; stages are numbered ``0 .. S``."""
        return self.counts.shape[1] - 1

    @property
    def total_vision_rows(self) -> int:
        """Candidate vision rows of the request (``sum n0``)."""
        return int(self.counts[:, 0].sum())

    @property
    def drops_anything(self) -> bool:
        return bool((self.counts[:, -1] < self.counts[:, 0]).any())

    def dropped_per_item(self, stage: int) -> np.ndarray:
        """Rows each item has lost by stage ``stage`` (``n0 - n_stage``), int64 ``[num_items]``."""
        return self.counts[:, 0] - self.counts[:, stage]

    def dropped_before(self, stage: int, prefix_len: int) -> int:
        """Rows dropped by stage ``stage`` among the first ``prefix_len`` prompt positions.

        Sums ``n0 - n_stage`` over the items with ``end <= prefix_len``. The
        engine never splits an item across prefill chunks, so ``prefix_len``
        never lies strictly inside an item; if it does, that item is not
        counted (only whole items are).
        """
        return int(self.dropped_before_many(stage, np.asarray([prefix_len]))[0])

    def dropped_before_many(self, stage: int, prefix_lens: np.ndarray) -> np.ndarray:
        """Vectorised :meth:`dropped_before` over an array of prefix lengths (int64)."""
        return self._cum_dropped[stage][np.searchsorted(self.ends, np.asarray(prefix_lens), side="right")]

    def compact_len(self, stage: int, prefix_len: int) -> int:
        """Rows of the first ``prefix_len`` prompt positions present in stage ``stage``."""
        return self.compact_lens(prefix_len)[stage]

    def compact_lens(self, prefix_len: int) -> tuple[int, ...]:
        """:meth:`compact_len` of every stage ``0 .. S`` at once (the scheduler's per-request call).

        O(1) before the first item and after the last one (every decode step); a binary search
        over the items in between.
        """
        first, last, dropped = self.summary
        if prefix_len <= first:
            return (prefix_len,) * len(dropped)
        if prefix_len >= last:
            return tuple([prefix_len - d for d in dropped])
        i = int(np.searchsorted(self.ends, prefix_len, side="right"))
        return tuple((prefix_len - self._cum_dropped[:, i]).tolist())

    @cached_property
    def summary(self) -> tuple[int, int, tuple[int, ...]]:
        """``(first_start, last_end, dropped)``: where the items begin and end, and the rows
        the whole request has lost by each stage ``0 .. S`` (Python ints, computed once)."""
        dropped = tuple(self._cum_dropped[:, -1].tolist())
        if not self.num_items:
            return (self.num_prompt_tokens + 1, 0, dropped)
        return (int(self.starts[0]), int(self.ends[-1]), dropped)

    @cached_property
    def _cum_dropped(self) -> np.ndarray:
        """``[S+1, num_items+1]`` rows dropped by each stage among the first ``i`` items."""
        cum = np.zeros((self.num_stages + 1, self.num_items + 1), dtype=np.int64)
        np.cumsum((self.counts[:, :1] - self.counts).T, axis=1, out=cum[:, 1:])
        return cum

    def compact_len_many(self, stage: int, prefix_lens: np.ndarray) -> np.ndarray:
        """Vectorised :meth:`compact_len`."""
        prefix_lens = np.asarray(prefix_lens, dtype=np.int64)
        return prefix_lens - self.dropped_before_many(stage, prefix_lens)

    # ---- prefix caching of compacted KV (kv_mode: per_stage) ------------------------------------
    @cached_property
    def layout_digest(self) -> bytes:
        """8 bytes naming how this plan lays rows out (its keep ratios and ``min_keep``): part of the
        prefix-cache key of every compacted block."""
        return hashlib.blake2b(repr((self.keep_ratios, self.min_keep)).encode(), digest_size=8).digest()

    def original_rows(self, stage: int, compact_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Where compacted rows of stage ``stage`` come from: ``(position, item)`` per row.

        A row outside every item has a known original ``position`` (item -1). Inside item ``i``
        (its compacted span at this stage) which rows it kept is decided by the model, so only
        the item is known: ``item = i`` and ``position`` is meaningless.
        """
        c = np.asarray(compact_rows, dtype=np.int64)
        cum = self._cum_dropped[stage]
        i = np.searchsorted(self.ends - cum[1:], c, side="right")  # items wholly before each row
        n = self.num_items
        inside = i < n
        inside[inside] = c[inside] >= (self.starts - cum[:-1])[i[inside]]
        return c + cum[i], np.where(inside, i, -1)

    def block_key_positions(self, stage: int, num_blocks: int, block_size: int) -> np.ndarray:
        """For each of a request's first ``num_blocks`` KV blocks of stage ``stage`` (compacted
        rows ``[j * block_size, (j + 1) * block_size)``), the prompt position ``q`` such that the
        block's content is a function of the sequence ``[0, q]`` (causal attention; an item's kept
        rows depend on the item's own rows): its last row's position, or the end of the item
        that row lies in. Nondecreasing in ``j``; ``q == (j + 1) * block_size - 1`` exactly when
        the block holds the original rows (nothing dropped before its end)."""
        last = (np.arange(num_blocks, dtype=np.int64) + 1) * block_size - 1
        pos, item = self.original_rows(stage, last)
        return np.where(item >= 0, self.ends[np.maximum(item, 0)] - 1 if self.num_items else pos, pos)

    def resume_position(self, stage: int, compact_rows: int) -> int:
        """The prompt position a request must compute from when stage ``stage`` holds its first
        ``compact_rows`` rows: the position of the next row, or the start of the item it lies
        in (an item is computed whole)."""
        pos, item = self.original_rows(stage, np.asarray([compact_rows]))
        return int(self.starts[item[0]]) if item[0] >= 0 else int(pos[0])

    def rows_per_layer(self, layers: Sequence[int], num_layers: int) -> list[int]:
        """Vision rows of the whole request present at each layer ``0 .. num_layers-1``."""
        self._check_layers(layers, num_layers)
        per_stage = self.counts.sum(axis=0)
        return [int(per_stage[s]) for s in stage_of_layer(layers, num_layers)]

    def kv_rows_saved(self, layers: Sequence[int], num_layers: int) -> int:
        """Prompt rows not written to the KV cache, summed over all layers."""
        return sum(self.total_vision_rows - r for r in self.rows_per_layer(layers, num_layers))

    def _check_layers(self, layers: Sequence[int], num_layers: int) -> None:
        if len(layers) != self.num_stages:
            raise ValueError(f"plan has {self.num_stages} stages but {len(layers)} layers were given")
        check_schedule(layers, (0.0,) * len(layers), num_layers)


def plan_request(
    items: Sequence[Sequence[int] | np.ndarray],
    num_prompt_tokens: int,
    keep_ratios: Sequence[float],
    min_keep: int = 1,
    prune: bool = True,
) -> RequestPlan:
    """Plan one request.

    Args:
        items: per vision item, the sorted prompt positions of its rows (the
            embedding rows of one image/video placeholder). Items must be
            sorted and must not overlap.
        num_prompt_tokens: the request's prompt length. Its last row
            (``num_prompt_tokens - 1``) is never a candidate: it is removed
            from its item, and an item left empty is left out of the plan.
        keep_ratios: the schedule's ratios (one per stage).
        min_keep: the fewest rows a stage keeps per item.
        prune: False gives a plan that drops nothing (prompt logprobs
            requested, modality not enabled: the caller decides).
    """
    last = num_prompt_tokens - 1
    positions: list[np.ndarray] = []
    prev_end = 0
    stable_end = 2**62
    for i, item in enumerate(items):
        pos = np.asarray(item, dtype=np.int64).reshape(-1)
        if pos.size and (np.any(np.diff(pos) <= 0) or pos[0] < 0 or pos[-1] > last):
            raise ValueError(
                f"vision item {i}: positions must be strictly increasing within "
                f"[0, {last}] (num_prompt_tokens={num_prompt_tokens})"
            )
        if pos.size and pos[0] < prev_end:
            raise ValueError(f"vision item {i} overlaps or precedes item {i - 1}: items must be sorted and disjoint")
        if pos.size:
            prev_end = int(pos[-1]) + 1
        if pos.size and pos[-1] == last:
            stable_end = int(pos[0])
            pos = pos[:-1]
        if pos.size:
            positions.append(pos)
    num_stages = len(keep_ratios)
    counts = np.empty((len(positions), num_stages + 1), dtype=np.int64)
    for i, pos in enumerate(positions):
        n0 = int(pos.size)
        counts[i, 0] = n0
        counts[i, 1:] = keep_counts(n0, keep_ratios, min_keep) if prune else (n0,) * num_stages
    return RequestPlan(
        num_prompt_tokens=num_prompt_tokens,
        positions=tuple(positions),
        starts=np.asarray([p[0] for p in positions], dtype=np.int64),
        ends=np.asarray([p[-1] + 1 for p in positions], dtype=np.int64),
        counts=counts,
        pruned=prune,
        keep_ratios=tuple(float(r) for r in keep_ratios),
        min_keep=int(min_keep),
        stable_end=stable_end,
    )


def whole_item_limit(starts: Sequence[int], ends: Sequence[int], num_computed: int, num_new: int) -> int:
    """The most of ``num_new`` tokens a request may compute from ``num_computed`` on without
    ending inside a vision item: items are ``[starts[i], ends[i])``, sorted and disjoint.

    V2Drop ranks an item's rows against each other, so every row of an item must be in one
    step. When ``[num_computed, num_computed + num_new)`` would end inside an item that
    starts at or after ``num_computed``, the step stops just before the item (possibly 0
    tokens: the request waits for a step with room for the whole item). An item that began
    before ``num_computed`` (already split) is left alone: :func:`plan_step` refuses it.
    """
    end = num_computed + num_new
    i = int(np.searchsorted(np.asarray(ends, dtype=np.int64), end, side="right"))  # first item ending after `end`
    if i < len(starts) and num_computed <= starts[i] < end:
        return int(starts[i]) - num_computed
    return num_new


class SplitItemError(ValueError):
    """A step computes part of a vision item: V2Drop plans whole items only."""


# ---- one engine step: a packed batch of requests ------------------------------------------------
@dataclass(frozen=True)
class StepPlan:
    """A batch step seen through the V2Drop schedule.

    ``R`` requests in batch order, ``T`` rows (scheduled tokens), ``S`` stages,
    ``G`` vision items (segments) whose rows are all in this step.

    Attributes:
        query_lens: ``[S+1, R]`` rows of each request present at each stage.
        seq_lens: ``[S+1, R]`` KV length of each request at each stage
            (compacted: original length minus the rows dropped before it).
        kv_starts: ``[S+1, R]`` compacted KV position of each request's first row.
        segment: ``[T]`` item (segment) index of each row, -1 for non-candidates.
        token_index: ``[T]`` original position of each row within its request.
        seg_counts: ``[G, S+1]`` rows of each segment present at each stage.
        seg_request: ``[G]`` batch index of each segment's request.
        seg_item: ``[G]`` index of each segment within its request's plan.
        same_view: per stage, whether its view (query and sequence lengths) equals the stage
            before's (stage 0: False); None where not known ahead (:meth:`same_view_as_before`
            compares the arrays). The planner knows it for decode steps from its per-request rows.
        decode: every request has one row at every stage and none is a candidate (a pure decode
            step), as the planner found it; False where not known (the runner then takes its
            general path, which gives the same metadata).
    """

    query_lens: np.ndarray
    seq_lens: np.ndarray
    kv_starts: np.ndarray
    segment: np.ndarray
    token_index: np.ndarray
    seg_counts: np.ndarray
    seg_request: np.ndarray
    seg_item: np.ndarray
    same_view: tuple[bool, ...] | None = None
    decode: bool = False

    def same_view_as_before(self, stage: int) -> bool:
        """Whether stage ``stage`` sees the same rows and KV lengths as stage ``stage - 1``."""
        if self.same_view is not None:
            return self.same_view[stage]
        return stage > 0 and bool(np.array_equal(self.seq_lens[stage], self.seq_lens[stage - 1])
                                  and np.array_equal(self.query_lens[stage], self.query_lens[stage - 1]))

    @property
    def num_stages(self) -> int:
        return self.query_lens.shape[0] - 1

    def num_rows(self, stage: int) -> int:
        return int(self.query_lens[stage].sum())

    @property
    def has_candidates(self) -> bool:
        """True when some vision item is computed in this step (the forward runs the drop loop)."""
        return len(self.seg_counts) > 0

    @property
    def compacted(self) -> bool:
        """True when some stage's KV view differs from the original one."""
        return bool((self.seq_lens[1:] != self.seq_lens[0]).any())

    def query_start_loc(self, stage: int) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.query_lens[stage])]).astype(np.int32)

    def kv_positions(self, stage: int) -> np.ndarray:
        """``[rows at stage]`` compacted KV position of every row present at ``stage``."""
        q = self.query_lens[stage]
        starts = np.repeat(self.kv_starts[stage], q)
        offsets = np.arange(int(q.sum())) - np.repeat(self.query_start_loc(stage)[:-1], q)
        return starts + offsets


def plan_step(plans: Sequence[RequestPlan], num_computed: np.ndarray, num_scheduled: np.ndarray) -> StepPlan:
    """Plan one step: request ``r`` computes positions ``[num_computed[r], num_computed[r] + num_scheduled[r])``.

    An item takes part in this step's drops when all its candidate rows are in the
    step; the engine never splits an item across chunks, so that is every item
    that overlaps the step.
    """
    num_computed = np.asarray(num_computed, dtype=np.int64)
    num_scheduled = np.asarray(num_scheduled, dtype=np.int64)
    ends = num_computed + num_scheduled
    num_stages = max((p.num_stages for p in plans), default=0)
    row_start = np.concatenate([[0], np.cumsum(num_scheduled)])
    total = int(row_start[-1])

    query_lens = np.empty((num_stages + 1, len(plans)), dtype=np.int64)
    seq_lens = np.empty_like(query_lens)
    kv_starts = np.empty_like(query_lens)
    segment = np.full(total, -1, dtype=np.int64)
    token_index = np.concatenate(
        [np.arange(c, e) for c, e in zip(num_computed, ends)] or [np.zeros(0, np.int64)]
    ).astype(np.int64)
    seg_counts, seg_request, seg_item = [], [], []

    for r, plan in enumerate(plans):
        if plan.drops_anything:  # a plan that drops nothing ranks nothing (e.g. a prefix-cache hit ending in an item)
            _check_whole_items(plan, r, int(num_computed[r]), int(ends[r]))
        for s in range(num_stages + 1):
            st = min(s, plan.num_stages)
            kv_starts[s, r] = plan.compact_len(st, int(num_computed[r]))
            seq_lens[s, r] = plan.compact_len(st, int(ends[r]))
        query_lens[:, r] = seq_lens[:, r] - kv_starts[:, r]
        for i, positions in enumerate(plan.positions):
            if len(positions) == 0 or positions[0] < num_computed[r] or positions[-1] >= ends[r]:
                continue
            segment[row_start[r] + positions - num_computed[r]] = len(seg_counts)
            counts = plan.counts[i]
            seg_counts.append(np.concatenate([counts, np.repeat(counts[-1:], num_stages + 1 - len(counts))]))
            seg_request.append(r)
            seg_item.append(i)

    return StepPlan(
        query_lens=query_lens,
        seq_lens=seq_lens,
        kv_starts=kv_starts,
        segment=segment,
        token_index=token_index,
        seg_counts=np.asarray(seg_counts, dtype=np.int64).reshape(-1, num_stages + 1),
        seg_request=np.asarray(seg_request, dtype=np.int64),
        seg_item=np.asarray(seg_item, dtype=np.int64),
    )


def _check_whole_items(plan: RequestPlan, r: int, start: int, end: int) -> None:
    """Raise :class:`SplitItemError` when ``[start, end)`` holds part, but not all, of an item."""
    split = (plan.starts < end) & (plan.ends > start) & ((plan.starts < start) | (plan.ends > end))
    if split.any():
        i = int(np.flatnonzero(split)[0])
        raise SplitItemError(
            f"batch row {r} computes prompt positions [{start}, {end}), which hold only part of vision "
            f"item {i} (candidate rows [{plan.starts[i]}, {plan.ends[i]})): V2Drop ranks an item's rows "
            "together, so a step must compute all of an item or none of it (vllm_v2drop.scheduling "
            "makes vLLM's scheduler do so; this step came from elsewhere)"
        )


class BatchPlanner:
    """Per-request planning rows aligned with the engine's batch, and a vectorised :func:`plan_step`.

    Like vLLM's persistent ``InputBatch``, it keeps one row per running request in
    arrays (where its items begin and end, the rows it has lost by each stage),
    computed once per request from its :class:`RequestPlan`. :meth:`sync` realigns the
    rows with the batch's request order, touching only rows whose request changed.
    :meth:`plan` then gives exactly what :func:`plan_step` gives (tests check it on random
    batches), with array work over the batch plus :func:`plan_step` on just the requests
    that compute vision rows in this step (a pure decode step runs no Python loop).
    """

    def __init__(self, num_stages: int, plan_of: Callable[[str], RequestPlan]) -> None:
        self.num_stages = num_stages
        self.plan_of = plan_of
        self.plans: dict[str, RequestPlan] = {}
        self.ids = np.empty(0, dtype=object)
        self.synced: list[str] = []  # the request order of the last sync (a copy)
        self.rows: list[RequestPlan | None] = []
        self.first = np.zeros(0, dtype=np.int64)
        self.last = np.zeros(0, dtype=np.int64)
        self.dropped = np.zeros((0, num_stages + 1), dtype=np.int64)
        self.any_dropped = False  # some synced request has lost rows
        self.dropped_t = np.zeros((num_stages + 1, 0), dtype=np.int64)  # dropped[:n].T of the synced rows, contiguous
        self.same_view: tuple[bool, ...] = (False,) * (num_stages + 1)  # per stage: drops equal to the stage before's

    def sync(self, req_ids: Sequence[str]) -> None:
        """Align the rows with ``req_ids`` (the batch's order); plan requests seen for the first time.

        A step whose batch holds the same requests in the same order as the last one (most
        decode steps) costs one list comparison: the ids are the same string objects, so it
        compares pointers and reads no request's data.
        """
        if not isinstance(req_ids, list):
            req_ids = list(req_ids)
        if req_ids == self.synced:
            return
        n = len(req_ids)
        if n > len(self.ids):
            grow = max(n, 2 * len(self.ids))
            self.ids = np.concatenate([self.ids, np.full(grow - len(self.ids), None, dtype=object)])
            self.rows += [None] * (grow - len(self.rows))
            pad = grow - len(self.first)
            self.first = np.concatenate([self.first, np.zeros(pad, np.int64)])
            self.last = np.concatenate([self.last, np.zeros(pad, np.int64)])
            self.dropped = np.concatenate([self.dropped, np.zeros((pad, self.num_stages + 1), np.int64)])
        ids = np.empty(n, dtype=object)
        ids[:] = req_ids
        for i in np.flatnonzero(ids != self.ids[:n]).tolist():  # only rows whose request changed
            rid = req_ids[i]
            plan = self.plans.get(rid)
            if plan is None:
                plan = self.plans[rid] = self.plan_of(rid)
            first, last, dropped = plan.summary
            self.ids[i], self.rows[i], self.first[i], self.last[i] = rid, plan, first, last
            self.dropped[i, : len(dropped)] = dropped
            self.dropped[i, len(dropped):] = dropped[-1]
        self.ids[n:] = None
        if len(self.plans) > 2 * n + 64:  # forget finished requests, amortised
            live = set(req_ids)
            self.plans = {k: v for k, v in self.plans.items() if k in live}
        self.synced = list(req_ids)
        # once per batch change, for the steps past every item (decode): a stage's view is the
        # original one less its drops, equal to the stage before's where every request's drops are
        self.dropped_t = np.ascontiguousarray(self.dropped[:n].T)
        self.same_view = (False, *(self.dropped_t[1:] == self.dropped_t[:-1]).all(axis=1).tolist())
        self.any_dropped = bool(self.dropped_t[-1].any())  # a later stage has lost at least an earlier one's rows

    def plan(self, num_computed: np.ndarray, num_scheduled: np.ndarray) -> StepPlan | None:
        """:func:`plan_step` of the synced batch, or None when V2Drop changes nothing in the step."""
        nc = np.array(num_computed, dtype=np.int64)  # a copy: a StepPlan may hold it (token_index)
        ns = np.asarray(num_scheduled, dtype=np.int64)
        n, end = len(nc), nc + ns
        first, last = self.first[:n], self.last[:n]
        done = nc >= last  # every item computed before this step (text only: last = 0)
        if done.all():  # no vision row in this step (every decode step): a few array ops
            return self._plan_done(nc, ns, end)
        mid = ~done & (end > first)  # this step computes vision rows (or stops between items)
        drop = np.where(done[:, None], self.dropped[:n], 0).T  # [S+1, n]
        if not mid.any() and not drop.any():
            return None
        kv_starts, seq_lens = nc[None, :] - drop, end[None, :] - drop
        row_start = np.concatenate([[0], np.cumsum(ns)])
        token_index = np.arange(int(row_start[-1]), dtype=np.int64) - np.repeat(row_start[:-1] - nc, ns)
        segment = np.full(len(token_index), -1, dtype=np.int64)
        seg = (np.zeros((0, self.num_stages + 1), np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64))
        if mid.any():
            idx = np.flatnonzero(mid)
            sub = plan_step([self.rows[i] for i in idx.tolist()], nc[idx], ns[idx])
            kv_starts[:, idx], seq_lens[:, idx] = sub.kv_starts, sub.seq_lens
            rows = np.concatenate([np.arange(row_start[i], row_start[i + 1]) for i in idx.tolist()])
            segment[rows] = sub.segment
            seg = (sub.seg_counts, idx[sub.seg_request], sub.seg_item)
        return StepPlan(
            query_lens=seq_lens - kv_starts,
            seq_lens=seq_lens,
            kv_starts=kv_starts,
            segment=segment,
            token_index=token_index,
            seg_counts=seg[0],
            seg_request=seg[1],
            seg_item=seg[2],
        )

    def _plan_done(self, nc: np.ndarray, ns: np.ndarray, end: np.ndarray) -> StepPlan | None:
        """:meth:`plan` of a step where every request has computed all its items before the step
        (every decode step): each stage's view is the original one less the rows each request has
        lost by that stage (kept per batch by :meth:`sync`), and no row is a candidate."""
        n = len(nc)
        synced = n == len(self.synced)
        if not (self.any_dropped if synced else self.dropped[:n, -1].any()):
            return None
        drop, same_view = (self.dropped_t, self.same_view) if synced else (self.dropped[:n].T, None)
        seq_lens = end - drop
        decode = bool((ns == 1).all())
        if decode:
            token_index = nc
        else:
            row_start = np.cumsum(ns) - ns
            token_index = np.arange(int(ns.sum()), dtype=np.int64) - np.repeat(row_start - nc, ns)
        num_stages = self.num_stages
        return StepPlan(
            query_lens=np.repeat(ns[None], num_stages + 1, axis=0),  # every row is present at every stage
            seq_lens=seq_lens,
            kv_starts=seq_lens - ns,
            segment=np.full(len(token_index), -1, dtype=np.int64),
            token_index=token_index,
            seg_counts=np.zeros((0, num_stages + 1), np.int64),
            seg_request=np.zeros(0, np.int64),
            seg_item=np.zeros(0, np.int64),
            same_view=same_view,
            decode=decode,
        )
