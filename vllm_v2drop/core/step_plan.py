"""One engine step seen through the V2Drop schedule: which rows each stage holds, and where a
step may end.

A step computes a packed batch of requests; :func:`plan_step` lays it out per stage from the
requests' plans (query and KV lengths, each row's item and original position). An item's rows
are ranked against each other, so without ``chunked`` a step holds all of an item or none of it:
:func:`whole_item_limit` is the scheduler's cut, :class:`SplitItemError` the worker's refusal.

With ``chunked`` (``chunked_items``) a step may end inside an item: the item's rows in that step
run the layers before the first drop layer only and leave the step there, for the *stash* (their
hidden states and first-stage scores, kept by the worker); the step that brings the item's last
rows takes the stashed rows back in at the first drop layer, ranks the whole item, and its kept
rows of every chunk go on through the later layers. :class:`StepPlan` says which rows go to the
stash (``stash_*``), which come back (``resume_*``) and where (:attr:`StepPlan.merge`).
Pure Python + NumPy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from vllm_v2drop.core.request_plan import RequestPlan

__all__ = ["SplitItemError", "StepPlan", "plan_step", "whole_item_limit"]

_NONE = np.zeros(0, dtype=np.int64)


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
    # chunked items (all empty without): see the module docstring
    stash_req: np.ndarray = field(default_factory=lambda: _NONE)  # [K] requests whose step ends inside an item
    stash_rows: np.ndarray = field(default_factory=lambda: _NONE)  # [K] their last rows that go to the stash
    stash_item: np.ndarray = field(default_factory=lambda: _NONE)  # [K] the item they belong to
    resume_req: np.ndarray = field(default_factory=lambda: _NONE)  # [J] requests whose step starts inside an item
    resume_rows: np.ndarray = field(default_factory=lambda: _NONE)  # [J] rows the stash holds (item start to step)
    resume_item: np.ndarray = field(default_factory=lambda: _NONE)  # [J] the item
    resume_done: np.ndarray = field(default_factory=lambda: _NONE.astype(bool))  # [J] the item completes here
    rejoin_segment: np.ndarray = field(default_factory=lambda: _NONE)  # segment of every stashed row coming back
    rejoin_token_index: np.ndarray = field(default_factory=lambda: _NONE)  # and its original position

    @property
    def runs_drop_loop(self) -> bool:
        """The forward runs the drop loop: some item is ranked, or rows go to or come back from the stash."""
        return len(self.seg_counts) > 0 or self.uses_stash

    @property
    def uses_stash(self) -> bool:
        """Some rows go to the stash or come back from it in this step."""
        return len(self.stash_req) > 0 or len(self.resume_req) > 0

    @cached_property
    def stash_index(self) -> np.ndarray:
        """``[P]`` step rows that leave at the first drop layer for the stash, request by request."""
        ends = np.cumsum(self.query_lens[0])
        return np.concatenate([np.arange(ends[r] - k, ends[r]) for r, k in
                               zip(self.stash_req.tolist(), self.stash_rows.tolist())] or [_NONE])

    @cached_property
    def merge(self) -> np.ndarray:
        """``[M]`` the rows entering the first drop layer, as indices into the step's rows followed
        by the stashed rows that come back (``T + j``, in :attr:`resume_req` order of the requests
        whose item completes): each request's rows in position order, its stashed rows first."""
        total = int(self.query_lens[0].sum())
        kept = np.ones(total, dtype=bool)
        kept[self.stash_index] = False
        base = np.flatnonzero(kept)
        done = self.resume_done
        if not done.any():
            return base
        starts = (np.cumsum(self.query_lens[0]) - self.query_lens[0])[self.resume_req[done]]
        rows = self.resume_rows[done]
        at = np.repeat(np.searchsorted(base, starts), rows)
        return np.insert(base, at, total + np.arange(int(rows.sum())))

    @cached_property
    def merged_segment(self) -> np.ndarray:
        """:attr:`segment` of the :attr:`merge` rows."""
        return np.concatenate([self.segment, self.rejoin_segment])[self.merge]

    @cached_property
    def merged_token_index(self) -> np.ndarray:
        """:attr:`token_index` of the :attr:`merge` rows."""
        return np.concatenate([self.token_index, self.rejoin_token_index])[self.merge]

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


def plan_step(plans: Sequence[RequestPlan], num_computed: np.ndarray, num_scheduled: np.ndarray,
              chunked: bool = False) -> StepPlan:
    """Plan one step: request ``r`` computes positions ``[num_computed[r], num_computed[r] + num_scheduled[r])``.

    An item takes part in this step's drops when its last rows are in the step and its first
    ones too, or (``chunked``) in the stash. Without ``chunked`` a step that holds part of an
    item whose plan drops rows is refused (:class:`SplitItemError`).
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
    stash: list[tuple[int, int, int]] = []
    resume: list[tuple[int, int, int, bool]] = []
    rejoin_segment, rejoin_token_index = [], []

    for r, plan in enumerate(plans):
        c, e = int(num_computed[r]), int(ends[r])
        defer = chunked and plan.defers
        if plan.drops_anything and not defer:  # a plan that drops nothing ranks nothing (e.g. a prefix-cache hit ending in an item)
            _check_whole_items(plan, r, c, e)
        for s in range(num_stages + 1):
            st = min(s, plan.num_stages)
            kv_starts[s, r] = plan.compact_len(st, c)
            seq_lens[s, r] = plan.compact_len(st, e)
        query_lens[:, r] = seq_lens[:, r] - kv_starts[:, r]
        for i, positions in enumerate(plan.positions):
            a, b = int(plan.starts[i]), int(plan.ends[i])
            if len(positions) == 0 or b <= c or a >= e:
                continue
            if a < c or b > e:  # split by this step
                if not defer:
                    continue
                if a < c:
                    resume.append((r, c - a, i, b <= e))
                if b > e:
                    stash.append((r, e - max(a, c), i))
                    continue
            g = len(seg_counts)
            new = positions[positions >= c]
            segment[row_start[r] + new - c] = g
            if a < c:  # the stashed rows [a, c) come back
                back = np.full(c - a, -1, dtype=np.int64)
                back[positions[positions < c] - a] = g
                rejoin_segment.append(back)
                rejoin_token_index.append(np.arange(a, c, dtype=np.int64))
            counts = plan.counts[i]
            seg_counts.append(np.concatenate([counts, np.repeat(counts[-1:], num_stages + 1 - len(counts))]))
            seg_request.append(r)
            seg_item.append(i)

    def col(rows, k, dtype=np.int64):
        return np.asarray([x[k] for x in rows], dtype=dtype)

    return StepPlan(
        query_lens=query_lens,
        seq_lens=seq_lens,
        kv_starts=kv_starts,
        segment=segment,
        token_index=token_index,
        seg_counts=np.asarray(seg_counts, dtype=np.int64).reshape(-1, num_stages + 1),
        seg_request=np.asarray(seg_request, dtype=np.int64),
        seg_item=np.asarray(seg_item, dtype=np.int64),
        stash_req=col(stash, 0), stash_rows=col(stash, 1), stash_item=col(stash, 2),
        resume_req=col(resume, 0), resume_rows=col(resume, 1), resume_item=col(resume, 2),
        resume_done=col(resume, 3, bool),
        rejoin_segment=np.concatenate(rejoin_segment or [_NONE]),
        rejoin_token_index=np.concatenate(rejoin_token_index or [_NONE]),
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
            "makes vLLM's scheduler do so unless chunked_items is on; this step came from elsewhere)"
        )
