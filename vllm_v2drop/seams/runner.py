"""The model-runner seam (worker): vLLM's V1 model runner (``GPUModelRunner`` and its ``CPUModelRunner`` subclass).

vLLM 0.32 uses it on CPU (no Triton) and on GPUs with ``VLLM_USE_V2_MODEL_RUNNER=0``.
``install()`` wraps ``GPUModelRunner._model_forward``; the wrapper does
nothing unless the loaded model carries a ``v2drop_runtime`` (a V2Drop model).
Inside the forward context it reads the step off the runner, asks the runtime
for the step's plan, and gives every layer of stage ``s`` its own attention
metadata (compacted query offsets, sequence lengths, slot mapping) built by the
attention backend's own metadata builder.
"""

from __future__ import annotations

import copy
import functools
import logging

import numpy as np
import torch

from vllm_v2drop.requests import BatchView, request_view
from vllm_v2drop.core.step_plan import StepPlan
from vllm_v2drop.seams._check import CALLS, EXACT, NAMES, Seam, Touch
from vllm_v2drop.seams._patch import patch
from vllm_v2drop.seams.staging import StepStaging, worst_case_bytes
from vllm_v2drop.worker.audit import BlockAudit
from vllm_v2drop.worker.audit import enabled as audit_enabled
from vllm_v2drop.worker.runtime import V2DropRuntime

logger = logging.getLogger("vllm.v2drop")

_BT = "vllm.v1.worker.block_table"
_AG = "vllm.v1.worker.utils"
_BY = "seams.runner."

SEAM = Seam("model runner", "worker: each stage's attention metadata and slot mapping, read off vLLM's V1 runner", (
    Touch("vllm.v1.worker.gpu_model_runner:GPUModelRunner._model_forward", "(self)", NAMES, _BY + "install"),
    Touch("vllm.v1.worker.gpu_model_runner:GPUModelRunner.get_model", "(self)", CALLS, _BY + "install"),
    # wrapped: a real step's inputs are prepared; planned next, before vLLM picks its CUDA graph
    Touch("vllm.v1.worker.gpu_model_runner:GPUModelRunner._prepare_inputs",
          "(self, scheduler_output, num_scheduled_tokens)", EXACT, _BY + "install"),
    Touch("vllm.v1.worker.gpu_model_runner:GPUModelRunner._determine_batch_execution_and_padding", "(self)",
          NAMES, _BY + "install"),
    Touch("vllm.v1.cudagraph_dispatcher:CudagraphDispatcher.dispatch",
          "(self, num_tokens, uniform_decode=False, has_lora=False, num_active_loras=0, valid_modes=None, "
          "invalid_modes=None)", EXACT, _BY + "_no_full_graph"),
    Touch("vllm.config:CUDAGraphMode.FULL", None, NAMES, _BY + "_no_full_graph"),
    Touch("vllm.forward_context:ForwardContext", "(no_compile_layers, attn_metadata, slot_mapping, *, cudagraph_runtime_mode)",
          NAMES, _BY + "_step_plan"),
    # wrapped: frees the stash of finished, aborted and preempted requests (chunked_items)
    Touch("vllm.v1.worker.gpu_model_runner:GPUModelRunner._update_states", "(self, scheduler_output)", NAMES,
          _BY + "install"),
    Touch("vllm.v1.core.sched.output:SchedulerOutput", "(*, finished_req_ids, preempted_req_ids)", NAMES,
          _BY + "install"),
    # wrapped; is_profile given by name by profile_run, as vLLM 0.32 does
    Touch("vllm.v1.worker.gpu_model_runner:GPUModelRunner._dummy_run", "(self, num_tokens, *, is_profile)",
          NAMES, _BY + "install"),
    Touch(f"{_AG}:AttentionGroup.build_metadata",
          "(self, common_attn_metadata, ubatch_idx=0, common_prefix_len=0, **kwargs)",
          EXACT, _BY + "_reuse_stage_builds"),
    Touch(f"{_AG}:AttentionGroup.get_metadata_builder", "(self)", CALLS, _BY + "_retarget"),
    Touch(f"{_AG}:AttentionGroup.create_metadata_builders", "(self, vllm_config, device, kernel_block_size)",
          CALLS, _BY + "_stage_groups"),
    Touch(f"{_AG}:AttentionGroup.map_to_kernel_block_table", "(self, block_table)", CALLS, _BY + "_retarget"),
    Touch(f"{_BT}:MultiGroupBlockTable.compute_slot_mapping", "(self, num_reqs, query_start_loc, positions)",
          EXACT, _BY + "_defer_stage_slots"),
    Touch(f"{_BT}:BlockTable.compute_slot_mapping", "(self, num_reqs, query_start_loc, positions)", CALLS,
          _BY + "_defer_stage_slots"),
    Touch(f"{_BT}:BlockTable.get_device_tensor", "(self, num_reqs)", CALLS, _BY + "install_stage_metadata"),
    Touch(f"{_BT}:_COMPUTE_SLOT_MAPPING_KERNEL",
          "(num_reqs, num_tokens, max_num_tokens, query_start_loc, positions, block_table, block_table_stride, "
          "slot_mapping, kv_cache_block_size, total_cp_world_size, total_cp_rank, cp_kv_cache_interleave_size)",
          EXACT, _BY + "_slot_mapping"),
    Touch("torch.ops._C.compute_slot_mapping_kernel_impl",
          "(query_start_loc, positions, block_table, slot_mapping, block_size)",
          EXACT, _BY + "_slot_mapping", platform="cpu"),
    Touch("vllm.v1.attention.backend:CommonAttentionMetadata",
          "(*, query_start_loc, query_start_loc_cpu, seq_lens, seq_lens_cpu_upper_bound, num_reqs, "
          "num_actual_tokens, max_query_len, max_seq_len, block_table_tensor, slot_mapping, causal, is_prefilling)",
          CALLS, _BY + "install_stage_metadata"),
    Touch("vllm.v1.attention.backend:AttentionMetadataBuilder.update_block_table",
          "(self, metadata, blk_table, slot_mapping)", CALLS, _BY + "_retarget"),
    # compared by class name; its metadata copied with block_table and slot_mapping replaced
    Touch("vllm.v1.attention.backends.cpu_attn:CPUAttentionMetadataBuilder", None, NAMES, _BY + "_retarget",
          platform="cpu"),
    Touch("vllm.v1.attention.backends.cpu_attn:CPUAttentionMetadata", "(*, block_table, slot_mapping)", NAMES,
          _BY + "_retarget", platform="cpu"),
    Touch("vllm.forward_context:get_forward_context", "()", CALLS, _BY + "install_stage_metadata"),
    Touch("vllm.v1.utils:CpuGpuBuffer", "(*size, dtype, device, pin_memory)", CALLS,
          "seams.staging.StepStaging"),  # and its cpu, gpu and np tensors
    Touch("vllm.utils.platform_utils:is_pin_memory_available", "()", CALLS, "seams.staging.StepStaging"),
    Touch("vllm.v1.attention.backends.flashinfer:FlashInferMetadataBuilder._get_workspace_buffer", "(self)",
          CALLS, _BY + "share_workspace", platform="cuda"),
    Touch("vllm.v1.attention.backends.flashinfer:FlashInferMetadataBuilder.set_workspace_buffer",
          "(self, workspace_buffer)", CALLS, _BY + "share_workspace", platform="cuda"),
    Touch("vllm.model_executor.layers.attention.attention:Attention.get_attn_backend", "(self)", CALLS,
          "seams.kv_cache.refuse_flashinfer"),
    Touch("vllm.config:set_current_vllm_config", "(vllm_config)", CALLS, _BY + "_stage_groups"),
    Touch("vllm.distributed:get_tp_group", "()", CALLS, "seams.parallel.same_on_every_rank"),
    Touch("vllm.distributed:get_pp_group", "()", CALLS, "seams.parallel.logs_requests"),
    Touch("vllm.distributed:get_tensor_model_parallel_rank", "()", CALLS, "seams.parallel.logs_requests"),
    Touch("vllm.sequence:IntermediateTensors", "(tensors)", CALLS, "seams.parallel.intermediate_tensors"),
), where="vllm.v1.worker.gpu_model_runner")


def install() -> None:
    """Wrap the V1 runner's forward (worker; idempotent, see ``_patch``)."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    patch(GPUModelRunner, "_model_forward", _staged_forward)
    patch(GPUModelRunner, "_prepare_inputs", _marked_prepared)
    patch(GPUModelRunner, "_determine_batch_execution_and_padding", _planned_dispatch)
    patch(GPUModelRunner, "_update_states", _stash_freed)
    patch(GPUModelRunner, "_dummy_run", _profiled_dummy_run)


def install_worker(runtime: V2DropRuntime, attention_layers) -> None:
    """A V2Drop model's worker part (its ``__init__`` calls it): the runner's forward, and in
    ``kv_mode: per_stage`` the stage KV spec of every decoder attention layer."""
    schedule = runtime.schedule
    if schedule.kv_mode == "per_stage" and schedule.layers:
        from vllm_v2drop.seams.kv_cache import install_stage_specs  # one KV-cache group per stage

        install_stage_specs(attention_layers, runtime.stage_of_layer, schedule)
    install()


def _staged_forward(original):
    def _model_forward(self, *args, **kwargs):
        runtime: V2DropRuntime | None = getattr(self.get_model(), "v2drop_runtime", None)
        if runtime is None:
            return original(self, *args, **kwargs)
        groups = self.attn_groups  # filled when the KV cache is set up, after the profile run
        if groups and groups[0] and self.__dict__.get("_v2drop_build_reuse") is not groups[0][0]:
            _reuse_stage_builds(self, runtime)  # from the next step on
        tables = self.input_batch.block_table
        if groups and groups[0] and self.__dict__.get("_v2drop_deferred") is not tables:
            _defer_stage_slots(self, runtime, tables)  # from the next step on
        pending = tables.__dict__.pop("_v2drop_pending", None)
        batch, step = _step_plan(self)
        staging = None
        if step is not None:
            staging = _step_staging(self, runtime)
            staging.begin()
            install_stage_metadata(self, runtime, step)
        elif pending is not None and batch is not None:  # the stage groups see the original view
            for table in pending[0]:
                table.compute_slot_mapping(*pending[1])
        with runtime.active(step, batch, self.device, staging):
            out = original(self, *args, **kwargs)
        audit = self.__dict__.get("_v2drop_audit", False)
        if audit is False and groups and groups[0]:  # decided once the KV cache is set up
            audit = self._v2drop_audit = BlockAudit(self) if audit_enabled() else None
            if audit is not None and not audit.groups:  # kv_mode shared: no stage groups, nothing to audit
                audit = self._v2drop_audit = None
        if audit and batch is not None:
            audit.after_step(self, runtime.schedule, batch)
        return out

    return _model_forward


def _marked_prepared(prepare_inputs):
    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens):
        """vLLM prepares a real step's inputs (dummy runs do not): its plan is made next, before
        vLLM picks the step's CUDA graph (:func:`_planned_dispatch`)."""
        out = prepare_inputs(self, scheduler_output, num_scheduled_tokens)
        self._v2drop_planned = _PREPARED
        return out

    return _prepare_inputs


_PREPARED = object()  # the step's inputs are prepared, its plan not made yet


def _planned_dispatch(determine):
    def _determine_batch_execution_and_padding(self, *args, **kwargs):
        """Plan the step the runner has just prepared, and let vLLM's CUDA graph dispatcher pick a
        full graph only for a step V2Drop plans nothing in.

        A full graph replays attention with the metadata it was captured with, one for every
        layer; a step V2Drop plans gives each stage's layers their own, read when attention runs
        eagerly between the pieces of a piecewise graph. A step without a plan (text only, decodes
        of requests that dropped nothing) is vLLM's own step and keeps vLLM's full graphs.
        """
        runtime = getattr(self.get_model(), "v2drop_runtime", None)
        if runtime is None or self.__dict__.get("_v2drop_planned") is not _PREPARED:
            return determine(self, *args, **kwargs)
        self._v2drop_planned = batch, step = _plan(self, runtime)
        if step is None:
            return determine(self, *args, **kwargs)
        dispatcher = self.cudagraph_dispatcher
        patch(dispatcher, "dispatch", _no_full_graph)
        dispatcher._v2drop_no_full = True
        try:
            return determine(self, *args, **kwargs)
        finally:
            dispatcher._v2drop_no_full = False

    return _determine_batch_execution_and_padding


def _plan(runner, runtime: V2DropRuntime) -> tuple[BatchView | None, StepPlan | None]:
    """The prepared step's batch and its V2Drop plan (None for a step V2Drop plans nothing in)."""
    batch = read_batch(runner)
    return batch, runtime.plan_step(batch) if batch is not None else None


def _no_full_graph(dispatch):
    """vLLM's ``CudagraphDispatcher.dispatch`` (one dispatcher's), without full graphs while the
    dispatcher's ``_v2drop_no_full`` is set: a piecewise graph where vLLM captured one, else eager."""
    from vllm.config import CUDAGraphMode

    def dispatch_(num_tokens, uniform_decode=False, has_lora=False, num_active_loras=0,
                  valid_modes=None, invalid_modes=None):
        owner = dispatch.__self__
        if owner.__dict__.get("_v2drop_no_full"):
            invalid_modes = {CUDAGraphMode.FULL, *(invalid_modes or ())}
            if valid_modes is not None and not set(valid_modes) - invalid_modes:
                valid_modes = {CUDAGraphMode.NONE}  # data parallel: the ranks agreed on FULL
        return dispatch(num_tokens, uniform_decode, has_lora, num_active_loras, valid_modes, invalid_modes)

    return dispatch_


def _step_plan(runner) -> tuple[BatchView | None, StepPlan | None]:
    """The running step's batch and V2Drop plan (made before vLLM picked its CUDA graph); None,
    None in dummy and profile runs. A plan never runs under a full CUDA graph."""
    from vllm.forward_context import get_forward_context

    planned = runner.__dict__.pop("_v2drop_planned", None)
    fc = get_forward_context()
    if not isinstance(fc.attn_metadata, dict) or not fc.attn_metadata or planned is None:
        return None, None
    if planned is _PREPARED:  # vLLM decided the step's execution without its dispatch
        planned = _plan(runner, runner.get_model().v2drop_runtime)
    batch, step = planned
    mode = getattr(fc.cudagraph_runtime_mode, "name", "NONE")
    seen = runner.__dict__.setdefault("_v2drop_graph_modes", set())
    if (step is not None, mode) not in seen:  # once per kind of step and graph mode
        seen.add((step is not None, mode))
        logger.info("V2Drop: the first step %s per-stage attention metadata ran with CUDA graph mode %s",
                    "with" if step is not None else "without", mode)
    if step is not None and mode == "FULL":
        raise RuntimeError("V2Drop: a step with per-stage attention metadata was dispatched to a full CUDA graph, "
                           "which would replay one metadata for every layer; please report this as a bug")
    return batch, step


def _stash_freed(update_states):
    def _update_states(self, scheduler_output):
        runtime = getattr(getattr(self, "model", None), "v2drop_runtime", None)
        if runtime is not None and runtime.stash.held:
            runtime.stash.forget(scheduler_output.finished_req_ids)
            runtime.stash.forget(scheduler_output.preempted_req_ids or ())
        return update_states(self, scheduler_output)

    return _update_states


def _profiled_dummy_run(dummy_run):
    def _dummy_run(self, num_tokens, *args, **kwargs):
        """vLLM's memory-profiling run (``is_profile``) also goes through the drop loop at its size,
        after vLLM's own forward (which compiles the model): the peak vLLM sizes the KV cache from
        then covers a drop step's (:meth:`V2DropRuntime.profiling`)."""
        out = dummy_run(self, num_tokens, *args, **kwargs)
        runtime = getattr(self.get_model(), "v2drop_runtime", None)
        if kwargs.get("is_profile") and runtime is not None and runtime.schedule.layers:
            with runtime.profiling(num_tokens, self.device):
                out = dummy_run(self, num_tokens, *args, **kwargs)
        return out

    return _dummy_run


def _step_staging(runner, runtime: V2DropRuntime) -> StepStaging:
    """The runner's staging buffer for V2Drop's per-step host arrays, sized once for the largest
    step it can be given (:mod:`vllm_v2drop.seams.staging`)."""
    staging = runner.__dict__.get("_v2drop_staging")
    if staging is None:
        held = runner.max_model_len if runtime.schedule.chunked_items else 0  # rows of items split across steps
        size = worst_case_bytes(runner.max_num_tokens, runner.max_num_reqs, len(runtime.schedule.layers), held)
        staging = runner._v2drop_staging = StepStaging(runner.device, size)
    return staging


def _builder_key(builder) -> tuple:
    """What a built attention metadata depends on besides the step's arrays, block table and slots."""
    return (type(builder), *(getattr(builder, a, None) for a in (
        "block_size", "num_heads", "num_kv_heads", "head_dim", "window_size", "isa", "dtype", "kv_cache_dtype")))


def _stage_only(runtime: V2DropRuntime):
    """Whether a group's layers (names) all lie in stages >= 1: ``kv_mode: per_stage``'s stage-only
    groups, whose metadata and slots V2Drop replaces on every step it plans."""
    staged = set().union(*(runtime.stage_layer_names(s) for s in range(1, len(runtime.schedule.layers) + 1)))
    return lambda names: bool(names) and set(names) <= staged


def _reuse_stage_builds(runner, runtime: V2DropRuntime) -> None:
    """Spare vLLM's own per-step metadata build for the KV-cache groups that hold only layers of
    stages >= 1 (``kv_mode: per_stage``: one group per stage layer here).

    vLLM builds attention metadata for every KV-cache group each step (the CPU backend's build
    computes its O(batch) scheduler metadata; it cannot ``update_block_table``). V2Drop replaces
    those groups' metadata whenever a step compacts anything (:func:`install_stage_metadata`),
    and otherwise they see the original view, the same metadata as the step's first group with
    their own block table and slots: what :func:`_retarget` makes of the step's first build, as
    vLLM itself does across groups whose builder can ``update_block_table``. Groups with another
    builder or builder settings than that first build are built as before.
    """
    runner._v2drop_build_reuse = runner.attn_groups[0][0]  # installed for these groups
    last: dict = {}  # the step's first build: (its common metadata, the metadata, its builder's key)
    stage_only = _stage_only(runtime)
    for attn_groups in runner.attn_groups:
        for group in attn_groups:
            own = stage_only(group.layer_names)
            key = _builder_key(group.get_metadata_builder())  # once: a group keeps its builder
            patch(group, "build_metadata",
                  lambda build, group=group, own=own, key=key: functools.partial(_build_or_reuse, group, build, own, key, last))


def _defer_stage_slots(runner, runtime: V2DropRuntime, tables) -> None:
    """Spare vLLM's own slot mappings of the KV-cache groups that hold only layers of stages >= 1
    (``kv_mode: per_stage``) until the forward knows whether V2Drop replaces them.

    vLLM computes every group's slot mapping in ``_prepare_inputs`` (one kernel call per group and
    step). A step V2Drop plans gives every stage layer its own slots
    (:func:`install_stage_metadata`), so those of the stage-only groups would be thrown away; in a
    step it does not plan (no request has dropped rows yet) they are computed in ``_model_forward``,
    before the forward, into the same persistent buffers the step's metadata already points at.
    Not with speculative decoding, micro-batching or a KV connector (they read slots elsewhere).
    """
    runner._v2drop_deferred = tables  # installed for this input batch
    if (runner.speculative_config is not None or runner.parallel_config.use_ubatching
            or runner.vllm_config.kv_transfer_config is not None):
        return
    stage_only = _stage_only(runtime)
    own = [stage_only(g.layer_names) for g in runner.kv_cache_config.kv_cache_groups]
    if not any(own) or len(own) != len(tables.block_tables):
        return
    deferred = [t for t, o in zip(tables.block_tables, own) if o]
    computed = [t for t, o in zip(tables.block_tables, own) if not o]

    def deferring(original):
        def compute_slot_mapping(num_reqs: int, query_start_loc: torch.Tensor, positions: torch.Tensor) -> None:
            for table in computed:
                table.compute_slot_mapping(num_reqs, query_start_loc, positions)
            tables._v2drop_pending = (deferred, (num_reqs, query_start_loc, positions))

        return compute_slot_mapping

    patch(tables, "compute_slot_mapping", deferring)


def _build_or_reuse(group, build, own: bool, key: tuple, last: dict, common, ubid: int = 0, **kwargs):
    ref = last.get("ref")
    if (own and ref is not None and not kwargs and ubid == 0 and ref[0].seq_lens is common.seq_lens
            and ref[0].query_start_loc is common.query_start_loc and ref[0].num_reqs == common.num_reqs
            and ref[0].num_actual_tokens == common.num_actual_tokens
            and getattr(common, "encoder_seq_lens", None) is None and ref[2] == key):
        out = _retarget(group, ref[1], common.block_table_tensor, common.slot_mapping)
        if out is not None:
            return out
    out = build(common, ubid, **kwargs)
    if not own and ubid == 0 and not kwargs and (ref is None or ref[0].seq_lens is not common.seq_lens):
        last["ref"] = (common, out, key)
    return out


def read_batch(runner) -> BatchView | None:
    """The step the runner has prepared the inputs of, or None when it holds no request."""
    batch = runner.input_batch
    n = batch.num_reqs
    if n == 0:
        return None
    query_start_loc = runner.query_start_loc.np[: n + 1]

    def describe(req_id: str):
        state = runner.requests[req_id]
        return request_view(req_id, state.num_prompt_tokens, state.mm_features, state.sampling_params)

    ids = batch.req_ids  # the batch's own list, not copied (the planner compares it with its copy)
    return BatchView(
        req_ids=ids if len(ids) == n else ids[:n],
        num_computed=batch.num_computed_tokens_cpu[:n],  # views: the planner copies them once
        num_scheduled=query_start_loc[1:] - query_start_loc[:-1],
        describe=describe,
    )


def _stage_groups(runner, runtime: V2DropRuntime, stage: int) -> list[tuple[int, object]]:
    """Per stage, copies of the runner's attention groups restricted to the stage's layers.

    Each copy has its own metadata builder, so builders that keep persistent
    buffers (CUDA graphs) never overwrite the metadata of another stage.
    """
    cache = runner.__dict__.setdefault("_v2drop_stage_groups", {})
    if stage not in cache:
        from vllm.config import set_current_vllm_config

        names = set(runtime.stage_layer_names(stage))
        groups = []
        for gid, attn_groups in enumerate(runner.attn_groups):
            for group in attn_groups:
                mine = [n for n in group.layer_names if n in names]
                if not mine:
                    continue
                g = copy.copy(group)
                g.__dict__.pop("build_metadata", None)  # the class's own build (see _reuse_stage_builds)
                g.layer_names, g.metadata_builders = mine, []
                with set_current_vllm_config(runner.vllm_config):  # as vLLM builds its own (flash_attn_version)
                    g.create_metadata_builders(runner.vllm_config, runner.device, group.kernel_block_size)
                share_workspace(group.metadata_builders, g.metadata_builders)
                groups.append((gid, g))
        cache[stage] = groups
    return cache[stage]


def share_workspace(sources, builders) -> None:
    """Each stage builder uses the attention workspace of the builder it was copied from.

    FlashInfer's builder allocates a scratch workspace of its own (at least 394 MiB) at its first
    build, which for a stage builder comes after the KV cache was sized: one more per stage would
    run the GPU out of memory. The workspace is scratch for the attention kernels only (each
    wrapper keeps its plan in buffers of its own), and the stages' attention runs one after
    another on one stream, so one serves them all, as vLLM's own runner shares one across
    KV-cache groups (``set_workspace_buffer``). Builders without a workspace are left alone.
    """
    for source, builder in zip(sources, builders):
        get = getattr(source, "_get_workspace_buffer", None)
        give = getattr(builder, "set_workspace_buffer", None)
        if get is not None and give is not None:
            give(get())


def _slot_mapping(table, qsl: torch.Tensor, kv_pos: torch.Tensor, length: int) -> torch.Tensor:
    """Slots of a stage's rows from the group's device block table, with the runner's own kernel:
    vLLM's ``ComputeSlotMappingKernel`` (Triton on a GPU). On a CPU device its C++ fallback is
    called directly: one pass over the rows, where the kernel launcher's dispatch alone costs more
    than the work of a decode step. ``-1`` pads to ``length``."""
    bt = table.block_table.gpu
    num_rows = kv_pos.shape[0]
    if bt.device.type == "cpu" and table.dcp_world_size == 1:
        out = torch.empty(length, dtype=torch.int64) if length == num_rows else torch.full((length,), -1, dtype=torch.int64)
        torch.ops._C.compute_slot_mapping_kernel_impl(qsl, kv_pos, bt, out, table.block_size)
        return out
    from vllm.v1.worker.block_table import _COMPUTE_SLOT_MAPPING_KERNEL

    out = torch.full((length,), -1, dtype=torch.int64, device=bt.device)
    _COMPUTE_SLOT_MAPPING_KERNEL(
        qsl.shape[0] - 1, num_rows, length, qsl, kv_pos, bt, bt.stride(0), out,
        table.block_size, table.dcp_world_size, table.dcp_rank, table.cp_kv_cache_interleave_size,
    )
    return out


def _retarget(group, built, block_table: torch.Tensor, slots: torch.Tensor):
    """``built`` (another group's metadata for the same stage view) with this group's block table
    and slots, as vLLM does across hybrid groups (``update_block_table``); None where the backend
    cannot. vLLM 0.32's CPU attention metadata carries both only as pass-through fields."""
    builder = group.get_metadata_builder()
    if builder.supports_update_block_table:
        return builder.update_block_table(built, group.map_to_kernel_block_table(block_table), slots)
    if type(builder).__name__ == "CPUAttentionMetadataBuilder" and group.kernel_block_size is None:
        out = object.__new__(type(built))  # a shallow copy (a dataclass with a __dict__), without copy's protocol
        out.__dict__.update(built.__dict__)
        out.block_table, out.slot_mapping = block_table, slots
        return out
    return None


def install_stage_metadata(runner, runtime: V2DropRuntime, step: StepPlan) -> None:
    """Give the layers of each stage s >= 1 metadata for the rows present at that stage.

    Per stage, the host arrays (query offsets, sequence lengths, compact KV positions) are
    computed once for all its KV-cache groups, and the slot mappings on the device from each
    group's block table. A stage whose view equals the stage before it (no request lost rows
    there) reuses that stage's metadata for the same group; the other groups of a stage reuse its
    first group's build with their own block table. A pure decode step copies only the stages'
    sequence lengths (one copy for all stages): its query offsets are the runner's own and every
    request's one row sits at ``seq_len - 1``.
    """
    from vllm.forward_context import get_forward_context
    from vllm.v1.attention.backend import CommonAttentionMetadata

    fc = get_forward_context()
    metadata, slot_mapping = dict(fc.attn_metadata), dict(fc.slot_mapping or {})
    n = step.query_lens.shape[1]
    batch = runner.input_batch
    is_prefilling = torch.from_numpy(batch.num_computed_tokens_cpu[:n] < batch.num_prompt_tokens[:n])
    padded_len = len(next(iter(slot_mapping.values()), ()))  # one length for every group (vLLM's _get_slot_mappings)
    if step.runs_drop_loop:  # the drop loop runs exactly the step's rows, without padding
        for name in runtime.stage_layer_names(0):
            if name in slot_mapping:
                slot_mapping[name] = slot_mapping[name][: step.num_rows(0)]
    staging = runner._v2drop_staging  # begun by the step (_model_forward)
    decode = step.decode
    # first every stage's host arrays into the step's staging buffer, then one copy to the device
    staged: dict[int, tuple] = {}
    host = staging.aliased  # the device is the host: a decode step hands attention the plan's own arrays
    if decode:  # one row per request in every stage, at seq_len - 1 (the plan's kv_starts)
        qsl_cpu, qsl_dev = runner.query_start_loc.cpu[: n + 1], runner.query_start_loc.gpu[: n + 1]
        if not host:
            seq_all = staging.put(step.seq_lens, torch.int32)  # [S+1, n], one array for every stage
    else:
        for stage in range(1, step.num_stages + 1):
            staged[stage] = staged[stage - 1] if stage > 1 and step.same_view_as_before(stage) else (
                staging.put(step.seq_lens[stage], torch.int32),
                staging.put(step.query_start_loc(stage), torch.int32),
                staging.put(step.kv_positions(stage), torch.int64))
    staging.flush()
    if decode and not host:
        seq_all_cpu, seq_all_dev = staging.on_host(seq_all), staging.on_device(seq_all)
    previous: dict[int, tuple] = {}
    for stage in range(1, step.num_stages + 1):
        groups = _stage_groups(runner, runtime, stage)
        if step.same_view_as_before(stage) and all(gid in previous for gid, _ in groups):
            for gid, group in groups:
                built, slots_t = previous[gid]
                for name in group.layer_names:
                    metadata[name], slot_mapping[name] = built, slots_t
            continue
        if decode:
            # each stage its own array: rows of one [S+1, n] tensor given to vLLM 0.32's CPU
            # attention as seq_lens made a batched decode differ from the same requests alone
            if host:
                seq_cpu = seq_dev = torch.from_numpy(step.seq_lens[stage].astype(np.int32))
                kv_pos = torch.from_numpy(step.kv_starts[stage])
            else:
                seq_cpu, seq_dev = seq_all_cpu[stage], seq_all_dev[stage].clone()
                kv_pos = seq_dev.to(torch.int64) - 1
            max_query_len, max_seq_len = 1, int(step.seq_lens[stage].max())
        else:
            seq, qsl, pos = staged[stage]
            seq_cpu, seq_dev = staging.on_host(seq), staging.on_device(seq)
            qsl_cpu, qsl_dev = staging.on_host(qsl), staging.on_device(qsl)
            kv_pos = staging.on_device(pos)
            max_query_len, max_seq_len = int(step.query_lens[stage].max()), int(step.seq_lens[stage].max())
        num_rows = int(kv_pos.shape[0])
        length = num_rows if step.runs_drop_loop else max(num_rows, padded_len)
        current, first = {}, None
        for gid, group in groups:
            table = batch.block_table[gid]
            slots_t = _slot_mapping(table, qsl_dev, kv_pos, length)
            block_table = table.get_device_tensor(n)
            built = None if first is None else _retarget(group, first, block_table, slots_t)
            if built is None:
                built = first = group.build_metadata(CommonAttentionMetadata(
                    query_start_loc=qsl_dev,
                    query_start_loc_cpu=qsl_cpu,
                    seq_lens=seq_dev,
                    seq_lens_cpu_upper_bound=seq_cpu,
                    num_reqs=n,
                    num_actual_tokens=num_rows,
                    max_query_len=max_query_len,
                    max_seq_len=max_seq_len,
                    block_table_tensor=block_table,
                    slot_mapping=slots_t,
                    causal=True,
                    is_prefilling=is_prefilling,
                ))
            current[gid] = (built, slots_t)
            for name in group.layer_names:
                metadata[name], slot_mapping[name] = built, slots_t
        previous = current
    fc.attn_metadata, fc.slot_mapping = metadata, slot_mapping
