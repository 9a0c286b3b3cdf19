"""vLLM's parallel state and pipeline hand-over, as the worker's drop loop needs them (worker).

A leaf of the seams package (no V2Drop import), so the drop loop (:mod:`vllm_v2drop.worker.runtime`)
reaches vLLM only through here. Declared in the model-runner seam (:mod:`vllm_v2drop.seams.runner`).
Without vLLM's distributed state (unit tests, vLLM absent) it answers as a single rank.
"""

from __future__ import annotations

import torch

__all__ = ["intermediate_tensors", "logs_requests", "same_on_every_rank"]


def same_on_every_rank(idx_kept: torch.Tensor) -> torch.Tensor:
    """The kept rows of tensor-parallel rank 0, on every rank of its group (in place).

    Every rank scores the same replicated residual stream, so the ranks agree whenever
    their all-reduces are bitwise identical across ranks and their norm kernels run the
    same reduction order. Neither is promised by every backend (quantised all-reduces,
    per-rank thread counts on CPU), and a single flipped near-tie would make the ranks
    cache and all-reduce different rows, silently. So rank 0 decides: one broadcast of
    ``num_kept`` indices per stage of a step that drops (the size is the host plan's,
    known on every rank), nothing on steps without drops or with one rank.
    """
    try:
        from vllm.distributed import get_tp_group

        tp = get_tp_group()
    except (AssertionError, ImportError):  # no vLLM distributed state (unit tests)
        return idx_kept
    if tp.world_size > 1:
        tp.broadcast(idx_kept, src=0)
    return idx_kept


def logs_requests() -> bool:
    """Whether this worker writes the per-request log lines: the first rank of its engine
    (tensor- and pipeline-parallel rank 0), so that each line appears once per engine."""
    try:
        from vllm.distributed import get_pp_group, get_tensor_model_parallel_rank

        return get_tensor_model_parallel_rank() == 0 and get_pp_group().is_first_rank
    except (AssertionError, ImportError):  # no vLLM distributed state (unit tests)
        return True


def intermediate_tensors(tensors: dict):
    """vLLM's ``IntermediateTensors`` (what a pipeline rank hands the next) of ``tensors``."""
    from vllm.sequence import IntermediateTensors

    return IntermediateTensors(tensors)
