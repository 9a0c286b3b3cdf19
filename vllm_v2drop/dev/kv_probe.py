"""Read the paged KV cache back from a running engine's workers (tests, debugging, benchmarks).

Use through ``LLM.collective_rpc`` (needs ``VLLM_ALLOW_INSECURE_SERIALIZATION=1``)::

    llm.collective_rpc(zero_kv_cache)
    llm.generate(one_request, SamplingParams(max_tokens=1))
    rows = llm.collective_rpc(written_kv_rows)[0]          # {layer_name: rows written}

Counts are independent of the backend's block layout (the CPU kernels interleave tokens
inside a block): every written row stores ``num_kv_heads * (head_size + head_size_v)``
key and value elements, non-zero almost surely for real activations, so rows = non-zero
elements / that. With ``kv_mode: per_stage`` every KV-cache group's layers alias the same
memory (vLLM's hybrid allocator hands each block id to one group at a time), so a whole
tensor counts every group's rows: there, read one running request's own blocks with
:func:`request_kv_rows`::

    engine.add_request("r", prompt, SamplingParams(max_tokens=4)); engine.step()
    rows = llm.collective_rpc(request_kv_rows, args=("r",))[0]   # {layer: rows}
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

__all__ = ["kv_groups", "request_block_ids", "request_kv_rows", "request_kv_state", "written_kv_rows",
           "zero_kv_cache"]


def _layer_caches(worker) -> Iterator[tuple[int, object, str, torch.Tensor]]:
    """``(group id, group, layer name, KV tensor)`` of every decoder attention layer."""
    runner = worker.model_runner
    context = runner.compilation_config.static_forward_context
    for gid, group in enumerate(runner.kv_cache_config.kv_cache_groups):
        for name in group.layer_names:
            kv = getattr(context.get(name), "kv_cache", None)
            if isinstance(kv, torch.Tensor):
                yield gid, group, name, kv


def _elements_per_row(spec) -> int:
    return spec.num_kv_heads * (spec.head_size + getattr(spec, "head_size_v", spec.head_size))


def zero_kv_cache(worker) -> None:
    """Zero every decoder layer's KV cache."""
    for _, _, _, kv in _layer_caches(worker):
        kv.zero_()


def written_kv_rows(worker) -> dict[str, int]:
    """Per decoder layer, how many token rows hold data (written since the last zeroing)."""
    return {
        name: int(torch.count_nonzero(kv)) // _elements_per_row(group.kv_cache_spec)
        for _, group, name, kv in _layer_caches(worker)
    }


def kv_groups(worker) -> list[dict]:
    """Per KV-cache group: its layers, block size, stage (per_stage mode) and the pool size."""
    config = worker.model_runner.kv_cache_config
    return [
        {
            "layers": list(g.layer_names),
            "block_size": g.kv_cache_spec.block_size,
            "stage": getattr(g.kv_cache_spec, "stage", None),
            "num_blocks": config.num_blocks,
        }
        for g in config.kv_cache_groups
    ]


def _row_of(runner, req_id_prefix: str) -> int:
    batch = runner.input_batch
    for i, rid in enumerate(batch.req_ids[: batch.num_reqs]):
        if rid == req_id_prefix or rid.startswith(req_id_prefix + "-"):
            return i
    raise KeyError(f"request {req_id_prefix!r} is not in the running batch")


def request_block_ids(worker, req_id: str) -> list[list[int]]:
    """The block ids ``req_id`` (or the engine's ``req_id-<suffix>``) holds in each KV-cache group."""
    runner = worker.model_runner
    row = _row_of(runner, req_id)
    out = []
    for table in runner.input_batch.block_table.block_tables:
        n = int(table.num_blocks_per_row[row])
        out.append(table.block_table.np[row, :n].tolist())
    return out


def request_kv_rows(worker, req_id: str) -> dict[str, int]:
    """Per decoder layer: the non-zero KV rows in the blocks ``req_id`` holds in the layer's group."""
    blocks = [torch.as_tensor(ids, dtype=torch.long) for ids in request_block_ids(worker, req_id)]
    return {
        name: int(torch.count_nonzero(kv[blocks[gid]])) // _elements_per_row(group.kv_cache_spec)
        if len(blocks[gid]) else 0
        for gid, group, name, kv in _layer_caches(worker)
    }


def scheduled_request_kv_rows(worker, req_id: str) -> dict[str, int] | None:
    """:func:`request_kv_rows`, or None while ``req_id`` is not in the running batch (the engine's
    last step did not schedule it: its token budget went to other requests)."""
    try:
        _row_of(worker.model_runner, req_id)
    except KeyError:
        return None
    return request_kv_rows(worker, req_id)


def request_kv_state(worker, req_id: str) -> tuple[dict[str, int], list[list[int]]]:
    """:func:`request_kv_rows` and :func:`request_block_ids` of one moment (one call between two
    engine steps), so that rows written and blocks held can be compared exactly."""
    return request_kv_rows(worker, req_id), request_block_ids(worker, req_id)


def profiled_rows(worker) -> dict:
    """Rows per stage of the drop step vLLM's memory-profiling run went through (None: it did not),
    the stage count, and the largest step the engine schedules."""
    runtime = worker.model_runner.get_model().v2drop_runtime
    return {"profiled": runtime.profiled, "num_stages": len(runtime.schedule.layers),
            "max_num_tokens": worker.model_runner.max_num_tokens, "layers": list(runtime.schedule.layers),
            "segment_backend": runtime.segments.backend,
            "compiled_segments": sorted([first, last] for _, first, last, _ in runtime.segments._compiled)}
