"""The frontend seam (API server / offline ``LLM``): per-request settings checked at admission,
and the metrics attached to each engine.

``InputProcessor.process_inputs`` is where vLLM checks a request's params before it becomes an
``EngineCoreRequest``; for a V2Drop engine its ``v2drop_*`` keys are checked first
(:func:`vllm_v2drop.overrides.validate`: HTTP 400 / ``ValueError`` with the reason). Each
``AsyncLLM`` / ``LLMEngine`` gets a :class:`~vllm_v2drop.frontend.stats.FrontendStats`, fed by
``OutputProcessor`` (why there: :mod:`vllm_v2drop.frontend.stats`).
"""

from __future__ import annotations

import logging

from vllm_v2drop.config import V2DropConfig
from vllm_v2drop.core.architectures import is_v2drop_model
from vllm_v2drop.config import resolve_schedule
from vllm_v2drop.frontend.stats import FrontendStats
from vllm_v2drop.overrides import validate
from vllm_v2drop.seams._check import CALLS, NAMES, Seam, Touch
from vllm_v2drop.seams._patch import patch

logger = logging.getLogger("vllm.v2drop")

__all__ = ["SEAM", "install", "schedule_of"]

_OP = "vllm.v1.engine.output_processor"
_BY = "seams.frontend.install"

SEAM = Seam("frontend and input processing", "API server / LLM: per-request settings at admission, metrics", (
    Touch("vllm.v1.engine.input_processor:InputProcessor.process_inputs", "(self, request_id, prompt, params)",
          NAMES, _BY),
    Touch("vllm.v1.engine.async_llm:AsyncLLM.__init__", "(self)", NAMES, _BY),
    Touch("vllm.v1.engine.llm_engine:LLMEngine.__init__", "(self)", NAMES, _BY),
    Touch(f"{_OP}:OutputProcessor.add_request", "(self, request)", NAMES, _BY),
    Touch(f"{_OP}:OutputProcessor.process_outputs", "(self, engine_core_outputs)", NAMES, _BY),
    Touch(f"{_OP}:OutputProcessor.abort_requests", "(self)", NAMES, _BY),
    Touch("vllm.exceptions:VLLMValidationError", "(message, *, parameter)", CALLS,
          "seams.errors.validation_error_base"),
))


def schedule_of(input_processor):
    """The V2Drop schedule of the engine an ``InputProcessor`` serves (None: not a V2Drop model)."""
    cached = input_processor.__dict__.get("_v2drop_schedule", False)
    if cached is not False:
        return cached
    schedule = None
    try:
        config = input_processor.vllm_config
        if is_v2drop_model(config):
            schedule = resolve_schedule(config)
    except Exception:  # noqa: BLE001 (start-up already validated the config; never fail a request here)
        logger.exception("V2Drop: could not resolve the schedule in the frontend")
    input_processor.__dict__["_v2drop_schedule"] = schedule
    return schedule




def _attach(engine, prometheus: bool) -> None:
    schedule = schedule_of(engine.input_processor)
    if schedule is None or not schedule.layers:
        return
    config = engine.vllm_config
    name = config.model_config.served_model_name
    stats = FrontendStats(
        schedule,
        block_size=getattr(config.cache_config, "block_size", None),
        model_name=name if isinstance(name, str) else str(name),
        prometheus=prometheus,
    )
    engine.output_processor._v2drop_stats = stats
    settings = V2DropConfig.from_additional_config(config.additional_config).quality_probe
    if settings is not None:
        from vllm_v2drop.seams.probe import attach_probe

        try:
            attach_probe(engine, stats, settings, is_async=prometheus, prometheus=prometheus,
                         collect=not prometheus)
        except Exception:  # noqa: BLE001 (the probe must never stop the server)
            logger.exception("V2Drop: the quality probe is off")


def install() -> None:
    """Wrap vLLM's frontend classes (API server / ``LLM``; idempotent, see ``_patch``; a no-op for
    engines that are not V2Drop)."""
    from vllm.v1.engine.async_llm import AsyncLLM
    from vllm.v1.engine.input_processor import InputProcessor
    from vllm.v1.engine.llm_engine import LLMEngine
    from vllm.v1.engine.output_processor import OutputProcessor

    def validated(process_inputs):
        def _process_inputs(self, request_id, prompt, params, *args, **kwargs):
            schedule = schedule_of(self)
            if schedule is not None and getattr(params, "extra_args", None):
                validate(params, schedule)
            return process_inputs(self, request_id, prompt, params, *args, **kwargs)

        return _process_inputs

    def attached(prometheus: bool):
        def wrap(init):
            def __init__(self, *args, **kwargs):
                init(self, *args, **kwargs)
                try:
                    _attach(self, prometheus)
                except Exception:  # noqa: BLE001 (metrics must never stop the server)
                    logger.exception("V2Drop: metrics are off")

            return __init__

        return wrap

    def counted_add(add_request):
        def _add_request(self, request, *args, **kwargs):
            out = add_request(self, request, *args, **kwargs)
            stats = self.__dict__.get("_v2drop_stats")
            if stats is not None:
                try:
                    stats.on_add(request)
                except Exception:  # noqa: BLE001
                    logger.exception("V2Drop: could not count request %s", request.request_id)
            return out

        return _add_request

    def counted_outputs(process_outputs):
        def _process_outputs(self, engine_core_outputs, *args, **kwargs):
            stats = self.__dict__.get("_v2drop_stats")
            if stats is None:
                return process_outputs(self, engine_core_outputs, *args, **kwargs)
            probe = stats.probe
            if probe is not None and probe.shadows:  # the probe's own shadows never reach vLLM's outputs
                try:
                    engine_core_outputs = probe.take_shadow_outputs(engine_core_outputs)
                except Exception:  # noqa: BLE001
                    logger.exception("V2Drop: quality probe update failed")
            if stats.live:
                try:
                    stats.on_outputs(engine_core_outputs)
                except Exception:  # noqa: BLE001
                    logger.exception("V2Drop: metrics update failed")
            result = process_outputs(self, engine_core_outputs, *args, **kwargs)
            if probe is not None and probe.watched:  # after vLLM trimmed what follows a stop string
                try:
                    probe.after_outputs(engine_core_outputs, result.reqs_to_abort)
                except Exception:  # noqa: BLE001
                    logger.exception("V2Drop: quality probe update failed")
            return result

        return _process_outputs

    def counted_aborts(abort_requests):
        def _abort_requests(self, *args, **kwargs):
            aborted = abort_requests(self, *args, **kwargs)
            stats = self.__dict__.get("_v2drop_stats")
            if stats is not None:
                if stats.live:
                    stats.on_abort(aborted)
                if stats.probe is not None and stats.probe.watched:
                    stats.probe.on_abort(aborted)
            return aborted

        return _abort_requests

    patch(InputProcessor, "process_inputs", validated)
    patch(AsyncLLM, "__init__", attached(prometheus=True))
    patch(LLMEngine, "__init__", attached(prometheus=False))
    patch(OutputProcessor, "add_request", counted_add)
    patch(OutputProcessor, "process_outputs", counted_outputs)
    patch(OutputProcessor, "abort_requests", counted_aborts)
