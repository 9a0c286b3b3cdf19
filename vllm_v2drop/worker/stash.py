"""The stash (``chunked_items``): the rows of an unfinished vision item, held at the first drop layer.

A step that ends inside an item runs that item's rows through the layers before the first drop
layer (their KV there written as in an unpruned prefill) and leaves them there: their hidden
state and residual entering the first drop layer, their first-stage score and their positions
stay on the device, per request, until the step that brings the item's last rows takes them back
(:attr:`~vllm_v2drop.core.step_plan.StepPlan.merge`). The plan says which rows and how many; this
module only keeps and hands back tensors.

An entry is freed when its item completes, or when its request finishes, is aborted or preempted
(:meth:`Stash.forget`; a preempted request computes the item again from a point before it). A
request that comes back inside an item without its rows held (nothing else should make one) is
refused with :class:`~vllm_v2drop.core.step_plan.SplitItemError`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from vllm_v2drop.core.step_plan import SplitItemError, StepPlan

logger = logging.getLogger("vllm.v2drop")

__all__ = ["ChunkStep", "Held", "Stash"]


@dataclass
class Held:
    """One request's stashed rows: the first ``rows`` rows of item ``item`` (its span's rows, text
    rows inside a video's placeholder included), in position order."""

    item: int
    rows: int
    hidden: torch.Tensor  # [rows, H]
    residual: torch.Tensor  # [rows, H]
    scores: torch.Tensor  # [rows] float32, the first stage's
    positions: torch.Tensor  # [..., rows] (M-RoPE: [3, rows])

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.hidden, self.residual, self.scores, self.positions))


class Stash:
    """Request id -> :class:`Held`, with its size (bytes now and at the peak)."""

    def __init__(self) -> None:
        self.held: dict[str, Held] = {}
        self.nbytes = 0
        self.peak = 0
        self.dropped = 0  # entries freed before their item completed (finished, aborted, preempted)

    def forget(self, req_ids: Iterable[str]) -> None:
        """Free the entries of finished, aborted or preempted requests."""
        if self.held:
            for rid in req_ids:
                self.dropped += self._pop(rid) is not None

    def _pop(self, rid: str) -> Held | None:
        held = self.held.pop(rid, None)
        if held is not None:
            self.nbytes -= held.nbytes
        return held

    def _put(self, rid: str, held: Held) -> None:
        self.held[rid] = held
        self.nbytes += held.nbytes
        if self.nbytes > self.peak:
            if self.nbytes > 2 * self.peak:  # logged each time the peak doubles
                logger.info("V2Drop stash: %.1f MiB held at the first drop layer (%d request(s))",
                            self.nbytes / 2**20, len(self.held))
            self.peak = self.nbytes

    def begin(self, step: StepPlan, req_ids: Sequence[str]) -> ChunkStep:
        """The step's exchange with the stash: checks that every request resuming inside an item
        has exactly the rows the plan says are held, and takes them out."""
        resumed = {}
        for r, k, i in zip(step.resume_req.tolist(), step.resume_rows.tolist(), step.resume_item.tolist()):
            rid = req_ids[r]
            held = self.held.get(rid)
            if held is None or held.item != i or held.rows != k:
                raise SplitItemError(
                    f"request {rid} resumes vision item {i} after its first {k} rows, but "
                    + ("none are held" if held is None else f"{held.rows} rows of item {held.item} are held")
                    + ": V2Drop ranks an item's rows together, and computes an item split across steps only "
                    "from its start (chunked_items); this step came from elsewhere")
            resumed[r] = self._pop(rid)
        if self.held:  # held rows of a request that starts over (preempted, then recomputed from before the item)
            for r, rid in enumerate(req_ids):
                if r not in resumed and rid in self.held:
                    self._pop(rid)
                    self.dropped += 1
        done = dict(zip(step.resume_req.tolist(), step.resume_done.tolist()))
        back = [resumed[r] for r, d in done.items() if d]
        # a middle chunk extends its item's held rows; a request that completed one item may start the next
        stores = [(req_ids[r], i, k, None if done.get(r, True) else resumed[r]) for r, k, i in
                  zip(step.stash_req.tolist(), step.stash_rows.tolist(), step.stash_item.tolist())]
        return ChunkStep(self, back, stores)


class ChunkStep:
    """What one step takes from and gives to the stash, at its first drop layer."""

    def __init__(self, stash: Stash, back: list[Held], stores: list[tuple[str, int, int, Held | None]]) -> None:
        self.stash, self.back, self.stores = stash, back, stores
        self.merge: torch.Tensor | None = None  # set by the runtime (device arrays of the plan)
        self.stash_index: torch.Tensor | None = None
        self.segment: torch.Tensor | None = None
        self.token_index: torch.Tensor | None = None
        self.num_rows_back = sum(h.rows for h in back)

    def exchange(self, hidden, residual, positions, rows, scores, num_padded: int):
        """The rows entering the first drop layer: the step's rows, less those that go to the
        stash (stored here), with the stashed rows that come back (their output rows are
        ``num_padded + j``: they give no output). Returns ``hidden, residual, positions, rows, scores``."""
        idx = self.stash_index
        new = (hidden[idx], residual[idx], scores[idx], positions[..., idx])
        if self.back:
            q = self.num_rows_back
            hidden = torch.cat([hidden, *(h.hidden for h in self.back)])
            residual = torch.cat([residual, *(h.residual for h in self.back)])
            scores = torch.cat([scores, *(h.scores for h in self.back)])
            positions = torch.cat([positions, *(h.positions for h in self.back)], dim=-1)
            rows = torch.cat([rows, torch.arange(num_padded, num_padded + q, device=rows.device, dtype=rows.dtype)])
        m = self.merge
        hidden, residual, scores, positions, rows = hidden[m], residual[m], scores[m], positions[..., m], rows[m]
        at = 0
        for rid, item, k, before in self.stores:
            part = [t[..., at : at + k] if j == 3 else t[at : at + k] for j, t in enumerate(new)]
            at += k
            if before is not None:  # a middle chunk: the item's rows so far, then these
                part = [torch.cat([before.hidden, part[0]]), torch.cat([before.residual, part[1]]),
                        torch.cat([before.scores, part[2]]), torch.cat([before.positions, part[3]], dim=-1)]
                k += before.rows
            self.stash._put(rid, Held(item, k, *part))
        self.back = []
        return hidden, residual, positions, rows, scores
