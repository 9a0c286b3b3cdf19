"""Per-step plan: what one engine step (a packed batch of requests) looks like at every stage.

Pure NumPy over :class:`~vllm_v2drop.plan.RequestPlan` (no torch, no vLLM): the
sizes every stage needs (rows, compacted query/sequence lengths, KV storage
offsets) are known on the host before the forward pass; only WHICH rows
survive is decided on the device.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from vllm_v2drop.plan import RequestPlan


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
    """

    query_lens: np.ndarray
    seq_lens: np.ndarray
    kv_starts: np.ndarray
    segment: np.ndarray
    token_index: np.ndarray
    seg_counts: np.ndarray
    seg_request: np.ndarray
    seg_item: np.ndarray

    @property
    def num_stages(self) -> int:
        return self.query_lens.shape[0] - 1

    def num_rows(self, stage: int) -> int:
        return int(self.query_lens[stage].sum())

    @property
    def drops(self) -> bool:
        """True when some row of this step is dropped (the forward must compact)."""
        return bool((self.seg_counts[:, -1] < self.seg_counts[:, 0]).any()) if len(self.seg_counts) else False

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
