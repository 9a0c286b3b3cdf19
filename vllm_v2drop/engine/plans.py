"""Each request's plan on the engine-core side, for the KV cache (``kv_mode: per_stage``, prefix caching).

Built from the scheduler's ``Request`` with the code the worker and the frontend use
(:func:`vllm_v2drop.requests.plan_for`), so KV blocks allocated per stage match the rows the
worker writes. The KV-cache seam (:mod:`vllm_v2drop.seams.kv_cache`) asks it for counts and keys.
"""

from __future__ import annotations

from vllm_v2drop.requests import plan_for, request_view

__all__ = ["KeyedRequest", "StagePlans"]


class StagePlans:
    """Request id -> :class:`RequestPlan` for the V2Drop managers of one block pool."""

    def __init__(self, schedule) -> None:
        self.schedule = schedule
        self.plans: dict = {}
        self.cache_limits: dict[str, int] = {}  # requests whose plan drops rows: their first item's start
        self.keys: dict[str, dict[int, list[bytes]]] = {}  # per_stage prefix-cache keys, per request and stage

    def register(self, request) -> None:
        if request.request_id in self.plans:
            return
        view = request_view(request.request_id, request.num_prompt_tokens, request.mm_features,
                            request.sampling_params)
        self.plans[view.req_id] = plan = plan_for(self.schedule, view)
        if plan.drops_anything:
            self.cache_limits[view.req_id] = plan.summary[0]

    def forget(self, request_id: str) -> None:
        self.plans.pop(request_id, None)
        self.cache_limits.pop(request_id, None)
        self.keys.pop(request_id, None)

    def stage_keys(self, request, stage: int, num_blocks: int, block_size: int) -> list[bytes]:
        """Prefix-cache keys of the request's first stage-``stage`` blocks (``kv_mode: per_stage``,
        a plan that drops rows): at most ``num_blocks``, fewer where the block's ``q_j`` lies past
        the request's hashed blocks or its ``stable_end``. Computed once per block and request.

        Block ``j`` whose rows are the original ones keeps vLLM's own hash of block ``j``; any
        other is ``hash(block of q_j) + j + digest(keep ratios, min_keep)``: two requests share it
        exactly when their sequences agree up to ``q_j`` and they keep rows alike."""
        keys = self.keys.setdefault(request.request_id, {}).setdefault(stage, [])
        if len(keys) >= num_blocks:
            return keys
        plan = self.plans[request.request_id]
        hashes = request.block_hashes
        limit = min(len(hashes) * block_size, plan.stable_end)
        digest = plan.layout_digest
        q = plan.block_key_positions(stage, num_blocks, block_size).tolist()
        for j in range(len(keys), num_blocks):
            if q[j] >= limit:
                break
            h = hashes[q[j] // block_size]
            keys.append(h if q[j] == (j + 1) * block_size - 1 else h + j.to_bytes(4, "big") + digest)
        return keys

    def cache_limit(self, request) -> int | None:
        """How far the request's KV blocks are laid out the same in every layer (prefix-cacheable):
        up to its first vision item when its plan drops rows, everywhere (None) otherwise.

        Called for every scheduled request and step (``cache_blocks``): two dict lookups once
        the request is planned (at its prefix-cache lookup, normally)."""
        if request.request_id not in self.plans:
            self.register(request)
        return self.cache_limits.get(request.request_id)

    def compact_len(self, request_id: str, stage: int, num_tokens: int) -> int:
        plan = self.plans.get(request_id)
        return num_tokens if plan is None else plan.compact_len(stage, num_tokens)

    @staticmethod
    def of(block_pool, schedule=None) -> StagePlans | None:
        """The engine's plans: one per block pool, shared by its stage managers and coordinator and
        made by the first of them to ask with the ``schedule``; None for a pool without (not a
        V2Drop engine)."""
        plans = getattr(block_pool, "_v2drop_plans", None)
        if plans is None and schedule is not None:
            plans = block_pool._v2drop_plans = StagePlans(schedule)
        return plans


class KeyedRequest:
    """A scheduler ``Request`` seen with other block hashes (a stage group's keys) by vLLM's
    ``cache_blocks``; everything else is the request's."""

    __slots__ = ("_request", "block_hashes")

    def __init__(self, request, block_hashes: list[bytes]) -> None:
        self._request, self.block_hashes = request, block_hashes

    def __getattr__(self, name: str):
        return getattr(self._request, name)
