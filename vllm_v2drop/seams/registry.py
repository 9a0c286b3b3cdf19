"""How V2Drop plugs into vLLM: model registration, ``--model-impl v2drop``, config hook.

Everything here runs in every vLLM process (through ``register()``); it only
touches Python objects (no CUDA) and is idempotent.
"""

from __future__ import annotations

import logging

from vllm_v2drop.core.architectures import ARCHITECTURES, MODEL_IMPL, V2DROP_ARCHITECTURES
from vllm_v2drop.config import resolve_schedule
from vllm_v2drop.engine.per_stage import check_per_stage_supported, describe_layout
from vllm_v2drop.errors import V2DropStartupError
from vllm_v2drop.seams._check import CALLS, EXACT, NAMES, Seam, Touch
from vllm_v2drop.seams._patch import is_patched, patch
from vllm_v2drop.version import check_vllm_version

logger = logging.getLogger("vllm.v2drop")

_REG = "vllm.model_executor.models.registry"
_MCFG = "vllm.model_executor.models.config"

SEAM = Seam("model registry and config hook", "every process: the V2Drop architectures, --model-impl v2drop, the config hook", (
    Touch("vllm.model_executor.models:ModelRegistry", None, NAMES, "seams.registry._register"),
    Touch(f"{_REG}:_ModelRegistry.register_model", "(self, model_arch, model_cls)", CALLS, "seams.registry._register"),
    Touch(f"{_REG}:_ModelRegistry.inspect_model_cls", "(self, architectures, model_config)", EXACT,
          "seams.registry._map_model_impl"),
    Touch(f"{_REG}:_ModelRegistry.resolve_model_cls", "(self, architectures, model_config)", EXACT,
          "seams.registry._map_model_impl"),
    Touch(f"{_MCFG}:MODELS_CONFIG_MAP", None, NAMES, "seams.registry._register"),
    Touch(f"{_MCFG}:VerifyAndUpdateConfig.verify_and_update_model_config", "(model_config)", EXACT,
          "seams.registry.V2DropConfigHook"),
    Touch(f"{_MCFG}:VerifyAndUpdateConfig.verify_and_update_config", "(vllm_config)", EXACT,
          "seams.registry.V2DropConfigHook"),
    Touch("vllm.config:CompilationMode.STOCK_TORCH_COMPILE", None, NAMES, "seams.registry._defeats_stage_metadata"),
    Touch("vllm.config:CUDAGraphMode.has_full_cudagraphs", "(self)", CALLS, "seams.registry._force_runner_and_graphs"),
    Touch("vllm.config:CUDAGraphMode.has_piecewise_cudagraphs", "(self)", CALLS,
          "seams.registry._force_runner_and_graphs"),
    Touch("vllm.platforms.interface:Platform.is_cuda_alike", "(self)", CALLS, "seams.registry._force_runner_and_graphs"),
    Touch("vllm.platforms.interface:Platform.support_hybrid_kv_cache", "()", CALLS,
          "seams.registry.V2DropConfigHook"),
))


def _no_check() -> None:
    pass


#: The seam check run wherever V2Drop is asked for (``install`` sets it: every seam's declaration).
_check_seams = _no_check


def install(check_seams) -> bool:
    """Register the V2Drop models, the ``--model-impl v2drop`` mapping and the config hook
    (every process); ``check_seams`` runs after the version check wherever V2Drop is asked for.
    False if this process has them already."""
    global _check_seams
    from vllm.model_executor.models import ModelRegistry

    if is_patched(ModelRegistry, "inspect_model_cls"):
        return False
    _check_seams = check_seams
    _register(V2DropConfigHook)
    return True


def install_version_guard() -> None:
    """Another vLLM: only what makes a V2Drop request stop with the version message; vLLM's
    internals stay untouched and nothing here may break a stock engine."""
    from vllm_v2drop.version import V2DropVersionGuard

    try:
        _register(V2DropVersionGuard)
    except Exception as err:  # noqa: BLE001
        logger.warning("V2Drop could not register with this vLLM (%s); it stays inactive.", err)


def _register(config_hook) -> None:
    """The V2Drop architectures (with their config hook) and the ``--model-impl v2drop`` mapping."""
    from vllm.model_executor.models import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    for v2_arch in V2DROP_ARCHITECTURES:
        ModelRegistry.register_model(v2_arch, f"vllm_v2drop.models:{v2_arch}")
        MODELS_CONFIG_MAP[v2_arch] = config_hook
    _map_model_impl(ModelRegistry)


def _supported_message(architectures) -> str:
    return (
        f"--model-impl {MODEL_IMPL} does not support architecture(s) {list(architectures)}. "
        f"Supported: {', '.join(sorted(ARCHITECTURES))}. "
        "Serve this model without --model-impl v2drop."
    )


def _map_model_impl(registry) -> None:
    """Make ``--model-impl v2drop`` select the V2Drop variant of a supported VLM.

    vLLM parses ``model_impl`` as a free string. For ``v2drop`` we rewrite the
    top-level architecture to its V2Drop name in the registry's inspect and
    resolve steps. Inner language models (``Qwen2ForCausalLM`` ...) pass through
    unchanged; an unsupported top-level architecture fails in ``inspect`` (which
    vLLM calls only for the top-level model config).
    """

    def mapped(architectures, model_config, strict: bool):
        archs = [architectures] if isinstance(architectures, str) else list(architectures)
        wants_v2drop = getattr(model_config, "model_impl", None) == MODEL_IMPL
        if wants_v2drop or any(a in V2DROP_ARCHITECTURES for a in archs):
            check_vllm_version()  # another vLLM: stop here, with the installed and supported versions
            _check_seams()  # a build that differs where V2Drop hooks in: stop here, naming each difference
        if not wants_v2drop:
            return architectures
        out = [ARCHITECTURES.get(a, a) for a in archs]
        if strict and not any(a in V2DROP_ARCHITECTURES for a in out):
            raise V2DropStartupError(_supported_message(archs))
        return out

    def wrap(strict: bool):
        def wrapper(original):
            def mapped_call(architectures, model_config):
                return original(mapped(architectures, model_config, strict=strict), model_config)

            return mapped_call

        return wrapper

    # the registry instance's own methods: a bound method's signature is vLLM's without ``self``
    patch(registry, "inspect_model_cls", wrap(strict=True))
    patch(registry, "resolve_model_cls", wrap(strict=False))


class V2DropConfigHook:
    """vLLM's per-architecture config hook (``MODELS_CONFIG_MAP``) for the V2Drop models.

    Forces what V2Drop needs, refuses what it cannot support, and validates the
    ``--additional-config '{"v2drop": ...}'`` against the model's depth, so that a
    bad setting fails at start-up with one clear message.
    """

    @staticmethod
    def verify_and_update_model_config(model_config) -> None:
        check_vllm_version()
        _check_seams()

    @staticmethod
    def verify_and_update_config(vllm_config) -> None:
        check_vllm_version()
        _check_seams()
        refused = []
        if vllm_config.speculative_config is not None:
            refused.append("speculative decoding (--speculative-config)")
        if vllm_config.kv_transfer_config is not None:
            refused.append("KV connectors / disaggregated prefill (--kv-transfer-config)")
        if getattr(vllm_config.parallel_config, "decode_context_parallel_size", 1) > 1:
            refused.append("decode context parallelism (--decode-context-parallel-size > 1)")
        mm_config = getattr(vllm_config.model_config, "multimodal_config", None)
        if mm_config is not None and mm_config.is_multimodal_pruning_enabled():
            # Qwen3-VL's EVS: its video placeholders then mark timestamp text rows as embedding rows
            refused.append("vLLM's own video token pruning (--video-pruning-rate > 0)")
        refused += _defeats_stage_metadata(vllm_config)
        from vllm_v2drop.seams.scheduler import SCHEDULER_CLS

        if vllm_config.scheduler_config.scheduler_cls not in (None, SCHEDULER_CLS):
            refused.append(f"another scheduler class (--scheduler-cls {vllm_config.scheduler_config.scheduler_cls}): "
                           "V2Drop's scheduler is vLLM's own with V2Drop's parts")
        if refused:
            raise V2DropStartupError(
                "V2Drop (--model-impl v2drop) cannot run with: " + "; ".join(refused)
                + ". Drop these options or serve without --model-impl v2drop."
            )

        schedule = resolve_schedule(vllm_config)  # raises V2DropConfigError with a clear message

        forced = []
        if vllm_config.cache_config.enable_prefix_caching:
            logger.info("V2Drop prefix caching: %s; text-only and unpruned requests cache as in stock vLLM",
                        "a pruned request's blocks are cached per stage, so a later request with the same "
                        "prefix, images and keep ratios reuses its pruned vision rows and history (kv_mode "
                        "per_stage)" if schedule.kv_mode == "per_stage" and schedule.layers else
                        "blocks before a pruned request's first vision item are shared (kv_mode shared; "
                        "kv_mode per_stage also reuses pruned images)")
        scheduler_config = vllm_config.scheduler_config
        # vLLM's hook for a scheduler subclass: whole vision items per step, the V2Drop KV-cache coordinator
        scheduler_config.scheduler_cls = SCHEDULER_CLS
        if schedule.chunked_items and schedule.layers:
            refuse = _chunked_items_problems(vllm_config, schedule)
            if refuse:
                raise V2DropStartupError("V2Drop chunked_items cannot run with: " + "; ".join(refuse)
                                         + ". Turn chunked_items off (every vision item then fits one step).")
            logger.info("V2Drop chunked_items: a vision item may be split across prefill steps; its rows wait "
                        "at layer %d until the item completes", schedule.layers[0])
        elif not scheduler_config.disable_chunked_mm_input:
            scheduler_config.disable_chunked_mm_input = True
            forced.append("multimodal items never split across prefill chunks (disable_chunked_mm_input)")
        if schedule.kv_mode == "per_stage" and schedule.layers:
            forced += check_per_stage_supported(vllm_config, schedule, _hybrid_kv_cache_problem())  # raises where it cannot work
            logger.info("%s", describe_layout(schedule))
        forced += _force_runner_and_graphs(vllm_config)
        logger.info("%s", schedule.description)
        if forced:
            logger.info("V2Drop forces: %s", "; ".join(forced))


def _chunked_items_problems(vllm_config, schedule) -> list[str]:
    """What ``chunked_items`` does not support yet, each with the reason."""
    problems = []
    if vllm_config.parallel_config.pipeline_parallel_size > 1:
        problems.append("pipeline parallelism (the held rows would have to live on the rank of the first "
                        "drop layer and travel with the rows of the step that completes the item)")
    if vllm_config.scheduler_config.disable_chunked_mm_input:
        problems.append("disable_chunked_mm_input (it keeps items whole, which chunked_items is for)")
    vision = getattr(vllm_config.model_config.hf_config, "vision_config", None)
    levels = len(getattr(vision, "deepstack_visual_indexes", None) or ())  # Qwen3-VL: added after layers 0 .. levels-1
    if levels > schedule.layers[0]:
        problems.append(f"a first drop layer ({schedule.layers[0]}) before the last of Qwen3-VL's {levels} DeepStack "
                        "levels (the held rows would miss the visual features added after it)")
    return problems


def _defeats_stage_metadata(vllm_config) -> list[str]:
    """Settings under which a stage's layers would not see their own attention metadata, slot
    mapping or rows, with no error anywhere: each named with the reason.

    The config hook runs before vLLM applies its defaults, so only settings a user made are seen
    here; vLLM 0.32's defaults turn none of them on for a V2Drop model.
    """
    import os

    from vllm.config import CompilationMode

    refused = []
    if os.environ.get("VLLM_USE_BREAKABLE_CUDAGRAPH") == "1":  # as vllm.envs reads it
        refused.append(
            "breakable CUDA graphs (VLLM_USE_BREAKABLE_CUDAGRAPH=1): a step that drops rows would "
            "replay the graph captured without drops instead of the stages' own attention metadata")
    compilation = vllm_config.compilation_config
    if compilation.mode == CompilationMode.STOCK_TORCH_COMPILE:
        refused.append(
            "stock torch.compile (compilation_config mode STOCK_TORCH_COMPILE, -cc.mode=1): it compiles "
            "the whole model's forward in one graph, the drop loop and its per-step plan included")
    if getattr(compilation.pass_config, "fuse_attn_quant", None):
        refused.append(
            "attention + quantisation fusion (compilation_config pass_config.fuse_attn_quant): it turns "
            "the piecewise CUDA graphs of V2Drop's drop steps into full ones, whose attention metadata is one "
            "for all stages")
    if compilation.use_inductor_graph_partition:
        refused.append(
            "Inductor graph partitioning (compilation_config use_inductor_graph_partition): the KV-cache "
            "write is no longer a graph split point, so captured pieces write with one slot mapping for all stages")
    if vllm_config.parallel_config.use_ubatching:
        refused.append(
            "micro-batching / dual batch overlap (--enable-dbo, --ubatch-size > 1): attention metadata becomes "
            "one per micro-batch, and V2Drop would stop dropping while kv_mode per_stage still compacts the KV cache")
    if vllm_config.lora_config is not None:
        refused.append("LoRA (--enable-lora): its per-token adapter mappings are not cut with the dropped rows")
    return refused


def _hybrid_kv_cache_problem() -> str | None:
    """Why this platform cannot give stages their own KV-cache groups, or None."""
    try:
        from vllm.platforms import current_platform

        if not current_platform.support_hybrid_kv_cache():
            return f"platform {current_platform.device_name!r} has no hybrid KV cache manager"
    except Exception:  # noqa: BLE001  (platform detection failing is vLLM's own error to report)
        pass
    return None


def _force_runner_and_graphs(vllm_config) -> list[str]:
    """On GPUs: the V1 model runner (the adapter V2Drop ships); says how CUDA graphs serve V2Drop.

    vLLM's CUDA graph mode is kept (0.32's default: FULL_AND_PIECEWISE). A full graph replays
    attention with the metadata it was captured with, one for every layer, so a step V2Drop plans
    (each stage's layers with their own metadata) never takes one: the runner seam dispatches it
    to a piecewise graph, whose attention runs eagerly between the captured pieces and reads each
    layer's own metadata, or runs it eagerly where no piecewise graph was captured.
    """
    import os

    from vllm.platforms import current_platform

    forced = []
    if vllm_config.use_v2_model_runner:
        os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"  # inherited by the engine processes
        if vllm_config.use_v2_model_runner:
            raise V2DropStartupError(
                "V2Drop (--model-impl v2drop) runs on vLLM's V1 model runner, but this configuration "
                "requires Model Runner V2. Set VLLM_USE_V2_MODEL_RUNNER=0 or drop the option that needs it."
            )
        forced.append("the V1 model runner (VLLM_USE_V2_MODEL_RUNNER=0)")
    if "VLLM_USE_BREAKABLE_CUDAGRAPH" not in os.environ and os.environ.get("VLLM_BATCH_INVARIANT", "0") != "0":
        os.environ["VLLM_USE_BREAKABLE_CUDAGRAPH"] = "0"  # vLLM turns it on for batch invariance otherwise
        forced.append("no breakable CUDA graphs with VLLM_BATCH_INVARIANT (VLLM_USE_BREAKABLE_CUDAGRAPH=0)")
    mode = vllm_config.compilation_config.cudagraph_mode
    if current_platform.is_cuda_alike() and (mode is None or mode.has_full_cudagraphs()):
        logger.info("V2Drop CUDA graphs: full graphs for steps V2Drop plans nothing in (text, decodes of "
                    "requests that dropped nothing); steps with per-stage attention metadata run %s",
                    "piecewise graphs" if mode is None or mode.has_piecewise_cudagraphs() else "eagerly")
    return forced
