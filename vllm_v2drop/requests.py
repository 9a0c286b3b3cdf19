"""A request as V2Drop sees it, and its plan: the same in every process (no vLLM import).

The frontend (from an ``EngineCoreRequest``), the scheduler (from its ``Request``) and the worker
(from the runner's ``CachedRequestState``) all turn a request into a plan here, from the same
fields, so the three agree on every count.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from vllm_v2drop.config import ResolvedSchedule
from vllm_v2drop.overrides import RequestOverride
from vllm_v2drop.overrides import parse as parse_override
from vllm_v2drop.core.request_plan import RequestPlan

logger = logging.getLogger("vllm.v2drop")

__all__ = ["BatchView", "RequestView", "VisionItem", "item_positions", "plan_for", "request_override", "request_view"]


@dataclass(frozen=True)
class VisionItem:
    modality: str
    positions: np.ndarray  # prompt positions of the item's embedding rows


@dataclass(frozen=True)
class RequestView:
    req_id: str
    num_prompt_tokens: int
    items: Sequence[VisionItem]
    wants_prompt_logprobs: bool
    extra_args: dict | None = None  # the request's SamplingParams.extra_args (v2drop_* keys)


@dataclass(frozen=True)
class BatchView:
    """What the runtime needs to know of one engine step, read off the runner.

    ``describe(req_id)`` builds a request's :class:`RequestView`; the runtime calls it
    once per request (its plan is cached), not on every step.
    """

    req_ids: Sequence[str]
    num_computed: np.ndarray
    num_scheduled: np.ndarray
    describe: Callable[[str], RequestView]


def item_positions(mm_position) -> np.ndarray:
    """Prompt positions of one placeholder's embedding rows (``is_embed`` rows only, when given)."""
    rows = np.arange(mm_position.offset, mm_position.offset + mm_position.length, dtype=np.int64)
    if mm_position.is_embed is not None:
        is_embed = mm_position.is_embed
        is_embed = is_embed.cpu().numpy() if hasattr(is_embed, "cpu") else np.asarray(is_embed)
        rows = rows[is_embed.astype(bool)]
    return rows


def request_view(req_id: str, num_prompt_tokens: int, mm_features: Iterable | None, sampling_params) -> RequestView:
    """The :class:`RequestView` of a request, from the fields the scheduler's ``Request``
    and the runner's ``CachedRequestState`` both have."""
    features = sorted(mm_features or (), key=lambda f: f.mm_position.offset)
    return RequestView(
        req_id=req_id,
        num_prompt_tokens=int(num_prompt_tokens),
        items=[VisionItem(f.modality, item_positions(f.mm_position)) for f in features],
        wants_prompt_logprobs=sampling_params is not None
        and getattr(sampling_params, "prompt_logprobs", None) is not None,
        extra_args=getattr(sampling_params, "extra_args", None),
    )


def request_override(schedule: ResolvedSchedule, req: RequestView) -> RequestOverride | None:
    """The request's own V2Drop settings (``v2drop_*`` keys of its ``extra_args``), or None.

    The frontend refused bad values before the request was scheduled
    (:mod:`vllm_v2drop.seams.frontend`); should one get here anyway (a request built by hand and
    handed to the engine core directly), the engine's schedule applies: the same on the
    worker and the scheduler side, and no engine error for a client mistake.
    """
    if not req.extra_args:
        return None
    try:
        return parse_override(req.extra_args, schedule)
    except ValueError as err:
        logger.warning("V2Drop request %s: %s; using the engine's schedule", req.req_id, err)
        return None


def plan_for(schedule: ResolvedSchedule, req: RequestView) -> RequestPlan:
    """A request's plan: its items of the enabled modalities; no pruning for prompt logprobs.

    The one place that turns a request into a plan, for the worker (this runtime, from the
    runner's ``CachedRequestState``) and the scheduler (``engine/plans.py``, from vLLM's
    ``Request``) alike: both give :func:`request_view` the same ``mm_features``, prompt
    length and sampling params (with the request's ``v2drop_*`` settings, see
    :mod:`vllm_v2drop.overrides`), so KV blocks allocated per stage always match the rows
    the worker writes.
    """
    items = [it.positions for it in req.items if it.modality in schedule.modalities]
    prune = bool(schedule.layers) and not req.wants_prompt_logprobs
    override = request_override(schedule, req) if prune else None
    if override is not None and override.off:
        prune = False
    ratios = override.keep_ratios if override is not None else None
    return schedule.plan(items, req.num_prompt_tokens, prune=prune, keep_ratios=ratios)
