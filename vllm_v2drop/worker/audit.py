"""KV audit of ``kv_mode: per_stage`` prefix-cache reuse (a debug mode, worker side).

With ``V2DROP_AUDIT_KV=1`` in the environment of the engine (the test suite sets it), the worker
checks after every forward that each KV block a request reuses from the prefix cache holds what
that request would have written there, and stops the engine with :class:`V2DropAuditError`
naming the request, the stage, the block and the key otherwise: corruption is caught where it
happens, not in an answer.

How, independently of the scheduler's keys: every row a stage holds gets a content key made
from the request's own tokens (``(stage, compact row, hash of the tokens and vision items up to
the last position the row depends on, the keep-ratio digest where rows were dropped)``, the
rule of :meth:`RequestPlan.block_key_positions` row by row). When a block fills, its rows' keys
and a fingerprint of each row's K and V in every layer of its KV-cache group are recorded.
Every step, each request's rows in each stage must also fit in the blocks the scheduler
allocated to it in that stage's groups (the worker writes only where the scheduler counted).
When a request starts from a prefix hit (``num_computed > 0`` in its first step, after
admission or preemption), every block it reuses must carry the request's own keys with an
unchanged fingerprint, and a last block reused in part (vLLM's copy-on-write copy) must equal,
in its first rows, a recorded block with those keys.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
import torch

from vllm_v2drop.core.request_plan import RequestPlan

__all__ = ["ENV", "BlockAudit", "V2DropAuditError", "enabled"]

ENV = "V2DROP_AUDIT_KV"


def enabled() -> bool:
    return os.environ.get(ENV, "0") not in ("", "0")


class V2DropAuditError(RuntimeError):
    """A request reused a KV block whose rows are not the ones it would have written."""


class BlockAudit:
    """The worker's record of filled KV blocks of stage groups, and the check of every reuse."""

    def __init__(self, runner) -> None:
        config = runner.kv_cache_config
        context = runner.compilation_config.static_forward_context
        self.num_blocks = config.num_blocks
        self.groups = []  # (group id, stage, block size, the KV tensors of its layers on this rank)
        for gid, group in enumerate(config.kv_cache_groups):
            stage = getattr(group.kv_cache_spec, "stage", None)
            kvs = [context[n].kv_cache for n in group.layer_names if n in context]
            kvs = [kv for kv in kvs if isinstance(kv, torch.Tensor) and kv.numel()]
            if stage is not None and kvs:
                self.groups.append((gid, int(stage), group.kv_cache_spec.block_size, kvs))
        self.records: dict[tuple[int, int], tuple[tuple, np.ndarray]] = {}  # (group, block) -> (keys, prints)
        self.by_first: dict[tuple[int, tuple], set[int]] = {}  # (group, first row's key) -> blocks
        self.progress: dict[str, tuple[int, int]] = {}  # request -> (tokens computed, its first block)
        self.prefix: dict[str, list[bytes]] = {}  # request -> hash of its sequence up to each position
        self.plans: dict[str, RequestPlan] = {}

    # ---- keys --------------------------------------------------------------------------------------
    def _prefix_hash(self, runner, req_id: str, upto: int) -> bytes:
        """Hash of the request's tokens (and vision items, by their content hash) ``[0, upto]``."""
        hashes = self.prefix.setdefault(req_id, [])
        if upto < len(hashes):
            return hashes[upto]
        state = runner.requests[req_id]
        tokens = list(state.prompt_token_ids or ()) + list(state.output_token_ids)
        items = {f.mm_position.offset: str(f.identifier).encode() for f in (state.mm_features or ())}
        h = hashes[-1] if hashes else b""
        for p in range(len(hashes), upto + 1):
            h = hashlib.blake2b(h + tokens[p].to_bytes(8, "little", signed=True) + items.get(p, b""),
                                digest_size=16).digest()
            hashes.append(h)
        return hashes[upto]

    def _row_keys(self, runner, req_id: str, plan: RequestPlan, stage: int, start: int, stop: int) -> tuple:
        rows = np.arange(start, stop, dtype=np.int64)
        pos, item = plan.original_rows(stage, rows)
        dropped = plan.counts[:, stage] < plan.counts[:, 0] if plan.num_items else np.zeros(0, bool)
        keys = []
        for c, p, i in zip(rows.tolist(), pos.tolist(), item.tolist()):
            q = int(plan.ends[i]) - 1 if i >= 0 else p
            laid_out = plan.pruned and (p != c or (i >= 0 and bool(dropped[i])))
            keys.append((stage, c, self._prefix_hash(runner, req_id, q), plan.layout_digest if laid_out else b""))
        return tuple(keys)

    # ---- fingerprints ------------------------------------------------------------------------------
    def _prints(self, kvs: list[torch.Tensor], block: int, block_size: int) -> np.ndarray:
        """One float64 per row: its K and V in every layer, weighted (exact equality is compared)."""
        total = None
        for kv in kvs:
            if kv.shape[0] == self.num_blocks and kv.dim() == 4 and kv.shape[2] == block_size:
                rows = kv[block].transpose(0, 1).reshape(block_size, -1)  # CPU: [blocks, heads, B, 2 x dim]
            elif kv.shape[0] == 2 and kv.shape[1] == self.num_blocks and kv.shape[2] == block_size:
                rows = kv[:, block].transpose(0, 1).reshape(block_size, -1)  # [2, blocks, B, heads, dim]
            else:
                raise V2DropAuditError(f"V2Drop KV audit: unknown KV cache layout {tuple(kv.shape)}")
            rows = rows.double()
            weights = torch.arange(1, rows.shape[1] + 1, dtype=torch.float64, device=rows.device)
            out = rows @ weights
            total = out if total is None else total + out
        return total.cpu().numpy()

    def _record(self, gid: int, block: int, keys: tuple, prints: np.ndarray) -> None:
        old = self.records.get((gid, block))
        if old is not None:
            self.by_first.get((gid, old[0][0]), set()).discard(block)
        self.records[(gid, block)] = (keys, prints)
        self.by_first.setdefault((gid, keys[0]), set()).add(block)

    # ---- the step ----------------------------------------------------------------------------------
    def after_step(self, runner, schedule, batch) -> None:
        """Record the blocks this step filled, then check the reuses of requests that started."""
        from vllm_v2drop.requests import plan_for

        n = len(batch.req_ids)
        computed = np.array(batch.num_computed[:n], dtype=np.int64)
        scheduled = np.array(batch.num_scheduled[:n], dtype=np.int64)
        tables = runner.input_batch.block_table
        starting = []
        for i, rid in enumerate(batch.req_ids):
            plan = self.plans.get(rid)
            if plan is None:
                plan = self.plans[rid] = plan_for(schedule, batch.describe(rid))
            c, m = int(computed[i]), int(scheduled[i])
            first = int(tables[self.groups[0][0]].block_table.np[i, 0]) if self.groups else -1
            if c > 0 and self.progress.get(rid) != (c, first):
                starting.append((i, rid, plan, c))
            self.progress[rid] = (c + m, first)
            for gid, stage, size, kvs in self.groups:
                rows = plan.compact_len(stage, c + m)
                allocated = int(tables[gid].num_blocks_per_row[i]) * tables[gid].block_size
                if allocated < rows:  # the worker wrote past the blocks the scheduler gave the request
                    raise V2DropAuditError(
                        f"V2Drop KV audit: request {rid} holds {rows} rows of stage {stage} after this step "
                        f"(tokens {c}..{c + m - 1}), but KV-cache group {gid} has only {allocated} slots "
                        f"({int(tables[gid].num_blocks_per_row[i])} blocks) from the scheduler")
                lo, hi = plan.compact_len(stage, c) // size, rows // size
                row = tables[gid].block_table.np[i]
                for j in range(lo, hi):
                    keys = self._row_keys(runner, rid, plan, stage, j * size, (j + 1) * size)
                    self._record(gid, int(row[j]), keys, self._prints(kvs, int(row[j]), size))
        copies = {(gid, int(tables[gid].block_table.np[i, plan.compact_len(stage, c) // size]))
                  for i, rid, plan, c in starting for gid, stage, size, _ in self.groups
                  if plan.compact_len(stage, c) % size}  # the copies of this step (not sources)
        for i, rid, plan, c in starting:
            self._check_reuse(runner, i, rid, plan, c, copies)
        for rid in [r for r in self.progress if r not in runner.requests]:  # finished requests
            self.progress.pop(rid, None)
            self.prefix.pop(rid, None)
            self.plans.pop(rid, None)

    def _check_reuse(self, runner, i: int, rid: str, plan: RequestPlan, computed: int, copies: set) -> None:
        tables = runner.input_batch.block_table
        for gid, stage, size, kvs in self.groups:
            rows = plan.compact_len(stage, computed)
            row = tables[gid].block_table.np[i]
            for j in range(-(-rows // size)):
                block, used = int(row[j]), min(size, rows - j * size)
                keys = self._row_keys(runner, rid, plan, stage, j * size, j * size + used)
                where = (f"V2Drop KV audit: request {rid} resumed at token {computed} reuses block {block} "
                         f"of KV-cache group {gid} (stage {stage}, its block {j}, rows {j * size}.."
                         f"{j * size + used - 1}, first key {keys[0][2].hex()}")
                now = self._prints(kvs, block, size)[:used]
                if used == size:
                    rec = self.records.get((gid, block))
                    if rec is None or rec[0] != keys:
                        raise V2DropAuditError(f"{where}): the block was filled with other rows "
                                               f"({'never recorded' if rec is None else 'other keys'})")
                    if not np.array_equal(rec[1], now):
                        raise V2DropAuditError(f"{where}): its rows changed after it was filled")
                    continue
                # a last block reused in part: vLLM's copy of a cached block with the same first rows
                sources = [self.records[(gid, b)] for b in self.by_first.get((gid, keys[0]), ())
                           if (gid, b) not in copies and self.records[(gid, b)][0][:used] == keys]
                if not sources:
                    raise V2DropAuditError(f"{where}): no block with these rows was ever filled")
                if not any(np.array_equal(rec[1][:used], now) for rec in sources):
                    raise V2DropAuditError(f"{where}): its rows differ from every filled block with these keys "
                                           "(a copy of unwritten or overwritten rows)")
