"""Plain-transformers reference implementation of V2Drop, the parity oracle for the vLLM integration."""

from vllm_v2drop.reference.v2drop_ref import (
    METRICS,
    RefRequest,
    RefResult,
    RefSchedule,
    V2DropReference,
    find_vision_runs,
    keep_count,
    random_score,
)

__all__ = [
    "METRICS",
    "RefRequest",
    "RefResult",
    "RefSchedule",
    "V2DropReference",
    "find_vision_runs",
    "keep_count",
    "random_score",
]
