"""Prefix caching stays on with V2Drop (Level 1): shared blocks always hold the prompt's own rows.

Real CPU engines on the tiny Qwen2-VL (8 layers), float32, greedy, block size 16, a KV pool
small enough to preempt, prefix caching on, one engine per kv mode. Interleaved traffic (one
system prompt with different images, one image with different questions, a three-turn chat
re-sending its image, text-only requests, an abort) runs twice in the same engine: once
as is, once with a unique ``cache_salt`` per request (vLLM hashes the salt into the first
block, so a salted request neither hits nor is hit: the engine's tokens with prefix caching
off). Both runs must give every request the same tokens. vLLM's own prefix-cache counters
then show the hits Level 1 promises, exactly: a pruned request hits the blocks before its
first image and never a block covering it; a text-only request hits its whole prompt.
"""

from __future__ import annotations

import itertools

import pytest

from conftest import _tokenizer, ensure_model, llm_engine, make_image

pytestmark = pytest.mark.slow

BS = 32
SYSTEM = "You are a careful assistant for a photo archive. " * 10  # several blocks before the image
MAX_TOKENS = 32
_ids = itertools.count()


def chat(model_dir, turns: list[tuple[str, str | None]], image: bool = True, system: str = SYSTEM) -> str:
    """A chat prompt: the system prompt, then user/assistant turns; the image in the first user turn."""
    messages = [{"role": "system", "content": system}]
    for i, (user, answer) in enumerate(turns):
        content = ([{"type": "image"}] if image and i == 0 else []) + [{"type": "text", "text": user}]
        messages.append({"role": "user", "content": content})
        if answer is not None:
            messages.append({"role": "assistant", "content": answer})
    return _tokenizer(str(model_dir)).apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def request(model_dir, turns, image_seed: int | None = None, system: str = SYSTEM) -> dict:
    req = {"prompt": chat(model_dir, turns, image=image_seed is not None, system=system)}
    if image_seed is not None:
        req["multi_modal_data"] = {"image": make_image("small", image_seed)}
    return req


def waves(model_dir) -> list[list[tuple[str, dict]]]:
    """Named requests in three waves; a wave is submitted together, the next after it finishes."""
    chat_turns = [("What is in this photo?", "A gradient with a few coloured blocks."),
                  ("Which colour dominates?", "Mostly blue, with some red."),
                  ("Describe the top left corner.", None)]
    return [
        [("sys-img1", request(model_dir, [("Describe it.", None)], 1)),
         ("sys-img2", request(model_dir, [("Describe it.", None)], 2)),
         ("img7-q1", request(model_dir, [("What colours are there?", None)], 7, system="Be brief.")),
         ("chat-1", request(model_dir, chat_turns[:1], 5)),
         ("text-1", request(model_dir, [("Name three archive formats.", None)])),
         ("abort-me", request(model_dir, [("Describe it in detail.", None)], 3))],
        [("sys-img3", request(model_dir, [("Describe it.", None)], 3)),
         ("img7-q2", request(model_dir, [("Is there a square?", None)], 7, system="Be brief.")),
         ("chat-2", request(model_dir, [chat_turns[0], chat_turns[1][:1] + (None,)], 5)),
         ("text-1-again", request(model_dir, [("Name three archive formats.", None)])),
         ("text-2", request(model_dir, [("What is a TIFF file?", None)]))],
        [("chat-3", request(model_dir, [chat_turns[0], chat_turns[1], chat_turns[2]], 5)),
         ("sys-img1-again", request(model_dir, [("Describe it.", None)], 1)),
         ("img7-q3", request(model_dir, [("What shape is in the middle?", None)], 7, system="Be brief."))],
    ]


def run_waves(llm, model_dir, salted: bool) -> dict[str, list[int]]:
    """Every request's greedy tokens; ``abort-me`` is aborted after its first steps."""
    from vllm import SamplingParams

    engine, out = llm.llm_engine, {}
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    for wave in waves(model_dir):
        ids = {}
        for name, req in wave:
            rid = f"{name}-{next(_ids)}"
            ids[rid] = name
            engine.add_request(rid, {**req, "cache_salt": rid} if salted else req, params)
        steps = 0
        while engine.has_unfinished_requests():
            for o in engine.step():
                if o.finished and not o.request_id.startswith("abort-me"):
                    out[ids[o.request_id]] = list(o.outputs[0].token_ids)
            steps += 1
            if steps == 2:
                engine.abort_request([r for r in ids if r.startswith("abort-me")])
    return out


def counters(llm) -> dict[str, float]:
    names = ("vllm:prefix_cache_queries", "vllm:prefix_cache_hits", "vllm:num_preemptions")
    return {m.name: m.value for m in llm.get_metrics() if m.name in names}


def first_image_position(llm, req: dict) -> int:
    """Prompt position of the request's first image placeholder row (as the engine sees it)."""
    tok = _tokenizer(llm.llm_engine.model_config.model)
    ids = tok(req["prompt"])["input_ids"]
    return ids.index(tok.convert_tokens_to_ids("<|image_pad|>"))


@pytest.fixture(scope="module", params=["shared", "per_stage"])
def engine(request):
    model_dir = ensure_model("qwen2-vl")
    cfg = {"v2drop": {"kv_mode": request.param, "preset": "video-25"}}
    with llm_engine(model_dir, model_impl="v2drop", additional_config=cfg, block_size=BS,
                    enable_prefix_caching=True, max_model_len=512, max_num_seqs=8,
                    kv_cache_memory_bytes=18 * BS * 4096, disable_log_stats=False) as llm:
        yield llm, model_dir, request.param


def test_prefix_caching_is_on(engine):
    llm, _, _ = engine
    assert llm.llm_engine.vllm_config.cache_config.enable_prefix_caching is True


def test_interleaved_traffic_equals_caching_off(engine):
    llm, model_dir, _ = engine
    before = counters(llm)
    cached = run_waves(llm, model_dir, salted=False)
    after = counters(llm)
    salted = run_waves(llm, model_dir, salted=True)
    assert set(cached) == set(salted) == {n for w in waves(model_dir) for n, _ in w} - {"abort-me"}
    assert {n: t for n, t in cached.items() if t != salted[n]} == {}
    assert all(len(t) == MAX_TOKENS for t in cached.values())
    # the traffic did exercise the cache and the pool
    assert after["vllm:prefix_cache_hits"] > before["vllm:prefix_cache_hits"]
    assert after["vllm:num_preemptions"] > before["vllm:num_preemptions"], "KV pool too large: no preemption"


def hits_of(llm, req: dict, **extra_args) -> tuple[float, float, list[int]]:
    """(queried tokens, hit tokens, greedy tokens) of one request run alone."""
    from vllm import SamplingParams

    before = counters(llm)
    out = llm.generate([req], SamplingParams(temperature=0.0, max_tokens=8, extra_args=extra_args or None),
                       use_tqdm=False)
    after = counters(llm)
    return (after["vllm:prefix_cache_queries"] - before["vllm:prefix_cache_queries"],
            after["vllm:prefix_cache_hits"] - before["vllm:prefix_cache_hits"], list(out[0].outputs[0].token_ids))


def test_level1_hits_stop_before_the_first_pruned_image(engine):
    llm, model_dir, _ = engine
    llm.reset_prefix_cache()
    first = request(model_dir, [("Tell me about it.", None)], 11)
    _, hits, tokens = hits_of(llm, first)
    assert hits == 0
    # same system prompt, another image: the blocks before the image are shared
    other = request(model_dir, [("Tell me about it.", None)], 12)
    start = first_image_position(llm, other)
    assert start >= 2 * BS
    _, hits, _ = hits_of(llm, other)
    assert hits == (start // BS) * BS
    # the very same request again: still only up to its image (the image's blocks hold compacted rows)
    _, hits, again = hits_of(llm, first)
    assert hits == (start // BS) * BS and again == tokens


def test_unpruned_requests_hit_past_their_image(engine):
    """``v2drop_off`` keeps every row in every layer: its blocks are shared as in stock vLLM, image
    included, and a pruned request with the same prompt still stops before the image."""
    llm, model_dir, _ = engine
    req = request(model_dir, [("What is unusual here?", None)], 21)
    _, first_hits, off_tokens = hits_of(llm, req, v2drop_off=True)
    queries, hits, again = hits_of(llm, req, v2drop_off=True)
    assert again == off_tokens
    assert hits == ((queries - 1) // BS) * BS > first_hits  # the whole prompt, image included
    start = first_image_position(llm, req)
    _, hits, _ = hits_of(llm, req)  # pruned
    assert hits == (start // BS) * BS


def test_text_only_requests_hit_their_whole_prompt(engine):
    llm, model_dir, _ = engine
    req = request(model_dir, [("What does an archivist do all day?", None)])
    hits_of(llm, req)
    queries, hits, _ = hits_of(llm, req)
    n = len(_tokenizer(str(model_dir))(req["prompt"])["input_ids"])
    assert queries == n and hits == ((n - 1) // BS) * BS
