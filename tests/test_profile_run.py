"""vLLM's memory-profiling run goes through the drop loop at the largest step the engine schedules.

vLLM sizes the KV cache from the peak memory of that run; the drop loop's eager layers, scores and
row gathers must be part of it. On this CPU vLLM profiles only when it compiles the model (its
warm-up run is the profiling run), so the engine here runs with vLLM's default compilation. The
peak itself can only be measured on a GPU (benchmarks/gpu_run.py); what runs here is that the
profiling forward is a drop step with every stage at the expected row count.
"""

from __future__ import annotations

import os

import pytest

from conftest import greedy, make_image, mm_request, shutdown_llm, make_llm
from vllm_v2drop.dev.kv_probe import profiled_rows

os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # the probe runs in the worker

MAX_TOKENS = 1024


@pytest.fixture(scope="module")
def compiled_llm(tiny_models):
    llm = make_llm(tiny_models["qwen2-vl"], model_impl="v2drop", enforce_eager=False,
                   max_num_batched_tokens=MAX_TOKENS, max_model_len=MAX_TOKENS)
    yield llm
    shutdown_llm(llm)


def test_profiling_run_is_a_drop_step_at_the_largest_step(compiled_llm, tiny_models):
    info = compiled_llm.collective_rpc(profiled_rows)[0]
    assert info["max_num_tokens"] == MAX_TOKENS and info["num_stages"] >= 1
    # every row present at every stage: the worst case (a request may keep all its rows)
    assert info["profiled"] == [MAX_TOKENS] * (info["num_stages"] + 1)
    # and the engine serves afterwards: an image request drops rows and finishes
    out = compiled_llm.generate([mm_request("qwen2-vl", tiny_models["qwen2-vl"], images=[make_image("large")])],
                                greedy(8))
    assert len(out[0].outputs[0].token_ids) == 8
