"""The quality probe's seam (API server / offline ``LLM``): the shadow request, built from the
finished request's own ``EngineCoreRequest`` and sent straight to the engine core.

The shadow is a copy of the request with a new id, the answer's tokens appended to
``prompt_token_ids``, and its own ``SamplingParams`` (``max_tokens=1``,
``prompt_logprobs=1``, ``v2drop_off``; ``prompt_logprobs`` also keeps it from reading the
prefix cache, so it never reuses a pruned request's KV). Its ``mm_features`` are the
request's processed vision inputs. vLLM's multimodal IPC cache (``mm_processor_cache_type``
``lru``, the default with one API server) keeps a mirror of the engine core's cache in the
frontend; so the shadow sends the items without their data, only while the mirror still holds
them (else it is skipped: ``mm_cache``), and touches them in the mirror in the order the engine
core's cache will, so both stay in step. Without an IPC cache (``processor_only``, none) the
data travels, as it did for the request. With ``shm`` the probe stays off.

Outputs of shadows never reach vLLM's ``OutputProcessor``: :mod:`vllm_v2drop.seams.frontend`
hands them to the probe first (:meth:`~vllm_v2drop.frontend.probe.QualityProbe.take_shadow_outputs`).
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref

from vllm_v2drop.frontend.probe import ProbeSkip, QualityProbe
from vllm_v2drop.seams._check import CALLS, Seam, Touch

logger = logging.getLogger("vllm.v2drop")

__all__ = ["SEAM", "attach_probe"]

_BY = "seams.probe.attach_probe"

SEAM = Seam("quality probe", "API server / LLM: the teacher-forced shadow of a finished request", (
    Touch("vllm.v1.engine:EngineCoreRequest", None, CALLS, _BY),
    Touch("vllm.v1.engine:FinishReason", None, CALLS, _BY),
    Touch("vllm.v1.engine.core_client:EngineCoreClient.add_request", "(self, request)", CALLS, _BY),
    Touch("vllm.v1.engine.core_client:EngineCoreClient.add_request_async", "(self, request)", CALLS, _BY),
    Touch("vllm.multimodal.inputs:MultiModalFeatureSpec", None, CALLS, _BY),
    Touch("vllm.multimodal.cache.base:BaseMultiModalProcessorCache.is_cached_item", "(self, mm_hash)", CALLS, _BY),
    Touch("vllm.multimodal.cache.base:BaseMultiModalProcessorCache.touch_sender_cache_item", "(self, mm_hash)",
          CALLS, _BY),
    Touch("vllm.multimodal.cache.lru:LruKeyReplicatedSenderCache", None, CALLS, _BY),
    Touch("vllm.multimodal.cache.shm:ShmObjectStoreSenderCache", None, CALLS, _BY),
))

SHADOW_SUFFIX = "-v2drop-probe"


def _cache_key(feature) -> str:
    return feature.mm_hash or feature.identifier  # as the engine core's receiver cache keys it


def attach_probe(engine, stats, settings, *, is_async: bool, prometheus: bool, collect: bool = False):
    """Give ``stats`` (the engine's :class:`~vllm_v2drop.frontend.stats.FrontendStats`) a
    :class:`QualityProbe` that submits shadows to ``engine`` (an ``AsyncLLM`` or ``LLMEngine``).

    Returns the probe, or None when it cannot run here (logged)."""
    import dataclasses

    import msgspec

    from vllm.multimodal.cache.lru import LruKeyReplicatedSenderCache
    from vllm.multimodal.cache.shm import ShmObjectStoreSenderCache
    from vllm.sampling_params import RequestOutputKind, SamplingParams
    from vllm.v1.engine import FinishReason

    cache = engine.renderer.mm_processor_cache
    if isinstance(cache, ShmObjectStoreSenderCache):
        logger.warning("V2Drop quality probe is off: it does not support mm_processor_cache_type 'shm'")
        return None
    mirrored = isinstance(cache, LruKeyReplicatedSenderCache)  # the engine core holds the items' data
    core = engine.engine_core
    op_ref = weakref.ref(engine.output_processor)
    tasks: set = set()

    def template(request):
        features = request.mm_features or []
        if mirrored:  # only the keys travel; the data stays in the engine core's cache
            features = [dataclasses.replace(f, data=None) for f in features]
        return msgspec.structs.replace(request, mm_features=features, sampling_params=None)

    def submit(req, answer) -> str:
        if req.prompt_is_token_ids is not None or req.prompt_embeds is not None:
            raise ProbeSkip("error")
        if mirrored and req.mm_features:
            keys = [_cache_key(f) for f in req.mm_features]
            if not all(cache.is_cached_item(k) for k in keys):
                raise ProbeSkip("mm_cache")
            for k in keys:  # the engine core's cache touches them all when the shadow arrives
                cache.touch_sender_cache_item(k)
        sid = req.request_id + SHADOW_SUFFIX
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1, detokenize=False,
                                output_kind=RequestOutputKind.FINAL_ONLY, extra_args={"v2drop_off": True})
        shadow = msgspec.structs.replace(
            req, request_id=sid, external_req_id=sid, prompt_token_ids=[*req.prompt_token_ids, *answer],
            sampling_params=params, arrival_time=time.time(), trace_headers=None, resumable=False,
            reasoning_ended=None, reasoning_parser_kwargs=None, abort_immediately=False)
        if is_async:
            task = asyncio.get_running_loop().create_task(core.add_request_async(shadow))
            tasks.add(task)
            task.add_done_callback(lambda t, sid=sid: _sent(t, sid))
        else:
            core.add_request(shadow)
        return sid

    def _sent(task, sid):
        tasks.discard(task)
        if not task.cancelled() and task.exception() is None:
            return
        logger.warning("V2Drop probe: could not send shadow %s: %r", sid,
                       None if task.cancelled() else task.exception())
        probe.finish(sid, ok=False)

    def waiting() -> int:
        op = op_ref()
        if op is None:
            return 0
        return sum(1 for r in op.request_states.values() if r.is_prefilling)

    probe = QualityProbe(
        settings, template=template, submit=submit, waiting=waiting,
        normal_finishes=(FinishReason.STOP, FinishReason.LENGTH),
        max_model_len=engine.vllm_config.model_config.max_model_len,
        model_name=stats.model_name, prometheus=prometheus, collect=collect)
    stats.probe = probe
    logger.info("V2Drop quality probe on: rate %g, at most %d shadows at once, none while more than %d "
                "requests wait", probe.rate, probe.max_in_flight, probe.max_waiting)
    return probe
