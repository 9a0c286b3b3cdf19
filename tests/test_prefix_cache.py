"""Prefix caching stays on with V2Drop and never changes a request's tokens.

Real CPU engines on the tiny Qwen2-VL (8 layers), float32, greedy, block size 32, a KV pool
small enough to preempt, prefix caching on, one engine per kv mode. Interleaved traffic (one
system prompt with different images, one image with different questions, a three-turn chat
re-sending its image, text-only requests, an abort) runs twice in the same engine: once
as is, once with a unique ``cache_salt`` per request (vLLM hashes the salt into the first
block, so a salted request neither hits nor is hit: the engine's tokens with prefix caching
off). Both runs must give every request the same tokens. vLLM's own prefix-cache counters
then show the hits promised:

* Level 1, both kv modes: a pruned request hits the blocks before its first image; a
  text-only or ``v2drop_off`` request hits its whole prompt. In ``shared`` mode a pruned
  request never hits a block covering its image.
* Level 2, ``per_stage``: turns 2 and 3 of a chat hit through the image and the history, to
  within one block of the prefix they share with the turn before, and the vision encoder does
  not run for them (its runs are counted in the trace directory).
"""

from __future__ import annotations

import itertools
import os
from unittest import mock

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
def engine(request, tmp_path_factory):
    model_dir = ensure_model("qwen2-vl")
    trace = str(tmp_path_factory.mktemp(f"trace-{request.param}"))
    cfg = {"v2drop": {"kv_mode": request.param, "preset": "video-25", "trace": trace}}
    with llm_engine(model_dir, model_impl="v2drop", additional_config=cfg, block_size=BS,
                    enable_prefix_caching=True, max_model_len=512, max_num_seqs=8,
                    kv_cache_memory_bytes=18 * BS * 4096, disable_log_stats=False) as llm:
        llm._v2drop_trace = trace
        yield llm, model_dir, request.param


def encoded(llm) -> int:
    """Vision items the engine's encoder has run on so far."""
    from vllm_v2drop.worker.runtime import encoder_runs

    return encoder_runs(llm._v2drop_trace)


def from_cache_lines(llm) -> list[dict]:
    """Trace lines of requests whose vision rows all came from the prefix cache."""
    import glob
    import json

    lines = [json.loads(line) for p in sorted(glob.glob(f"{llm._v2drop_trace}/v2drop-trace-*.jsonl"))
             for line in open(p)]
    return [line for line in lines if line.get("from_prefix_cache")]


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
    # the very same request again: still only up to its image. ``shared``: a block holds every
    # layer, compacted after the image. ``per_stage``: the prompt ends within a block of the image,
    # so the blocks after it in later stages (whose rows run past the prompt's last full block)
    # have no key yet (Level 2 needs the history to go on past the image: the chat test below).
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


def test_level2_chat_turns_hit_through_the_image(engine):
    """``per_stage``: each turn re-sends the image and the history; turns 2 and 3 reuse the pruned
    KV of every stage from the turn before: hits cover the image, reach to within one block of
    the prefix shared with the turn before, the encoder does not run, the tokens are unchanged.
    ``shared`` (Level 1) hits up to the image and encodes it again. vLLM's encoder cache is
    emptied before every turn, so only a prefix hit over the image spares the encoder."""
    llm, model_dir, mode = engine
    from vllm import SamplingParams

    tok = _tokenizer(str(model_dir))
    question = "What is in this photo? Describe the colours, the shapes and where each one sits. " * 3
    turns = [(question, "A gradient with a few coloured blocks."),
             ("Which colour dominates?", "Mostly blue, with some red."),
             ("Describe the top left corner.", None)]
    reqs = [request(model_dir, turns[:1], 31), request(model_dir, [turns[0], (turns[1][0], None)], 31),
            request(model_dir, turns, 31)]
    ids = [tok(r["prompt"])["input_ids"] for r in reqs]
    image_start = first_image_position(llm, reqs[0])
    image_end = ids[0].index(tok.convert_tokens_to_ids("<|vision_end|>"))
    params = SamplingParams(temperature=0.0, max_tokens=8)
    salted = [list(o.outputs[0].token_ids) for o in llm.generate(
        [{**r, "cache_salt": f"l2-{i}"} for i, r in enumerate(reqs)], params, use_tqdm=False)]
    other_budget = list(llm.generate([{**reqs[1], "cache_salt": "l2-other"}], SamplingParams(
        temperature=0.0, max_tokens=8, extra_args={"v2drop_target_retention": 0.5}), use_tqdm=False)[0].outputs[0].token_ids)
    llm.reset_prefix_cache()
    cached_lines = from_cache_lines(llm)
    for i, req in enumerate(reqs):
        llm.llm_engine.reset_encoder_cache()
        before = encoded(llm)
        queries, hits, tokens = hits_of(llm, req)
        runs = encoded(llm) - before
        assert tokens == salted[i], f"turn {i + 1}"
        if i == 0:
            assert runs == 1 and hits == 0
            extra = queries - len(ids[0])  # the engine's prompt holds one <|image_pad|> per image row
            image_end += extra
            continue
        if mode == "shared":
            assert runs == 1 and hits == (image_start // BS) * BS, f"turn {i + 1}"
            continue
        shared = next(k for k, (a, b) in enumerate(zip(ids[i - 1] + [-1], ids[i])) if a != b)
        reusable = ((shared + extra) // BS) * BS  # the turn before cached its full blocks up to here
        assert reusable > image_end + 2 * BS
        assert image_end < reusable - BS < hits <= reusable, f"turn {i + 1}: {hits} hits"
        assert runs == 0, f"turn {i + 1} ran the vision encoder"
    # a request served its image from the prefix cache still writes its trace line, saying so
    added = from_cache_lines(llm)[len(cached_lines):]
    assert len(added) == (2 if mode == "per_stage" else 0)
    for line in added:
        assert [(it["rows"], it["kept"]) for it in line["items"]] == [(image_end - image_start, None)]
    if mode == "per_stage":  # another budget lays the image's rows out differently: no hit past it
        _, hits, tokens = hits_of(llm, reqs[1], v2drop_target_retention=0.5)
        assert tokens == other_budget and hits == (image_start // BS) * BS


def test_level2_hits_the_answer_the_turn_before_generated(engine):
    """A chat client sends turn 1's own answer back in turn 2: ``per_stage`` blocks of generated
    tokens are cached in every stage too, so turn 2 hits past turn 1's prompt, through its answer."""
    llm, model_dir, mode = engine
    from vllm import SamplingParams

    tok = _tokenizer(str(model_dir))
    first = request(model_dir, [("Tell me about it.", None)], 41)
    out = llm.generate([first], SamplingParams(temperature=0.0, max_tokens=70, ignore_eos=True),
                       use_tqdm=False)[0]
    prompt_len, answer = len(out.prompt_token_ids), list(out.outputs[0].token_ids)
    suffix = tok("<|im_end|>\n<|im_start|>user\nAnd then?<|im_end|>\n<|im_start|>assistant\n")["input_ids"]
    second = {"prompt_token_ids": tok(first["prompt"])["input_ids"] + answer + suffix,
              "multi_modal_data": first["multi_modal_data"]}
    alone = llm.generate([{**second, "cache_salt": "answer"}], SamplingParams(temperature=0.0, max_tokens=8),
                         use_tqdm=False)[0].outputs[0].token_ids
    queries, hits, tokens = hits_of(llm, second)
    assert tokens == list(alone)
    assert queries == prompt_len + len(answer) + len(suffix)
    reusable = ((prompt_len + len(answer)) // BS) * BS  # turn 1's full blocks, its answer's included
    if mode == "shared":
        assert hits == (first_image_position(llm, first) // BS) * BS
    else:
        assert prompt_len < reusable - BS < hits <= reusable


@pytest.fixture(scope="module")
def in_process_engine():
    """``per_stage`` with the tiny model's default schedule and room for several requests at once; the
    engine core runs in this process, so requests handed over together are scheduled in the same step
    (over ZMQ the first one can start alone)."""
    model_dir = ensure_model("qwen2-vl")
    with mock.patch.dict(os.environ, {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}), \
            llm_engine(model_dir, model_impl="v2drop", additional_config={"v2drop": {"kv_mode": "per_stage"}},
                       block_size=BS, enable_prefix_caching=True, max_model_len=1024,
                       kv_cache_memory_bytes=256 * BS * 4096) as llm:
        yield llm, model_dir


def test_same_step_hits_equal_alone(in_process_engine):
    """Identical pruned requests scheduled in one step: the second and later ones find the first one's
    blocks in the prefix cache before the step has written them (vLLM caches a block when it allocates
    it). A hit that ended inside such a block had vLLM copy it (copy-on-write) at the start of the
    step, unwritten, and those requests answered with other text; the KV audit
    (``V2DROP_AUDIT_KV``, on in the suite) stops the engine at the reuse. They must answer as alone."""
    llm, model_dir = in_process_engine
    from vllm import SamplingParams

    question = "Describe this image in detail."
    req = {"prompt": chat(model_dir, [(question, None)], system="You are a helpful assistant."),
           "multi_modal_data": {"image": make_image((448, 336), 3)}}
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    alone = list(llm.generate([{**req, "cache_salt": "alone"}], params, use_tqdm=False)[0].outputs[0].token_ids)
    llm.reset_prefix_cache()
    together = [list(o.outputs[0].token_ids) for o in llm.generate([req] * 4, params, use_tqdm=False)]
    assert together == [alone] * 4


def test_new_request_data_keeps_vision_data_past_the_hit(in_process_engine):
    """What the scheduler sends the worker for a request whose prefix hit covers its image still holds
    the image's data: a request resumed after preemption can hit less than at admission, and vLLM's
    worker, which keeps a resumed request's state from admission, must then encode the image again."""
    llm, model_dir = in_process_engine
    from vllm import SamplingParams
    from vllm.v1.core.sched.output import NewRequestData

    engine = llm.llm_engine
    req = {"prompt": chat(model_dir, [("What is in this photo?", None)]),
           "multi_modal_data": {"image": make_image("small", 61)}}
    engine.add_request("keeps-data", req, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    engine.step()  # the prefill: computed tokens now cover the image
    scheduler = engine.engine_core.engine_core.scheduler
    request = next(r for rid, r in scheduler.requests.items() if rid.startswith("keeps-data"))
    image = request.mm_features[0].mm_position
    assert request.num_computed_tokens > image.offset + image.length
    sent = NewRequestData.from_request(request, ([],))
    assert [f.data is not None for f in sent.mm_features] == [True]
    engine.abort_request(["keeps-data"])
    while engine.has_unfinished_requests():
        engine.step()
