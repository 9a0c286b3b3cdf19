"""Read the paged KV cache back from a running engine's workers (tests, debugging).

Use through ``LLM.collective_rpc`` (needs ``VLLM_ALLOW_INSECURE_SERIALIZATION=1``)::

    llm.collective_rpc(zero_kv_cache)
    llm.generate(one_request, SamplingParams(max_tokens=1))
    rows = llm.collective_rpc(written_kv_rows)[0]   # {layer_name: rows written}
"""

from __future__ import annotations

import torch


def _decoder_kv_caches(worker) -> dict[str, torch.Tensor]:
    runner = worker.model_runner
    context = runner.compilation_config.static_forward_context
    out = {}
    for group in runner.kv_cache_config.kv_cache_groups:
        for name in group.layer_names:
            kv = getattr(context.get(name), "kv_cache", None)
            if isinstance(kv, torch.Tensor):
                out[name] = kv
    return out


def zero_kv_cache(worker) -> None:
    """Zero every decoder layer's KV cache."""
    for kv in _decoder_kv_caches(worker).values():
        kv.zero_()


def kv_cache_shapes(worker) -> dict[str, tuple[int, ...]]:
    return {name: tuple(kv.shape) for name, kv in _decoder_kv_caches(worker).items()}


def written_kv_rows(worker) -> dict[str, int]:
    """Per decoder layer, how many token rows hold data (written since the last zeroing).

    Independent of the backend's block layout (the CPU kernels interleave tokens
    inside a block): every written row stores ``2 * num_kv_heads * head_size``
    key and value elements, which are non-zero almost surely for real activations,
    so the count is the number of non-zero elements divided by that.
    """
    out = {}
    for group in worker.model_runner.kv_cache_config.kv_cache_groups:
        spec = group.kv_cache_spec
        per_row = spec.num_kv_heads * (spec.head_size + getattr(spec, "head_size_v", spec.head_size))
        for name, kv in _decoder_kv_caches(worker).items():
            if name in group.layer_names:
                out[name] = int(torch.count_nonzero(kv)) // per_row
    return out
