"""Chunked items in the real engine: vision items longer than ``--max-num-batched-tokens``.

Qwen2-VL: one V2Drop engine per kv_mode with ``chunked_items`` and a step budget far smaller than
its video and images, so chunked prefill splits every item across steps (and often mid-row of a
frame). Its greedy tokens and the rows each stage kept equal the plain-transformers reference of
the spec, the oracle an engine whose budget holds every item whole is checked against
(``test_engine.test_fidelity_with_reference``): alone, in a mixed batch, after a preemption; an
abort inside an item frees its held rows.

Every other architecture (Qwen2.5-VL, Qwen3-VL, Qwen3-VL-MoE, LLaVA-OneVision, LLaVA-NeXT,
LLaVA-1.5): one engine each, in one kv mode (alternating, so that both modes run on M-RoPE and on
1-D positions), the same check on its image, two-images and video requests, alone and together.
"""

from __future__ import annotations

import os

import pytest
from conftest import greedy, llm_engine, make_image, make_video, mm_request
from test_engine import generate_each, read_trace, ref_request, ref_schedule, requests, trace_for

from vllm_v2drop.dev.reference import V2DropReference

pytestmark = pytest.mark.slow
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # stash_state runs in the worker

ARCH = "qwen2-vl"  # M-RoPE: the held rows' 3-D positions come back with them
BUDGET = 10  # rows per step: every item below is longer
BLOCK_BYTES = 128 * 8 * 2 * 2 * 32 * 4  # block of 128 tokens x 8 layers x (K, V) x 2 heads x 32 dims, fp32
# per kv_mode, max_model_len and a KV pool in which each request below fits alone, not every batch
POOL = {"shared": (384, 4 * BLOCK_BYTES), "per_stage": (256, 3 * BLOCK_BYTES)}


def stash_state(worker) -> dict:
    stash = worker.model_runner.get_model().v2drop_runtime.stash
    return {"held": len(stash.held), "bytes": stash.nbytes, "peak": stash.peak, "dropped": stash.dropped}


@pytest.fixture(scope="module", params=["shared", "per_stage"])
def chunked(model_dir, tmp_path_factory, request):
    trace = tmp_path_factory.mktemp("trace-chunked")
    config = {"trace": str(trace), "chunked_items": True, "kv_mode": request.param}
    with llm_engine(model_dir, model_impl="v2drop", additional_config={"v2drop": config},
                    max_num_batched_tokens=BUDGET, max_num_seqs=4, max_model_len=POOL[request.param][0],
                    kv_cache_memory_bytes=POOL[request.param][1], disable_log_stats=False) as llm:
        yield llm, trace, config


@pytest.fixture(scope="module")
def reference(model_dir):
    return V2DropReference(model_dir)


def named_requests(model_dir) -> dict[str, dict]:
    return {
        "video": mm_request(ARCH, model_dir, video=make_video(seed=4), text="What happens here?"),
        "two-images": mm_request(ARCH, model_dir, images=[make_image("small", 2), make_image("large", 3)],
                                 text="Compare the two pictures."),
        "image": mm_request(ARCH, model_dir, images=[make_image("wide", 1)]),
    }


def text_then_video(model_dir, text: str, seed: int) -> dict:
    """A request whose video comes after a long text (its rows cross a KV block boundary)."""
    from conftest import _tokenizer, video_input

    messages = [{"role": "user", "content": [{"type": "text", "text": text}, {"type": "video"},
                                             {"type": "text", "text": "What happens here?"}]}]
    prompt = _tokenizer(str(model_dir)).apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return {"prompt": prompt, "multi_modal_data": {"video": video_input(ARCH, make_video(seed=seed))}}


def check_against_reference(outs, reqs, trace_dir, reference, schedule, max_tokens=(12, 12, 12)):
    trace = read_trace(trace_dir)
    for (name, req), out, n in zip(reqs.items(), outs, max_tokens):
        ref = reference.generate([ref_request(req)], schedule, max_new_tokens=n)[0]
        assert list(out.prompt_token_ids) == ref.prompt_token_ids, name
        rec = trace_for(trace, out.request_id)
        assert [(it["first"], it["rows"]) for it in rec["items"]] == ref.items, name
        assert all(rows > BUDGET for _, rows in ref.items), f"{name}: an item fits one step, nothing is split"
        assert [it["kept"] for it in rec["items"]] == ref.kept, name
        assert list(out.outputs[0].token_ids) == ref.token_ids, name


def test_split_items_equal_the_reference(model_dir, chunked, reference):
    """Each request alone: every item is split across steps; kept rows and tokens are the spec's."""
    llm, trace_dir, config = chunked
    reqs = named_requests(model_dir)
    outs = generate_each(llm, list(reqs.values()), 12)
    check_against_reference(outs, reqs, trace_dir, reference, ref_schedule(ARCH, config))
    (state,) = llm.collective_rpc(stash_state)
    assert state["held"] == 0 and state["bytes"] == 0  # freed as each item completed
    assert state["peak"] > 0


def preemptions(llm) -> float:
    return sum(m.value for m in llm.get_metrics() if m.name == "vllm:num_preemptions")


def test_split_items_together_with_preemption(model_dir, chunked, reference):
    """Together: steps hold chunks of both requests' items; the small KV pool preempts the video
    request (its KV and held rows freed), which then computes its video again, split as before."""
    llm, trace_dir, config = chunked
    # 99 and 191 prompt rows: the images request's long answer takes its second block while the
    # video request holds the third
    reqs = {
        "two-images": named_requests(model_dir)["two-images"],
        "text-then-video": text_then_video(model_dir, " ".join(f"item{i}" for i in range(26)), seed=5),
    }
    lengths = [120, 40]
    before = preemptions(llm)
    outs = llm.generate(list(reqs.values()), [greedy(n) for n in lengths], use_tqdm=False)
    assert preemptions(llm) > before, "the pool was meant to force preemption"
    item = trace_for(read_trace(trace_dir), outs[1].request_id)["items"][0]
    assert item["first"] < 128 < item["first"] + item["rows"]  # the video crosses into the second KV block
    check_against_reference(outs, reqs, trace_dir, reference, ref_schedule(ARCH, config), max_tokens=lengths)
    (state,) = llm.collective_rpc(stash_state)
    assert state["held"] == 0 and state["bytes"] == 0


def test_abort_inside_an_item_frees_its_rows(model_dir, chunked):
    llm, _, _ = chunked
    engine = llm.llm_engine
    video = named_requests(model_dir)["video"]
    engine.add_request("held-then-aborted", video, greedy(4))
    while llm.collective_rpc(stash_state)[0]["held"] == 0:
        engine.step()
    dropped = llm.collective_rpc(stash_state)[0]["dropped"]
    engine.abort_request(["held-then-aborted"])
    engine.add_request("after", mm_request(ARCH, model_dir, text="Only text."), greedy(2))
    while engine.has_unfinished_requests():
        engine.step()
    (state,) = llm.collective_rpc(stash_state)
    assert state["held"] == 0 and state["bytes"] == 0 and state["dropped"] == dropped + 1


# Every other architecture: one engine each (its kv mode alternating, so that each mode runs on both
# position kinds, M-RoPE and 1-D; V2DROP_CHUNKED_ALL=1 runs both modes on each), whose budget splits
# every item of its requests across steps. Qwen3-VL drops first at layer 3, after its DeepStack
# layers 0-2 (earlier is refused: tests/test_integration.py); the others run their default schedule
# at the tiny depth.
AFTER_DEEPSTACK = {"layers": [3, 5, 6], "keep_ratios": [0.5, 0.5, 0.25]}
ARCH_CASES = {  # arch: (kv_mode in the suite, schedule, rows per step)
    "qwen2.5-vl": ("shared", {}, 10),
    "qwen3-vl": ("per_stage", AFTER_DEEPSTACK, 10),  # its video's item spans timestamp text rows
    "qwen3-vl-moe": ("shared", AFTER_DEEPSTACK, 10),
    "llava-onevision": ("per_stage", {}, 24),
    "llava-next": ("per_stage", {}, 24),
    "llava": ("shared", {}, 24),
}
KV_MODES = ("shared", "per_stage")
ARCH_PARAMS = [(arch, kv) for arch, (mode, _, _) in ARCH_CASES.items() for kv in KV_MODES
               if kv == mode or os.environ.get("V2DROP_CHUNKED_ALL")]


@pytest.fixture(scope="module", params=ARCH_PARAMS, ids="-".join)
def arch_engine(request, tiny_models, tmp_path_factory):
    arch, kv_mode = request.param
    _, schedule, budget = ARCH_CASES[arch]
    trace = tmp_path_factory.mktemp(f"trace-chunked-{arch}-{kv_mode}")
    config = {**schedule, "trace": str(trace), "chunked_items": True, "kv_mode": kv_mode}
    with llm_engine(tiny_models[arch], model_impl="v2drop", additional_config={"v2drop": config},
                    max_num_batched_tokens=budget, max_num_seqs=8) as llm:
        yield arch, llm, trace, config, budget


def test_every_architecture_splits_items_exactly(arch_engine, tiny_models):
    """Each architecture's image, two-images and video requests (where it takes videos), every item
    longer than a step: alone, then together beside a text-only request, their kept rows and
    tokens are those of the reference, the oracle of an engine whose budget holds items whole."""
    arch, llm, trace_dir, config, budget = arch_engine
    model_dir = tiny_models[arch]
    reqs = {k: v for k, v in requests(arch, model_dir).items() if k != "text"}
    reference = V2DropReference(model_dir)
    schedule = ref_schedule(arch, config)
    refs = {name: reference.generate([ref_request(req)], schedule, max_new_tokens=12)[0] for name, req in reqs.items()}
    for name, ref in refs.items():
        assert ref.items and all(rows > budget for _, rows in ref.items), f"{name}: an item fits one step"
    alone = generate_each(llm, list(reqs.values()), 12)
    together = llm.generate([*reqs.values(), mm_request(arch, model_dir, text="Only text.")], greedy(12),
                            use_tqdm=False)
    trace = read_trace(trace_dir)
    for how, outs in (("alone", alone), ("together", together)):
        for name, out in zip(reqs, outs):
            ref, rec = refs[name], trace_for(trace, out.request_id)
            assert list(out.prompt_token_ids) == ref.prompt_token_ids, (how, name)
            assert [(it["first"], it["rows"]) for it in rec["items"]] == ref.items, (how, name)
            assert [it["kept"] for it in rec["items"]] == ref.kept, (how, name)
            assert list(out.outputs[0].token_ids) == ref.token_ids, (how, name)
    (state,) = llm.collective_rpc(stash_state)
    assert state["held"] == 0 and state["bytes"] == 0 and state["peak"] > 0
