"""Read a running request's KV rows per layer from the worker (tests, debugging).

With ``kv_mode: per_stage`` every KV-cache group's layers alias the same memory
(vLLM's hybrid allocator hands each block id to one group at a time), so
counting non-zero rows over a layer's whole cache tensor (``tools/kv_probe.py``)
counts every group's rows. These functions look only at the blocks the request
holds in the layer's own group, read from the runner's block tables, so they
work in both KV modes. Use through ``LLM.collective_rpc`` (needs
``VLLM_ALLOW_INSECURE_SERIALIZATION=1``) while the request is still running::

    llm.collective_rpc(zero_kv_cache)                       # tools/kv_probe.py
    engine.add_request("r", prompt, SamplingParams(max_tokens=4)); engine.step()
    rows = llm.collective_rpc(request_kv_rows, args=("r",))[0]   # {layer: rows}
"""

from __future__ import annotations

import torch

__all__ = ["kv_groups", "request_block_ids", "request_kv_rows"]


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
    """Per decoder layer: the non-zero KV rows in the blocks ``req_id`` holds in the layer's group.

    Counts rows written since the KV cache was last zeroed (``kv_probe.zero_kv_cache``).
    """
    runner = worker.model_runner
    context = runner.compilation_config.static_forward_context
    blocks = request_block_ids(worker, req_id)
    out = {}
    for gid, group in enumerate(runner.kv_cache_config.kv_cache_groups):
        spec = group.kv_cache_spec
        per_row = spec.num_kv_heads * (spec.head_size + getattr(spec, "head_size_v", spec.head_size))
        ids = torch.as_tensor(blocks[gid], dtype=torch.long)
        for name in group.layer_names:
            kv = getattr(context.get(name), "kv_cache", None)
            if not isinstance(kv, torch.Tensor):
                continue
            out[name] = int(torch.count_nonzero(kv[ids])) // per_row if len(ids) else 0
    return out
