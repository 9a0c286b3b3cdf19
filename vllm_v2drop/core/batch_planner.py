"""The worker's per-step planner: :func:`~vllm_v2drop.core.step_plan.plan_step` kept cheap
for a running batch.

Every engine step the worker needs the step's layout; planning each request again would be a
Python loop over the batch. :class:`BatchPlanner` keeps one row per running request instead and
does array work over the batch. Pure Python + NumPy.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from vllm_v2drop.core.request_plan import RequestPlan
from vllm_v2drop.core.step_plan import StepPlan, plan_step

__all__ = ["BatchPlanner"]


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

    def __init__(self, num_stages: int, plan_of: Callable[[str], RequestPlan], chunked: bool = False) -> None:
        self.num_stages = num_stages
        self.plan_of = plan_of
        self.chunked = chunked  # steps may end inside an item (plan_step's ``chunked``)
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
        none = np.zeros(0, np.int64)
        seg_counts, seg_request, seg_item = np.zeros((0, self.num_stages + 1), np.int64), none, none
        chunks = {}
        if mid.any():
            idx = np.flatnonzero(mid)
            sub = plan_step([self.rows[i] for i in idx.tolist()], nc[idx], ns[idx], chunked=self.chunked)
            kv_starts[:, idx], seq_lens[:, idx] = sub.kv_starts, sub.seq_lens
            rows = np.concatenate([np.arange(row_start[i], row_start[i + 1]) for i in idx.tolist()])
            segment[rows] = sub.segment
            seg_counts, seg_request, seg_item = sub.seg_counts, idx[sub.seg_request], sub.seg_item
            if sub.uses_stash:
                chunks = dict(stash_req=idx[sub.stash_req], stash_rows=sub.stash_rows, stash_item=sub.stash_item,
                              resume_req=idx[sub.resume_req], resume_rows=sub.resume_rows,
                              resume_item=sub.resume_item, resume_done=sub.resume_done,
                              rejoin_segment=sub.rejoin_segment, rejoin_token_index=sub.rejoin_token_index)
        return StepPlan(
            query_lens=seq_lens - kv_starts,
            seq_lens=seq_lens,
            kv_starts=kv_starts,
            segment=segment,
            token_index=token_index,
            seg_counts=seg_counts,
            seg_request=seg_request,
            seg_item=seg_item,
            **chunks,
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
