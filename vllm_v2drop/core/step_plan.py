"""One engine step seen through the V2Drop schedule: which rows each stage holds, and where a
step may end.

A step computes a packed batch of requests; :func:`plan_step` lays it out per stage from the
requests' plans (query and KV lengths, each row's item and original position). An item's rows
are ranked against each other, so a step holds all of an item or none of it:
:func:`whole_item_limit` is the scheduler's cut, :class:`SplitItemError` the worker's refusal.
Pure Python + NumPy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from vllm_v2drop.core.request_plan import RequestPlan

__all__ = ["SplitItemError", "StepPlan", "plan_step", "whole_item_limit"]


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
            "together, so a step must compute all of an item or none of it (V2Drop's scheduler guard "
            "makes vLLM's scheduler do so; this step came from elsewhere)"
        )
