"""The scheduler seam (engine core): whole vision items per step; each request's plan reaches the KV cache.

A V2Drop engine never splits a vision item across steps, unless ``chunked_items`` is on: then
vLLM's chunked prefill splits items as for any model, and the worker holds an unfinished item's
rows at the first drop layer (:mod:`vllm_v2drop.worker.stash`); this guard stands aside.

V2Drop ranks an item's rows against each other at every stage, so all rows of an
item must be computed in one step (:func:`vllm_v2drop.core.step_plan.plan_step` refuses a
step that holds part of an item). vLLM's ``disable_chunked_mm_input`` (forced on)
rolls a step back to an item's start only while the request's computed tokens are
*before* that start (``Scheduler._try_schedule_encoder_inputs``). A request that
stops exactly at an item's start (the guard itself stops it there, e.g. the
children of an ``n > 1`` request or a request that lost the token budget to
others) could then get only part of the item in its next step.

:class:`V2DropScheduler` overrides ``Scheduler._try_schedule_encoder_inputs`` (inherited by
``AsyncScheduler``): the tokens it is offered are first cut
with :func:`vllm_v2drop.core.step_plan.whole_item_limit`, so the step ends before an item it
cannot hold whole (0 tokens: the request waits, as vLLM makes it wait for encoder
budget). Every cut vLLM applies after this call (prefill lookahead, Mamba
alignment) belongs to features a V2Drop engine refuses, and every cut before it
(token budget, ``long_prefill_token_threshold``, ``max_model_len``) only shortens
the offered count, so this is the last word on where a step ends.

The KV-cache manager learns each request's plan here too: ``KVCacheManager.get_computed_blocks``
is where the scheduler first hands it a ``Request`` it admits (new, or resumed after preemption:
vLLM looks up the prefix cache of every request it schedules from 0), so the plan is built there,
once, and the prefix-cache lookup capped; ``free`` / ``pop_blocks_for_free`` drop the plan of a
finished request (wrapped: vLLM's scheduler builds its KV-cache manager itself, so there is no hook
for a subclass; the wrappers do nothing for other models). The rest is :class:`V2DropScheduler`,
vLLM's own scheduler class with V2Drop's parts, which the config hook sets as the engine's
``scheduler_cls`` (vLLM's hook for a scheduler subclass): the guard above, the KV-cache coordinator
(:mod:`vllm_v2drop.seams.kv_cache`, chosen when the scheduler builds its KV-cache manager) and
every vision item's data sent to the worker.
"""

from __future__ import annotations

from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.scheduler import Scheduler

from vllm_v2drop.config import resolve_schedule
from vllm_v2drop.engine.items import item_bounds
from vllm_v2drop.engine.plans import StagePlans
from vllm_v2drop.core.step_plan import whole_item_limit
from vllm_v2drop.seams._check import EXACT, NAMES, Seam, Touch
from vllm_v2drop.seams._patch import patch

__all__ = ["SEAM", "install"]

_SCHED = "vllm.v1.core.sched.scheduler"
_KVM = "vllm.v1.core.kv_cache_manager"

SEAM = Seam("scheduler", "engine core: whole vision items per step; each request's plan reaches the KV cache", (
    # vLLM's hook for a scheduler subclass (SchedulerConfig.scheduler_cls), set by the config hook
    Touch("vllm.config:SchedulerConfig.get_scheduler_cls", "(self)", NAMES, "seams.registry.V2DropConfigHook"),
    Touch(f"{_SCHED}:Scheduler.__init__", "(self, vllm_config)", NAMES, "seams.scheduler.V2DropScheduler"),
    Touch(f"{_SCHED}:Scheduler._try_schedule_encoder_inputs",
          "(self, request, num_computed_tokens, num_new_tokens, encoder_compute_budget, shift_computed_tokens=0)",
          EXACT, "seams.scheduler.V2DropScheduler",
          inherited_by=("vllm.v1.core.sched.async_scheduler:AsyncScheduler",)),
    Touch("vllm.v1.core.sched.async_scheduler:AsyncScheduler", None, NAMES, "seams.scheduler.V2DropScheduler"),
    # vLLM's scheduler builds its KV-cache manager itself: no hook for a subclass, so these are wrapped
    Touch(f"{_KVM}:KVCacheManager.get_computed_blocks", "(self, request)", EXACT, "seams.scheduler.install"),
    Touch(f"{_KVM}:KVCacheManager.free", "(self, request)", EXACT, "seams.scheduler.install"),
    Touch(f"{_KVM}:KVCacheManager.pop_blocks_for_free", "(self, request)", EXACT, "seams.scheduler.install"),
    Touch("vllm.v1.core.sched.output:strip_covered_mm_data", "(mm_features, num_computed_tokens, uses_mrope=False)",
          EXACT, "seams.scheduler.V2DropScheduler"),
))


def _keep_mm_data(strip_covered_mm_data):
    """What a V2Drop engine's scheduler sends the worker with a new request: every vision item's data.

    vLLM leaves out the data of the items its prefix-cache hit covers at admission, and its worker
    keeps a request's state from admission when the request is resumed after preemption. A resumed
    request can hit less than at its admission (evicted blocks; a ``per_stage`` stage that runs out
    earlier), and must then encode an item its first hit covered: without the data the worker skips
    the encoder and stops the engine ("Encoder cache miss")."""

    def keep_mm_data(mm_features, num_computed_tokens: int, uses_mrope: bool = False):
        return mm_features

    return keep_mm_data


class _V2DropScheduling:
    """What a V2Drop engine's scheduler adds to vLLM's: whole vision items per step, the V2Drop
    KV-cache coordinator, every vision item's data sent to the worker (module docstring)."""

    def __init__(self, *args, **kwargs) -> None:
        from vllm.v1.core.sched import output

        from vllm_v2drop.seams.kv_cache import building

        vllm_config = kwargs["vllm_config"] if "vllm_config" in kwargs else args[0]
        schedule = resolve_schedule(vllm_config)
        with building(schedule):  # its KV-cache manager gets the V2Drop coordinator
            super().__init__(*args, **kwargs)
        # chunked_items: steps may end inside an item (the worker holds its rows until it completes)
        self._v2drop_whole_items = not (schedule.chunked_items and schedule.layers)
        # vLLM's module function, called inside ``schedule()`` (``NewRequestData.from_request``): no hook
        patch(output, "strip_covered_mm_data", _keep_mm_data)

    def _try_schedule_encoder_inputs(self, request, num_computed_tokens, num_new_tokens, encoder_compute_budget,
                                     shift_computed_tokens=0):
        # called for every running multimodal request and step; a decode step pays one dict lookup
        # and one comparison
        if not self._v2drop_whole_items:
            return super()._try_schedule_encoder_inputs(request, num_computed_tokens, num_new_tokens,
                                                        encoder_compute_budget, shift_computed_tokens)
        last_end = request.__dict__.get("_v2drop_last_end")  # a Python int once computed
        if last_end is None:
            ends = item_bounds(request)[1] if request.mm_features else ()
            last_end = request._v2drop_last_end = int(ends[-1]) if len(ends) else -1
        if num_computed_tokens < last_end and num_new_tokens > 0:
            starts, ends = item_bounds(request)
            num_new_tokens = whole_item_limit(starts, ends, num_computed_tokens, num_new_tokens)
        return super()._try_schedule_encoder_inputs(request, num_computed_tokens, num_new_tokens,
                                                    encoder_compute_budget, shift_computed_tokens)


class _V2DropSyncScheduler(_V2DropScheduling, Scheduler):
    pass


class _V2DropAsyncScheduler(_V2DropScheduling, AsyncScheduler):
    pass


class V2DropScheduler:
    """The ``scheduler_cls`` of a V2Drop engine (set by the config hook): vLLM's ``Scheduler`` or
    ``AsyncScheduler`` with V2Drop's parts, whichever the engine's final config asks for (the config
    hook runs before vLLM settles ``async_scheduling``)."""

    def __new__(cls, *args, **kwargs):
        vllm_config = kwargs["vllm_config"] if "vllm_config" in kwargs else args[0]
        chosen = _V2DropAsyncScheduler if vllm_config.scheduler_config.async_scheduling else _V2DropSyncScheduler
        return chosen(*args, **kwargs)


SCHEDULER_CLS = f"{__name__}.V2DropScheduler"


def install() -> None:
    """Wrap vLLM's KV-cache manager (engine core; idempotent, see ``_patch``): the scheduler builds
    it itself, so there is no hook for a subclass. The rest of the scheduler side is
    :class:`V2DropScheduler`, which the config hook sets as the engine's ``scheduler_cls``."""
    from vllm.v1.core.kv_cache_manager import KVCacheManager

    def plans_known(get_computed_blocks):
        def _get_computed_blocks(self, request):
            plans = StagePlans.of(self.block_pool)
            if plans is None:
                return get_computed_blocks(self, request)
            plans.register(request)  # even where vLLM skips the lookup (prefix caching off, prompt logprobs)
            self.coordinator._v2drop_request = request
            try:
                return get_computed_blocks(self, request)
            finally:
                self.coordinator._v2drop_request = None

        return _get_computed_blocks

    def plans_forgotten(free):
        def _free(self, request):
            try:
                return free(self, request)
            finally:
                plans = StagePlans.of(self.block_pool)
                if plans is not None and request.is_finished():
                    plans.forget(request.request_id)

        return _free

    patch(KVCacheManager, "get_computed_blocks", plans_known)
    patch(KVCacheManager, "free", plans_forgotten)
    patch(KVCacheManager, "pop_blocks_for_free", plans_forgotten)
