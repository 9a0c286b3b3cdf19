"""Scheduler side: a V2Drop engine never splits a vision item across steps.

V2Drop ranks an item's rows against each other at every stage, so all rows of an
item must be computed in one step (:func:`vllm_v2drop.plan.plan_step` refuses a
step that holds part of an item). vLLM's ``disable_chunked_mm_input`` (forced on)
rolls a step back to an item's start only while the request's computed tokens are
*before* that start (``Scheduler._try_schedule_encoder_inputs``). A request that
stops exactly at an item's start (the guard itself stops it there, e.g. the
children of an ``n > 1`` request or a request that lost the token budget to
others) could then get only part of the item in its next step.

:func:`install` wraps ``Scheduler._try_schedule_encoder_inputs`` (inherited by
``AsyncScheduler``): for a V2Drop engine, the tokens it is offered are first cut
with :func:`vllm_v2drop.plan.whole_item_limit`, so the step ends before an item it
cannot hold whole (0 tokens: the request waits, as vLLM makes it wait for encoder
budget). Every cut vLLM applies after this call (prefill lookahead, Mamba
alignment) belongs to features a V2Drop engine refuses, and every cut before it
(token budget, ``long_prefill_token_threshold``, ``max_model_len``) only shortens
the offered count, so this is the last word on where a step ends.
"""

from __future__ import annotations

import functools

import numpy as np

from vllm_v2drop.plan import whole_item_limit

__all__ = ["install", "item_bounds"]


def item_bounds(request) -> tuple[np.ndarray, np.ndarray]:
    """``(starts, ends)`` of a request's placeholder ranges, cached on the request."""
    bounds = request.__dict__.get("_v2drop_item_bounds")
    if bounds is None:
        pos = sorted((f.mm_position.offset, f.mm_position.length) for f in request.mm_features or ())
        starts = np.asarray([o for o, _ in pos], dtype=np.int64)
        bounds = request._v2drop_item_bounds = (starts, starts + np.asarray([n for _, n in pos], dtype=np.int64))
    return bounds


def _is_v2drop(scheduler) -> bool:
    flag = scheduler.__dict__.get("_v2drop_whole_items")
    if flag is None:
        from vllm_v2drop.integration import V2DROP_ARCHITECTURES

        model_config = getattr(scheduler.vllm_config, "model_config", None)
        flag = scheduler._v2drop_whole_items = getattr(model_config, "architecture", None) in V2DROP_ARCHITECTURES
    return flag


def install() -> None:
    from vllm.v1.core.sched.scheduler import Scheduler

    original = Scheduler._try_schedule_encoder_inputs
    if getattr(original, "__v2drop__", False):
        return

    @functools.wraps(original)
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

    _try_schedule_encoder_inputs.__v2drop__ = True
    Scheduler._try_schedule_encoder_inputs = _try_schedule_encoder_inputs

    from vllm_v2drop.kv.manager import install_scheduler_hooks

    install_scheduler_hooks()  # the KV cache side: per-request plans, per_stage counts, prefix caching
