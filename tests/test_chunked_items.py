"""Chunked items in the real engine: vision items longer than ``--max-num-batched-tokens``.

One V2Drop engine with ``chunked_items`` and a step budget far smaller than its video and
images, so chunked prefill splits every item across steps (and often mid-row of a frame). Its
greedy tokens and the rows each stage kept equal the plain-transformers reference of the spec,
the oracle an engine whose budget holds every item whole is checked against
(``test_engine.test_fidelity_with_reference``): alone and in a mixed batch.
"""

from __future__ import annotations

import os

import pytest
from conftest import greedy, llm_engine, make_image, make_video, mm_request
from test_engine import generate_each, read_trace, ref_request, ref_schedule, trace_for

from vllm_v2drop.dev.reference import V2DropReference

pytestmark = pytest.mark.slow
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # stash_state runs in the worker

ARCH = "qwen2-vl"  # M-RoPE: the held rows' 3-D positions come back with them
BUDGET = 10  # rows per step: every item below is longer


def stash_state(worker) -> dict:
    stash = worker.model_runner.get_model().v2drop_runtime.stash
    return {"held": len(stash.held), "bytes": stash.nbytes, "peak": stash.peak}


@pytest.fixture(scope="module")
def model_dir(tiny_models):
    return tiny_models[ARCH]


@pytest.fixture(scope="module")
def chunked(model_dir, tmp_path_factory):
    trace = tmp_path_factory.mktemp("trace-chunked")
    config = {"trace": str(trace), "chunked_items": True}
    with llm_engine(model_dir, model_impl="v2drop", additional_config={"v2drop": config},
                    max_num_batched_tokens=BUDGET, max_num_seqs=4) as llm:
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


def check_against_reference(outs, reqs, trace_dir, reference, schedule):
    trace = read_trace(trace_dir)
    for (name, req), out in zip(reqs.items(), outs):
        ref = reference.generate([ref_request(req)], schedule, max_new_tokens=12)[0]
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


def test_split_items_in_a_mixed_batch(model_dir, chunked, reference):
    """All at once, with a text-only request: steps hold chunks of several requests' items."""
    llm, trace_dir, config = chunked
    reqs = named_requests(model_dir)
    batch = [*reqs.values(), mm_request(ARCH, model_dir, text="Only text here, no picture at all.")]
    outs = llm.generate(batch, greedy(12), use_tqdm=False)
    check_against_reference(outs[:3], reqs, trace_dir, reference, ref_schedule(ARCH, config))
    (state,) = llm.collective_rpc(stash_state)
    assert state["held"] == 0 and state["bytes"] == 0
