"""V2Drop under engine pressure and with the other metrics (real CPU engine, tiny models).

* Preemption and recompute (a KV pool too small for the batch), chunked prefill of
  long text around an image, aborting a request mid-decode, and an image with fewer
  vision rows than the schedule has stages: each request gets the tokens it gets alone.
* ``l1``, ``cosine`` and ``random`` give the transformers reference's kept rows and tokens;
  ``random`` is seeded (the same request keeps the same rows again).
* With vLLM's default compilation: the reference's tokens, and vLLM's memory-profiling run goes
  through the drop loop at the largest step.
"""

from __future__ import annotations

import os

import pytest
from conftest import greedy, llm_engine, make_image, make_video, mm_request
from test_engine import generate_each, read_trace, ref_request, ref_schedule, tokens, trace_for

from vllm_v2drop.dev.reference import V2DropReference

pytestmark = pytest.mark.slow
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # the probes run in the worker

# Seven stages: a 56x56 image (4 rows on the tiny Qwen2-VL) has fewer rows than stages.
MANY_STAGES = {"layers": [1, 2, 3, 4, 5, 6, 7], "keep_ratios": [0.5] * 7}
BLOCK_BYTES = 128 * 8 * 2 * 2 * 32 * 4  # block of 128 tokens x 8 layers x (K, V) x 2 heads x 32 dims, fp32
BATCH_BUDGET = 256  # the tiny Qwen2-VL's largest image has 256 rows; items are never split


def pressure_requests(arch, model_dir) -> list[dict]:
    long_text = " ".join(f"item{i}" for i in range(150))
    return [
        mm_request(arch, model_dir, images=[make_image((56, 56), 21)], text="Tiny picture."),
        mm_request(arch, model_dir, images=[make_image("large", 22)], text=long_text + " What do you see?"),
        mm_request(arch, model_dir, images=[make_image("wide", 23)], text="Describe. " + long_text),
        mm_request(arch, model_dir, images=[make_image("small", 24), make_image("large", 25)]),
        mm_request(arch, model_dir, images=[make_image("small", 26)], text="And this one?"),
        mm_request(arch, model_dir, text=long_text),
        mm_request(arch, model_dir, images=[make_image("wide", 27)]),
        mm_request(arch, model_dir, images=[make_image("large", 28)], text="Again " + long_text),
    ]


def preemptions(llm) -> float:
    return sum(m.value for m in llm.get_metrics() if m.name == "vllm:num_preemptions")


@pytest.fixture(scope="module")
def pressured(tiny_models, engines):
    """Qwen2-VL, seven stages, a 9-block KV pool and a 256-token batch budget (images only:
    with items never split, the budget must hold the largest item the engine accepts)."""
    model_dir = tiny_models["qwen2-vl"]
    llm = engines.get(
        model_dir,
        model_impl="v2drop",
        additional_config={"v2drop": MANY_STAGES},
        kv_cache_memory_bytes=9 * BLOCK_BYTES,  # one block is vLLM's null block
        max_model_len=1024,
        max_num_batched_tokens=BATCH_BUDGET,
        max_num_seqs=8,
        limit_mm_per_prompt={"image": 2, "video": 0},
        disable_log_stats=False,
    )
    return llm, model_dir


def test_preemption_and_chunked_prefill(pressured):
    llm, model_dir = pressured
    reqs = pressure_requests("qwen2-vl", model_dir)
    alone = generate_each(llm, reqs, 160)
    assert max(len(o.prompt_token_ids) for o in alone) > BATCH_BUDGET  # long prompts are chunked
    before = preemptions(llm)
    together = llm.generate(reqs, greedy(160), use_tqdm=False)  # ~31 blocks of demand on 8
    assert preemptions(llm) > before, "the pool was meant to force preemption"
    assert tokens(together) == tokens(alone)


def test_fewer_rows_than_stages_matches_reference(pressured):
    llm, model_dir = pressured
    req = pressure_requests("qwen2-vl", model_dir)[0]
    ref = V2DropReference(model_dir).generate([ref_request(req)], ref_schedule("qwen2-vl", MANY_STAGES), 16)[0]
    assert ref.items[0][1] < len(MANY_STAGES["layers"])
    out = llm.generate([req], greedy(16), use_tqdm=False)[0]
    assert list(out.outputs[0].token_ids) == ref.token_ids


def test_abort_mid_decode(pressured):
    llm, model_dir = pressured
    reqs = pressure_requests("qwen2-vl", model_dir)[:4]
    alone = tokens(generate_each(llm, reqs, 24))
    engine = llm.llm_engine
    ids = [f"abort-test-{i}" for i in range(len(reqs))]
    for rid, req in zip(ids, reqs):
        engine.add_request(rid, req, greedy(24))
    victim, seen, done = ids[1], {}, {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            seen[out.request_id] = list(out.outputs[0].token_ids)
            if out.finished:
                done[out.request_id] = seen[out.request_id]
        if victim not in done and len(seen.get(victim, [])) >= 3:
            engine.abort_request([victim])
            done[victim] = None
    assert done[victim] is None
    for i, rid in enumerate(ids):
        if rid != victim:
            assert done[rid] == alone[i], rid
    # The engine still serves the aborted request's prompt normally afterwards.
    assert tokens(llm.generate([reqs[1]], greedy(24), use_tqdm=False)) == [alone[1]]


@pytest.mark.parametrize(("arch", "metric"), [("qwen2-vl", "l1"), ("llava-onevision", "cosine"), ("qwen2-vl", "random")])
def test_other_metrics_match_reference(arch, metric, tiny_models, tmp_path):
    """Each other metric on one engine: kept rows and tokens equal the reference's (the scorers
    themselves are checked on known vectors in ``test_selection.py``)."""
    model_dir = tiny_models[arch]
    config = {"metric": metric, "seed": 7, "trace": str(tmp_path)}
    reqs = [
        mm_request(arch, model_dir, images=[make_image("wide", 31)]),
        mm_request(arch, model_dir, video=make_video(seed=32), text="What happens?"),
    ]
    reference = V2DropReference(model_dir)
    schedule = ref_schedule(arch, config)
    with llm_engine(model_dir, model_impl="v2drop", additional_config={"v2drop": config}) as llm:
        first = generate_each(llm, reqs, 16)
        again = generate_each(llm, reqs[:1], 16)
    trace = read_trace(tmp_path)
    for req, out in zip(reqs, first):
        ref = reference.generate([ref_request(req)], schedule, max_new_tokens=16)[0]
        assert [it["kept"] for it in trace_for(trace, out.request_id)["items"]] == ref.kept
        assert list(out.outputs[0].token_ids) == ref.token_ids
    # Seeded: the same request keeps the same rows and gives the same tokens again.
    assert trace_for(trace, again[0].request_id)["items"] == trace_for(trace, first[0].request_id)["items"]
    assert tokens(again) == tokens(first[:1])


COMPILED_TOKENS = 1024  # the compiled engine's step budget and model length


@pytest.fixture(scope="module")
def compiled(tiny_models, engines):
    """Qwen2-VL V2Drop with vLLM's default compilation (torch.compile on)."""
    return engines.get(tiny_models["qwen2-vl"], model_impl="v2drop", enforce_eager=False,
                       max_num_batched_tokens=COMPILED_TOKENS, max_model_len=COMPILED_TOKENS)


def test_compiled_engine_matches_reference(compiled, tiny_models):
    """With torch.compile on (vLLM's default), decode and text-only steps run vLLM's compiled model with
    per-stage attention metadata, drop steps the drop loop's segments compiled with Inductor (one graph
    per segment between drop points): tokens still equal the reference."""
    from vllm_v2drop.dev.kv_probe import profiled_rows

    from test_engine import requests, resolved
    from vllm.config import CompilationMode

    model_dir = tiny_models["qwen2-vl"]
    reqs = requests("qwen2-vl", model_dir)
    assert compiled.llm_engine.vllm_config.compilation_config.mode != CompilationMode.NONE  # torch.compile
    alone = tokens(generate_each(compiled, list(reqs.values()), 16))
    together = tokens(compiled.generate(list(reqs.values()), greedy(16), use_tqdm=False))
    reference = V2DropReference(model_dir)
    schedule = ref_schedule("qwen2-vl", {})
    assert resolved("qwen2-vl", {}).layers
    expected = [reference.generate([ref_request(r)], schedule, 16)[0].token_ids for r in reqs.values()]
    assert alone == expected
    assert together == expected
    info = compiled.collective_rpc(profiled_rows)[0]
    bounds = [0, *info["layers"], compiled.llm_engine.model_config.hf_text_config.num_hidden_layers]
    assert info["segment_backend"] == "inductor"
    assert info["compiled_segments"] == [[a, b] for a, b in zip(bounds, bounds[1:])]


def test_profiling_run_is_a_drop_step_at_the_largest_step(compiled, tiny_models):
    """vLLM sizes the KV cache from the peak memory of its profiling run, so that run goes through the
    drop loop at the largest step the engine schedules, every row present at every stage (a request
    may keep all its rows). On this CPU vLLM profiles only when it compiles the model (its warm-up run
    is the profiling run); the peak itself can only be measured on a GPU."""
    from vllm_v2drop.dev.kv_probe import profiled_rows

    info = compiled.collective_rpc(profiled_rows)[0]
    assert info["max_num_tokens"] == COMPILED_TOKENS and info["num_stages"] >= 1
    assert info["profiled"] == [COMPILED_TOKENS] * (info["num_stages"] + 1)
