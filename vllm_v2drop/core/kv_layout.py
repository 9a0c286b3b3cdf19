"""How vLLM 0.32 splits V2Drop's stages into KV-cache groups, and what padding that costs.

Pure Python (no vLLM import): used by the config hook's start-up log line, the frontend's
metrics and tests. See :mod:`vllm_v2drop.seams.kv_cache` (the KV spec) for why the groups look
like this.
"""

from __future__ import annotations

import numpy as np

__all__ = ["group_layout", "padding_waste", "stage_layer_counts"]


def stage_layer_counts(schedule) -> list[int]:
    """Decoder layers per stage ``0 .. S``."""
    from vllm_v2drop.core.counts import stage_of_layer

    stages = stage_of_layer(schedule.layers, schedule.num_layers)
    return np.bincount(stages, minlength=len(schedule.layers) + 1).astype(int).tolist()


def group_layout(stage_layer_counts: list[int]) -> list[tuple[int, int]]:
    """``(stage, layers)`` of every KV-cache group vLLM 0.32 makes for these stage sizes.

    Mirrors ``_get_kv_cache_groups_uniform_page_size`` (kv_cache_utils.py): group
    size ``G`` = smallest stage, or the largest when it is < 1.5 x the smallest;
    a stage of ``c`` layers becomes ``ceil(c / G)`` groups (``layers[i::n]``).
    """
    counts = [c for c in stage_layer_counts if c > 0]
    lo, hi = min(counts), max(counts)
    size = hi if hi < lo * 1.5 else lo
    out = []
    for stage, c in enumerate(stage_layer_counts):
        if c <= 0:
            continue
        n = -(-c // size)
        out.extend((stage, len(range(i, c, n))) for i in range(n))
    return out


def padding_waste(stage_layer_counts: list[int], blocks_per_stage: list[int] | None = None) -> float:
    """Share of the KV memory a request holds that sits in padding pages.

    Every block is ``G`` layer pages (``G`` = the largest group); a group of ``g``
    layers leaves ``G - g`` of them unused. ``blocks_per_stage`` weights the
    stages by how many blocks a request takes in each (default: equal).
    """
    layout = group_layout(stage_layer_counts)
    size = max(g for _, g in layout)
    weights = blocks_per_stage or [1] * len(stage_layer_counts)
    total = sum(weights[s] * size for s, _ in layout)
    return sum(weights[s] * (size - g) for s, g in layout) / total if total else 0.0


