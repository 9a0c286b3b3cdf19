"""Per-stage KV cache (``kv_mode: per_stage``): dropped rows get no KV blocks at all.

``kv_mode: shared`` (step 1) keeps one KV-cache group: later stages write their
kept rows compactly into blocks sized for the full request, which saves compute
but no memory. ``kv_mode: per_stage`` gives every stage its own KV-cache group(s)
and block tables, and allocates per stage only the blocks of the rows present:

* worker: :func:`vllm_v2drop.seams.kv_cache.install_stage_specs` makes each decoder attention
  layer report a :class:`~vllm_v2drop.seams.kv_cache.V2DropStageSpec` (full attention + its
  stage), so vLLM's grouping splits the stages into separate groups; the runner seam
  (:mod:`vllm_v2drop.seams.runner`) gives every stage-``s`` layer metadata built from
  its own group's block table with compact KV positions;
* engine core / scheduler: :class:`~vllm_v2drop.seams.kv_cache.V2DropStageManager`
  sizes each request's block list per group in compact rows, with the plan
  built from the scheduler's ``Request`` by the worker's own planning code.

vLLM's pool accounting (``block_pool``, ``kv_cache_usage`` metric, admission and
preemption) sees the smaller block counts directly, so more requests fit.
"""

from __future__ import annotations

import logging

from vllm_v2drop.core.kv_layout import group_layout, padding_waste, stage_layer_counts

logger = logging.getLogger("vllm.v2drop")

__all__ = [
    "check_per_stage_supported",
    "describe_layout",
    "group_layout",
    "padding_waste",
    "stage_layer_counts",
]


def describe_layout(schedule, reference_rows: int | None = None) -> str:
    """One log line: the KV-cache groups vLLM will make per stage and their padding cost."""
    counts = stage_layer_counts(schedule)
    layout = group_layout(counts)
    size = max(g for _, g in layout)
    per_stage = [[g for s, g in layout if s == stage] for stage in range(len(counts))]
    waste = padding_waste(counts)
    text = (
        f"V2Drop kv_mode per_stage: {len(layout)} KV-cache groups of up to {size} layer(s) "
        f"(layers per stage {counts}; groups per stage {per_stage})"
    )
    if waste > 0:
        text += (
            f"; stage layer counts that are not multiples of {size} leave padding pages: up to "
            f"{waste:.1%} of a request's KV blocks unused (choose stage boundaries whose layer "
            "counts are multiples of the smallest stage to avoid it)"
        )
    return text


def check_per_stage_supported(vllm_config, schedule, platform_problem: str | None = None) -> list[str]:
    """Raise :class:`V2DropConfigError` where this engine cannot give stages their own KV groups.

    ``platform_problem``: why the platform has no hybrid KV cache manager (None: it has one).
    Returns what it forces (for the hook's "V2Drop forces" log line).
    """
    from vllm_v2drop.config import V2DropConfigError

    problems, forced = [], []
    scheduler_config = vllm_config.scheduler_config
    if scheduler_config.disable_hybrid_kv_cache_manager:
        problems.append(
            "--disable-hybrid-kv-cache-manager is set: per-stage KV groups are vLLM's hybrid KV cache manager"
        )
    if platform_problem is not None:
        problems.append(platform_problem)
    model_config = vllm_config.model_config
    if getattr(model_config, "attention_chunk_size", None) is not None:
        problems.append("the model uses chunked local attention (vLLM turns the hybrid KV cache manager off)")
    if getattr(vllm_config.attention_config, "hisparse_config", None) is not None:
        problems.append("HiSparse attention")
    try:
        v2_runner = bool(vllm_config.use_v2_model_runner)
    except Exception:  # noqa: BLE001
        v2_runner = False
    if v2_runner:
        problems.append(
            "Model Runner V2 is selected, and only the V1 runner adapter gives stage layers their own "
            "block tables (set VLLM_USE_V2_MODEL_RUNNER=0)"
        )
    backend = getattr(vllm_config.attention_config, "backend", None)
    if backend is not None and getattr(backend, "name", str(backend)) in FLASHINFER_BACKENDS:
        raise V2DropConfigError(flashinfer_message(backend.name))
    if problems:
        raise V2DropConfigError(
            "kv_mode: per_stage cannot run on this engine: " + "; ".join(problems)
            + ". Use kv_mode: shared (one KV cache group: same tokens, no memory saving)."
        )
    if scheduler_config.disable_hybrid_kv_cache_manager is None:
        scheduler_config.disable_hybrid_kv_cache_manager = False
        forced.append("hybrid KV cache manager on (one KV cache group per stage)")
    return forced


#: Attention backends whose metadata builders each own a FlashInfer workspace and have no
#: ``update_block_table``.
FLASHINFER_BACKENDS = frozenset({"FLASHINFER", "TRITON_FLASHINFER"})


def flashinfer_message(backend: str) -> str:
    return (
        f"kv_mode: per_stage cannot run on the {backend} attention backend: it cannot retarget one "
        "stage's attention metadata to another KV-cache group (no update_block_table), so every stage "
        "group builds its own metadata each step, and each group's builder allocates its own FlashInfer "
        "workspace (at least 394 MiB) after the KV cache was sized: the first steps that use them run out "
        "of GPU memory. Serve with --attention-backend FLASH_ATTN, or use kv_mode: shared."
    )
