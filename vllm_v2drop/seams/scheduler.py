"""The scheduler seam (engine core): whole vision items per step; each request's plan reaches the KV cache.

A V2Drop engine never splits a vision item across steps.

V2Drop ranks an item's rows against each other at every stage, so all rows of an
item must be computed in one step (:func:`vllm_v2drop.core.step_plan.plan_step` refuses a
step that holds part of an item). vLLM's ``disable_chunked_mm_input`` (forced on)
rolls a step back to an item's start only while the request's computed tokens are
*before* that start (``Scheduler._try_schedule_encoder_inputs``). A request that
stops exactly at an item's start (the guard itself stops it there, e.g. the
children of an ``n > 1`` request or a request that lost the token budget to
others) could then get only part of the item in its next step.

:func:`install` wraps ``Scheduler._try_schedule_encoder_inputs`` (inherited by
``AsyncScheduler``): for a V2Drop engine, the tokens it is offered are first cut
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
finished request; ``Scheduler.__init__`` makes the KV-cache coordinator of a V2Drop engine a
V2Drop coordinator (:mod:`vllm_v2drop.seams.kv_cache`). Every wrapper does nothing for other models.
"""

from __future__ import annotations

from vllm_v2drop.core.architectures import is_v2drop_model
from vllm_v2drop.core.schedule import resolve_schedule
from vllm_v2drop.engine.items import item_bounds
from vllm_v2drop.engine.plans import StagePlans
from vllm_v2drop.core.step_plan import whole_item_limit
from vllm_v2drop.seams._check import EXACT, NAMES, Seam, Touch
from vllm_v2drop.seams._patch import patch

__all__ = ["SEAM", "install"]

_SCHED = "vllm.v1.core.sched.scheduler"
_KVM = "vllm.v1.core.kv_cache_manager"

SEAM = Seam("scheduler", "engine core: whole vision items per step; each request's plan reaches the KV cache", (
    Touch(f"{_SCHED}:Scheduler.__init__", "(self)", NAMES, "seams.scheduler.install"),
    Touch(f"{_SCHED}:Scheduler._try_schedule_encoder_inputs",
          "(self, request, num_computed_tokens, num_new_tokens, encoder_compute_budget, shift_computed_tokens=0)",
          EXACT, "seams.scheduler.install",
          inherited_by=("vllm.v1.core.sched.async_scheduler:AsyncScheduler",)),
    Touch(f"{_KVM}:KVCacheManager.get_computed_blocks", "(self, request)", EXACT, "seams.scheduler.install"),
    Touch(f"{_KVM}:KVCacheManager.free", "(self, request)", EXACT, "seams.scheduler.install"),
    Touch(f"{_KVM}:KVCacheManager.pop_blocks_for_free", "(self, request)", EXACT, "seams.scheduler.install"),
    Touch("vllm.v1.core.sched.output:strip_covered_mm_data", "(mm_features, num_computed_tokens, uses_mrope=False)",
          EXACT, "seams.scheduler._keep_mm_data"),
))


def _is_v2drop(scheduler) -> bool:
    flag = scheduler.__dict__.get("_v2drop_whole_items")
    if flag is None:
        flag = scheduler._v2drop_whole_items = is_v2drop_model(scheduler.vllm_config)
    return flag


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


def install() -> None:
    """Wrap vLLM's scheduler and KV-cache manager (engine core; idempotent, see ``_patch``)."""
    from vllm.v1.core.kv_cache_manager import KVCacheManager
    from vllm.v1.core.sched.scheduler import Scheduler

    def whole_items(original):
        def _try_schedule_encoder_inputs(self, request, num_computed_tokens, num_new_tokens, encoder_compute_budget,
                                         shift_computed_tokens=0):
            # vLLM 0.32's signature spelled out (no *args / **kwargs packing): called for every running
            # multimodal request and step; a decode step pays one dict lookup and one comparison
            last_end = request.__dict__.get("_v2drop_last_end")  # a Python int once computed
            if last_end is None:
                ends = item_bounds(request)[1] if request.mm_features and _is_v2drop(self) else ()
                last_end = request._v2drop_last_end = int(ends[-1]) if len(ends) else -1
            if num_computed_tokens < last_end and num_new_tokens > 0:
                starts, ends = item_bounds(request)
                num_new_tokens = whole_item_limit(starts, ends, num_computed_tokens, num_new_tokens)
            return original(self, request, num_computed_tokens, num_new_tokens, encoder_compute_budget,
                            shift_computed_tokens)

        return _try_schedule_encoder_inputs

    def v2drop_coordinator(init):
        def __init__(self, *args, **kwargs):
            init(self, *args, **kwargs)
            if is_v2drop_model(self.vllm_config):
                from vllm.v1.core.sched import output

                from vllm_v2drop.seams.kv_cache import V2DropCoordinator

                V2DropCoordinator.adopt(self.kv_cache_manager.coordinator, resolve_schedule(self.vllm_config))
                patch(output, "strip_covered_mm_data", _keep_mm_data)

        return __init__

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

    patch(Scheduler, "_try_schedule_encoder_inputs", whole_items)
    patch(Scheduler, "__init__", v2drop_coordinator)
    patch(KVCacheManager, "get_computed_blocks", plans_known)
    patch(KVCacheManager, "free", plans_forgotten)
    patch(KVCacheManager, "pop_blocks_for_free", plans_forgotten)
