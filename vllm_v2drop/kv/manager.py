"""Scheduler side of ``kv_mode: per_stage``: block counts in compact units.

vLLM's scheduler counts every request in ORIGINAL tokens (positions, RoPE and
the sampler stay original). Its KV-cache coordinator hands each group's manager
``num_tokens`` = the original token count a request needs slots for.
:class:`V2DropCoordinator` (mixed into the pool's coordinator when it holds
:class:`V2DropStageManager` groups, vLLM's full-attention manager with a stage)
converts that count once per request and call to the rows present in every
stage, ``plan.compact_lens(num_tokens)``, and gives each group its stage's
count, so a stage-``s`` group holds ``ceil(compact_len(s, n) / block_size)``
blocks of a request.

Managers only see request ids. The request's plan is built once from the
scheduler's ``Request`` when :meth:`KVCacheManager.allocate_slots` first sees it
(the hook below), with the same code the worker uses (:func:`vllm_v2drop.runtime.plan_for`),
and dropped when the request finishes (kept across preemption: a resumed
request has the same plan). A request the registry does not know gets the
original count, a superset: never fewer blocks than the worker writes to.

Prefix caching is forced off for V2Drop (compacted rows are not prefix blocks),
so the managers never hash or share blocks.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

from vllm.v1.core.kv_cache_coordinator import KVCacheCoordinator
from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager

__all__ = ["StagePlans", "V2DropCoordinator", "V2DropStageManager", "install_scheduler_hooks"]


class StagePlans:
    """Request id -> :class:`RequestPlan` for the V2Drop managers of one block pool."""

    def __init__(self, schedule) -> None:
        self.schedule = schedule
        self.plans: dict = {}

    def register(self, request) -> None:
        if request.request_id in self.plans:
            return
        from vllm_v2drop.runtime import plan_for, request_view  # the worker's own planning code

        view = request_view(request.request_id, request.num_prompt_tokens, request.mm_features,
                            request.sampling_params)
        self.plans[view.req_id] = plan_for(self.schedule, view)

    def forget(self, request_id: str) -> None:
        self.plans.pop(request_id, None)

    def compact_len(self, request_id: str, stage: int, num_tokens: int) -> int:
        plan = self.plans.get(request_id)
        return num_tokens if plan is None else plan.compact_len(stage, num_tokens)

    @staticmethod
    def of(block_pool) -> StagePlans | None:
        return getattr(block_pool, "_v2drop_plans", None)


class V2DropStageManager(FullAttentionManager):
    """Full-attention manager of one V2Drop stage group: counts in the stage's compact rows."""

    def __init__(self, kv_cache_spec, **kwargs) -> None:
        super().__init__(kv_cache_spec, **kwargs)
        self.stage = kv_cache_spec.stage
        plans = StagePlans.of(self.block_pool)
        if plans is None:
            plans = StagePlans(kv_cache_spec.schedule)
            self.block_pool._v2drop_plans = plans
        self.plans = plans

    def _compact(self, request_id: str, num_tokens: int) -> int:
        return self.plans.compact_len(request_id, self.stage, num_tokens)

    def allocate_external_computed_blocks(
        self,
        request_id: str,
        num_local_computed_tokens: int,
        num_external_computed_tokens: int,
        record_for_zeroing: bool = True,
    ) -> None:
        c = functools.partial(self._compact, request_id)
        local = c(num_local_computed_tokens)
        external = c(num_local_computed_tokens + num_external_computed_tokens) - local
        super().allocate_external_computed_blocks(request_id, local, external, record_for_zeroing)

    def cache_blocks(self, request, num_tokens: int, retention_interval=None, *, replay_boundaries) -> None:
        # Compacted rows are not the prompt's token blocks: never publish them as prefix hits.
        return


class V2DropCoordinator(KVCacheCoordinator):
    """vLLM's KV-cache coordinator of a pool with V2Drop stage groups (its two per-step calls).

    The coordinator hands every group's manager the same ORIGINAL token counts; here each
    request's counts are compacted once per call for all stages (``plan.compact_lens``) and
    every group gets its stage's. The per-step cost is one plan lookup and a few tuples per
    request, not a call per request and group. Requests without a plan (text-only, not
    registered yet) take vLLM's own path with original counts: a superset.
    """

    _v2drop_plans: StagePlans
    _v2drop_stages: tuple[int, ...]  # stage of each group (0, i.e. original counts, for a non-V2Drop group)

    def get_num_blocks_to_allocate(
        self,
        request_id: str,
        num_tokens: int,
        new_computed_blocks: tuple[Sequence, ...],
        num_encoder_tokens: int,
        total_computed_tokens: int,
        num_local_computed_tokens: int,
        num_tokens_main_model: int,
        apply_admission_cap: bool = False,
        prefill_end: int = 0,
    ) -> int:
        plan = self._v2drop_plans.plans.get(request_id)
        if plan is None or not plan.pruned:
            return KVCacheCoordinator.get_num_blocks_to_allocate(
                self,
                request_id, num_tokens, new_computed_blocks, num_encoder_tokens, total_computed_tokens,
                num_local_computed_tokens, num_tokens_main_model, apply_admission_cap, prefill_end,
            )
        lens = plan.compact_lens
        n = lens(num_tokens)
        total = n if total_computed_tokens == num_tokens else lens(total_computed_tokens)
        local = total if num_local_computed_tokens == total_computed_tokens else lens(num_local_computed_tokens)
        main = n if num_tokens_main_model == num_tokens else lens(num_tokens_main_model)
        if self.retention_interval != 0:
            prefill_end = 0
        blocks = 0
        for i, (manager, s) in enumerate(zip(self.single_type_managers, self._v2drop_stages)):
            blocks += manager.get_num_blocks_to_allocate(
                request_id, n[s], new_computed_blocks[i], total[s], local[s], main[s],
                apply_admission_cap=apply_admission_cap, prefill_end=prefill_end,
            )
        return blocks

    def allocate_new_blocks(self, request_id: str, num_tokens: int, num_tokens_main_model: int,
                            num_encoder_tokens: int = 0) -> tuple[list, ...]:
        plan = self._v2drop_plans.plans.get(request_id)
        if plan is None or not plan.pruned:
            return KVCacheCoordinator.allocate_new_blocks(self, request_id, num_tokens, num_tokens_main_model, num_encoder_tokens)
        n = plan.compact_lens(num_tokens)
        main = n if num_tokens_main_model == num_tokens else plan.compact_lens(num_tokens_main_model)
        return tuple(
            manager.allocate_new_blocks(request_id, n[s], main[s])
            for manager, s in zip(self.single_type_managers, self._v2drop_stages)
        )

    @classmethod
    def adopt(cls, coordinator) -> bool:
        """Give ``coordinator`` these two methods if its pool has V2Drop stage groups.

        vLLM picks the coordinator class (with or without prefix caching, hybrid or not); the
        instance becomes a subclass of its own class with these methods (a class of the same
        object layout, which ``__class__`` assignment requires, hence no mixin).
        """
        managers = coordinator.single_type_managers
        if not any(isinstance(m, V2DropStageManager) for m in managers):
            return False
        base = type(coordinator)
        if base not in _coordinator_classes.values():
            methods = {k: cls.__dict__[k] for k in ("get_num_blocks_to_allocate", "allocate_new_blocks")}
            coordinator.__class__ = _coordinator_classes.setdefault(base, type(f"V2Drop{base.__name__}", (base,), methods))
        coordinator._v2drop_plans = StagePlans.of(coordinator.block_pool)
        coordinator._v2drop_stages = tuple(getattr(m, "stage", 0) for m in managers)
        return True


_coordinator_classes: dict[type, type] = {}
_hooks_installed = False


def install_scheduler_hooks() -> None:
    """Wrap :class:`KVCacheManager` so the V2Drop managers know each request's plan.

    ``allocate_slots`` is the only place where the scheduler hands the KV manager
    the ``Request`` itself; ``free`` / ``pop_blocks_for_free`` drop the plan of a
    finished request. The wrappers do nothing for a pool without V2Drop managers.
    """
    global _hooks_installed
    if _hooks_installed:
        return
    _hooks_installed = True
    from vllm.v1.core.kv_cache_manager import KVCacheManager

    init, allocate_slots, free, pop_blocks_for_free = (
        KVCacheManager.__init__,
        KVCacheManager.allocate_slots,
        KVCacheManager.free,
        KVCacheManager.pop_blocks_for_free,
    )

    @functools.wraps(init)
    def _init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        V2DropCoordinator.adopt(self.coordinator)

    @functools.wraps(allocate_slots)
    def _allocate_slots(self, request, *args, **kwargs):
        plans = StagePlans.of(self.block_pool)
        if plans is not None:
            plans.register(request)
        return allocate_slots(self, request, *args, **kwargs)

    def _forget(self, request) -> None:
        plans = StagePlans.of(self.block_pool)
        if plans is not None and request.is_finished():
            plans.forget(request.request_id)

    @functools.wraps(free)
    def _free(self, request):
        try:
            return free(self, request)
        finally:
            _forget(self, request)

    @functools.wraps(pop_blocks_for_free)
    def _pop_blocks_for_free(self, request):
        try:
            return pop_blocks_for_free(self, request)
        finally:
            _forget(self, request)

    KVCacheManager.__init__ = _init
    KVCacheManager.allocate_slots = _allocate_slots
    KVCacheManager.free = _free
    KVCacheManager.pop_blocks_for_free = _pop_blocks_for_free
