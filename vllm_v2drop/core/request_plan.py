"""One request's plan: how many rows each of its vision items keeps per stage, and the
compacted layout (KV lengths, prefix-cache key positions) that follows from it.

Pure Python + NumPy. The API server plans a request for its metrics, the scheduler side for
its KV blocks and prefix-cache keys, the worker for the step layout: all through
:func:`plan_request`, so they agree.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import NamedTuple

import numpy as np

from vllm_v2drop.core.counts import check_schedule, keep_counts, stage_of_layer

__all__ = ["OriginalRows", "PlanSummary", "RequestPlan", "plan_request"]


class PlanSummary(NamedTuple):
    """:attr:`RequestPlan.summary`: what a decode step needs of a request, as Python ints."""

    first: int  # the first item's first candidate position (past the prompt when there is none)
    last: int  # the last item's end (0 when there is none)
    dropped: tuple[int, ...]  # rows the whole request has lost by each stage 0 .. S


class OriginalRows(NamedTuple):
    """:meth:`RequestPlan.original_rows`: per compacted row, where it comes from."""

    position: np.ndarray  # int64 prompt position (meaningless for a row inside an item)
    item: np.ndarray  # int64 item index, -1 for a row outside every item


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

    @property
    def defers(self) -> bool:
        """Whether an item split by a prefix is held back from the stages >= 1 until it completes
        (a plan that drops rows ranks each item whole; one that drops nothing runs every row
        through every layer as it comes)."""
        return self.drops_anything

    def split_item(self, prefix_len: int) -> int:
        """The item that ``prefix_len`` splits (``starts[i] < prefix_len < ends[i]``), or -1."""
        i = int(np.searchsorted(self.ends, prefix_len, side="right"))
        return i if i < self.num_items and self.starts[i] < prefix_len else -1

    def dropped_before(self, stage: int, prefix_len: int) -> int:
        """Rows dropped by stage ``stage`` among the first ``prefix_len`` prompt positions.

        Sums ``n0 - n_stage`` over the items with ``end <= prefix_len``; an item the prefix splits
        is not counted (only whole items are). See :meth:`compact_len` for where such an item's
        rows are.
        """
        return int(self.dropped_before_many(stage, np.asarray([prefix_len]))[0])

    def dropped_before_many(self, stage: int, prefix_lens: np.ndarray) -> np.ndarray:
        """Vectorised :meth:`dropped_before` over an array of prefix lengths (int64)."""
        return self._cum_dropped[stage][np.searchsorted(self.ends, np.asarray(prefix_lens), side="right")]

    def compact_len(self, stage: int, prefix_len: int) -> int:
        """Rows of the first ``prefix_len`` prompt positions present in stage ``stage``.

        A prefix that ends inside an item (chunked prefill of the item: its steps end there) holds
        that item's rows so far in stage 0 only, when the plan :attr:`defers` it: the stages >= 1
        get the item when it completes (its kept rows then, ranked over the whole item). So stage 0
        advances with every chunk, the later stages only at item ends."""
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
        cum = self._cum_dropped[:, i]
        if self.defers and self.starts[i] < prefix_len:  # inside item i: stages >= 1 stop at its start
            return (prefix_len, *(int(self.starts[i]) - cum[1:]).tolist())
        return tuple((prefix_len - cum).tolist())

    @cached_property
    def summary(self) -> PlanSummary:
        """Where the items begin and end, and the rows the whole request has lost by each stage
        (Python ints, computed once)."""
        dropped = tuple(self._cum_dropped[:, -1].tolist())
        if not self.num_items:
            return PlanSummary(self.num_prompt_tokens + 1, 0, dropped)
        return PlanSummary(int(self.starts[0]), int(self.ends[-1]), dropped)

    @cached_property
    def _cum_dropped(self) -> np.ndarray:
        """``[S+1, num_items+1]`` rows dropped by each stage among the first ``i`` items."""
        cum = np.zeros((self.num_stages + 1, self.num_items + 1), dtype=np.int64)
        np.cumsum((self.counts[:, :1] - self.counts).T, axis=1, out=cum[:, 1:])
        return cum

    def compact_len_many(self, stage: int, prefix_lens: np.ndarray) -> np.ndarray:
        """Vectorised :meth:`compact_len`."""
        prefix_lens = np.asarray(prefix_lens, dtype=np.int64)
        if stage > 0 and self.defers and self.num_items:  # a prefix inside an item stops at its start
            i = np.minimum(np.searchsorted(self.ends, prefix_lens, side="right"), self.num_items - 1)
            prefix_lens = np.minimum(prefix_lens, np.where(self.ends[i] > prefix_lens, self.starts[i], prefix_lens))
        return prefix_lens - self.dropped_before_many(stage, prefix_lens)

    # ---- prefix caching of compacted KV (kv_mode: per_stage) ------------------------------------
    @cached_property
    def layout_digest(self) -> bytes:
        """8 bytes naming how this plan lays rows out (its keep ratios and ``min_keep``): part of the
        prefix-cache key of every compacted block."""
        return hashlib.blake2b(repr((self.keep_ratios, self.min_keep)).encode(), digest_size=8).digest()

    def original_rows(self, stage: int, compact_rows: np.ndarray) -> OriginalRows:
        """Where compacted rows of stage ``stage`` come from: ``position`` and ``item`` per row.

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
        return OriginalRows(c + cum[i], np.where(inside, i, -1))

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
