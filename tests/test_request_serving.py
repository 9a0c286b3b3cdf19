"""Per-request V2Drop budgets and V2Drop's ``/metrics`` through the real server and the ``openai`` client.

One module-scoped ``vllm serve --model-impl v2drop`` on the tiny Qwen2-VL (8 layers, default
schedule scaled to layers [1, 5, 6]) in ``kv_mode: per_stage`` with tracing on, block size 32,
and vLLM's dev endpoints (``/pause``, ``/resume``) to freeze the engine while the KV pool is
read. Stock tokens come from a stock offline engine run once, before the server starts.

Every expectation is computed here, independently of the frontend's own counting: plans from
the prompt token ids the server returns (``return_token_ids``), with :func:`plan_request` and
the ratios each request asked for.
"""

from __future__ import annotations

import base64
import io
import json
import math
import re
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from conftest import ensure_model, llm_engine, make_image, prompt
from test_engine import read_trace, trace_for

from vllm_v2drop.config import V2DropConfig
from vllm_v2drop.core.kv_layout import stage_layer_counts
from vllm_v2drop.core.kv_layout import group_layout
from vllm_v2drop.overrides import _solved
from vllm_v2drop.core.counts import keep_counts
from vllm_v2drop.core.request_plan import plan_request

pytestmark = pytest.mark.slow
openai = pytest.importorskip("openai")

ARCH = "qwen2-vl"
DEPTH = 8
BS = 32
MAX_TOKENS = 8
SCHED = V2DropConfig(kv_mode="per_stage").resolve(DEPTH, "Qwen2VLForConditionalGeneration")
SERVER_ARGS = [
    "--model-impl", "v2drop", "--enforce-eager", "--dtype", "float32", "--max-model-len", "2048",
    "--block-size", str(BS), "--kv-cache-memory-bytes", str(64 << 20), "--seed", "0",
    "--limit-mm-per-prompt", json.dumps({"image": 2}),
    "--no-enable-prefix-caching",  # the KV checks count each request's own blocks (no shared prefix blocks)
]


def data_url(img) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


IMG1, IMG2, IMG3 = make_image("large", 21), make_image("wide", 22), make_image("small", 23)
QUESTION = "What is in this image?"
IMAGE = [{"type": "image_url", "image_url": {"url": data_url(IMG1)}}, {"type": "text", "text": QUESTION}]
TWO = [{"type": "image_url", "image_url": {"url": data_url(IMG2)}},
       {"type": "image_url", "image_url": {"url": data_url(IMG3)}}, {"type": "text", "text": "Compare them."}]
TEXT = [{"type": "text", "text": "Tell me about the sea."}]


# ----------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def model_dir():
    return ensure_model(ARCH)


@pytest.fixture(scope="module")
def stock_tokens(model_dir):
    """Stock vLLM (no V2Drop) on IMAGE, greedy: the same chat through ``LLM.chat``."""
    from vllm import SamplingParams

    with llm_engine(model_dir, max_model_len=2048, limit_mm_per_prompt={"image": 2}) as llm:
        out = llm.chat([{"role": "user", "content": IMAGE}],
                       SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True), use_tqdm=False)
        return list(out[0].outputs[0].token_ids)


@pytest.fixture(scope="module")
def server(model_dir, stock_tokens, tmp_path_factory):
    """``(base_url, model, trace_dir)``; starts after the stock engine is gone (one engine at a time)."""
    from vllm_v2drop.dev.server import serve

    trace = tmp_path_factory.mktemp("trace")
    args = SERVER_ARGS + ["--additional-config", json.dumps({"v2drop": {"kv_mode": "per_stage", "trace": str(trace)}})]
    log = tmp_path_factory.mktemp("serve") / "server.log"
    with serve(model_dir, args, env={"VLLM_SERVER_DEV_MODE": "1"}, log_path=log) as url:
        yield url, str(model_dir), trace


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key="EMPTY", max_retries=0, timeout=120)


# ------------------------------------------------------------------------------------ helpers
def ask(client, model, content, xargs=None, max_tokens=MAX_TOKENS):
    body = {"ignore_eos": True, "return_token_ids": True}
    if xargs is not None:
        body["vllm_xargs"] = xargs
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": content}],
                                          max_tokens=max_tokens, temperature=0.0, extra_body=body)


def token_ids(resp) -> list[int]:
    return list(resp.choices[0].model_extra["token_ids"])


def prompt_ids(resp) -> list[int]:
    return list(resp.model_extra["prompt_token_ids"])


def ratios_for(xargs) -> tuple[float, ...] | None:
    """The keep ratios a request runs with (None: not pruned), as the test reads the issue."""
    xargs = xargs or {}
    if xargs.get("v2drop_off"):
        return None
    if "v2drop_keep_ratios" in xargs:
        return tuple(float(r) for r in xargs["v2drop_keep_ratios"])
    if "v2drop_target_retention" in xargs:
        return _solved(SCHED.layers, DEPTH, float(xargs["v2drop_target_retention"]), 576, 1)
    return SCHED.keep_ratios


def plan_of(model_dir, ids: list[int], xargs):
    """The request's plan from its prompt token ids: one item per run of image pad tokens."""
    from transformers import AutoTokenizer

    pad = AutoTokenizer.from_pretrained(model_dir).convert_tokens_to_ids("<|image_pad|>")
    pos = np.flatnonzero(np.asarray(ids) == pad)
    items = np.split(pos, np.flatnonzero(np.diff(pos) > 1) + 1) if len(pos) else []
    ratios = ratios_for(xargs)
    return plan_request(items, len(ids), ratios or SCHED.keep_ratios, prune=ratios is not None)


GROUP_STAGES = [s for s, _ in group_layout(stage_layer_counts(SCHED))]


def blocks(plan, n: int) -> int:
    """KV blocks a request with ``n`` KV rows holds in per_stage: per group, its stage's compact rows."""
    return sum(math.ceil(plan.compact_len(s, n) / BS) for s in GROUP_STAGES)


def scrape(url: str) -> str:
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as r:
        return r.read().decode()


def metric(text: str, name: str, **labels) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
    return total


def post(url: str, path: str) -> None:
    req = urllib.request.Request(f"{url}{path}", data=b"", method="POST")
    with urllib.request.urlopen(req, timeout=60) as r:
        assert r.status == 200, r.read()


# -------------------------------------------------------------------------------------- tests
def test_off_gives_stock_tokens(client, server, stock_tokens):
    url, model, trace = server
    resp = ask(client, model, IMAGE, {"v2drop_off": True})
    assert token_ids(resp) == stock_tokens
    rec = trace_for(read_trace(trace), resp.id)
    assert all(len(kept) == it["rows"] for it in rec["items"] for kept in it["kept"])  # nothing dropped
    assert token_ids(ask(client, model, IMAGE)) != stock_tokens  # the engine's schedule does drop


@pytest.mark.parametrize("target", [0.3, 0.7])
def test_target_retention_follows_the_plan_and_the_reference(client, server, target):
    from vllm_v2drop.dev.reference import RefRequest, RefSchedule, V2DropReference

    url, model, trace = server
    resp = ask(client, model, IMAGE, {"v2drop_target_retention": target})
    ratios = ratios_for({"v2drop_target_retention": target})
    assert ratios != SCHED.keep_ratios
    rec = trace_for(read_trace(trace), resp.id)
    (item,) = rec["items"]
    assert [len(k) for k in item["kept"]] == list(keep_counts(item["rows"], ratios))
    plan = plan_of(model, prompt_ids(resp), {"v2drop_target_retention": target})
    assert [len(k) for k in item["kept"]] == plan.counts[0, 1:].tolist()
    ref = V2DropReference(model).generate(
        [RefRequest(prompt(model, n_images=1, text=QUESTION), images=[IMG1])],
        RefSchedule(list(SCHED.layers), list(ratios)), max_new_tokens=MAX_TOKENS)[0]
    assert ref.prompt_token_ids == prompt_ids(resp)
    assert ref.kept == [item["kept"]]
    assert token_ids(resp) == ref.token_ids


SETTINGS = [None, {"v2drop_off": True}, {"v2drop_target_retention": 0.3}, {"v2drop_target_retention": 0.7},
            {"v2drop_keep_ratios": [1.0, 0.5, 0.0]}]
MIX = [(IMAGE, x) for x in SETTINGS] + [(TWO, {"v2drop_target_retention": 0.5}), (TWO, None), (TEXT, None)]


def test_concurrent_mixed_settings_equal_alone(client, server):
    _, model, _ = server
    alone = [token_ids(ask(client, model, c, x)) for c, x in MIX]
    assert len({tuple(t) for t in alone[:5]}) >= 4  # the settings change the answer
    with ThreadPoolExecutor(len(MIX) * 2) as pool:
        together = list(pool.map(lambda cx: token_ids(ask(client, model, *cx)), MIX * 2))
    assert together == alone * 2


BAD = [
    ({"v2drop_bogus": 1}, "v2drop_bogus", "unknown key"),
    ({"v2drop_off": "yes"}, "v2drop_off", "true or false"),
    ({"v2drop_target_retention": 0}, "v2drop_target_retention", "a number in (0, 1]"),
    ({"v2drop_target_retention": "high"}, "v2drop_target_retention", "a number in (0, 1]"),
    ({"v2drop_keep_ratios": [1.0, 1.5, 0.0]}, "v2drop_keep_ratios", "outside [0, 1]"),
    ({"v2drop_keep_ratios": [0.5, 0.5]}, "v2drop_keep_ratios", "got 2 ratio(s), but this engine drops at 3 layer(s)"),
    ({"v2drop_keep_ratios": [1, 1, 1], "v2drop_target_retention": 0.5}, "v2drop_keep_ratios", "not both"),
]


@pytest.mark.parametrize("xargs,key,text", BAD, ids=[b[1] + str(i) for i, b in enumerate(BAD)])
def test_bad_setting_is_a_400_and_the_server_keeps_serving(client, server, xargs, key, text):
    _, model, _ = server
    with pytest.raises(openai.BadRequestError) as info:
        ask(client, model, IMAGE, xargs)
    err = info.value
    assert err.status_code == 400
    assert f"vllm_xargs.{key}" in err.message and text in err.message, err.message
    assert len(token_ids(ask(client, model, IMAGE, {"v2drop_target_retention": 0.5}))) == MAX_TOKENS


def test_metrics_equal_plan_sums(client, server):
    url, model, _ = server
    before = scrape(url)
    sent = [(IMAGE, None), (IMAGE, {"v2drop_target_retention": 0.3}), (IMAGE, {"v2drop_keep_ratios": [1, 0.5, 0]}),
            (TWO, {"v2drop_target_retention": 0.7}), (IMAGE, {"v2drop_off": 1}), (TEXT, None)]
    plans = []
    for content, xargs in sent:
        resp = ask(client, model, content, xargs)
        plans.append((plan_of(model, prompt_ids(resp), xargs), len(prompt_ids(resp))))
    after = scrape(url)

    def delta(name, **labels):
        return metric(after, name, **labels) - metric(before, name, **labels)

    pruned = [(p, n) for p, n in plans if p.num_items and p.pruned]
    assert len(pruned) == 4
    assert delta("vllm:v2drop_requests_pruned_total") == 4
    assert delta("vllm:v2drop_requests_unpruned_total", reason="request_off") == 1
    assert delta("vllm:v2drop_vision_rows_received_total") == sum(p.total_vision_rows for p, _ in pruned)
    for s in range(len(SCHED.layers) + 1):
        assert delta("vllm:v2drop_vision_rows_present_total", stage=s) == sum(int(p.counts[:, s].sum()) for p, _ in pruned)
    assert delta("vllm:v2drop_kv_rows_not_written_total") == sum(p.kv_rows_saved(SCHED.layers, DEPTH) for p, _ in pruned)
    saved = sum(math.ceil((n + MAX_TOKENS - 1) / BS) * len(GROUP_STAGES) - blocks(p, n + MAX_TOKENS - 1)
                for p, n in pruned)
    assert saved > 0 and delta("vllm:v2drop_kv_blocks_not_allocated_total") == saved
    assert delta("vllm:v2drop_request_retention_count") == 4
    for name in ("vllm:v2drop_requests_pruned_total", "vllm:num_requests_running"):  # next to vLLM's own
        assert re.search(rf"^{re.escape(name)}\{{", after, re.M), name


LONG = 1500  # tokens a frozen request could still generate: the check never races its end


def test_kv_blocks_in_use_equal_plan_sums(client, server):
    """Frozen mid-decode (``/pause?mode=keep``), the pool holds exactly the planned blocks of each request."""
    url, model, _ = server
    reqs = [(IMAGE, None), (IMAGE, {"v2drop_off": True}), (IMAGE, {"v2drop_target_retention": 0.3}),
            (TWO, {"v2drop_keep_ratios": [1.0, 0.5, 0.0]})]
    prompts = [prompt_ids(ask(client, model, c, x, max_tokens=1)) for c, x in reqs]
    text = scrape(url)
    pool = int(re.search(r'vllm:cache_config_info\{[^}]*num_gpu_blocks="(\d+)"', text).group(1))
    counts, stop = [0] * len(reqs), threading.Event()

    def stream(i):  # counts the tokens streamed; stops (aborts the request) once the check is done
        content, xargs = reqs[i]
        body = {"ignore_eos": True, "return_token_ids": True, **({"vllm_xargs": xargs} if xargs else {})}
        resp = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": content}], max_tokens=LONG, temperature=0.0,
            stream=True, extra_body=body)
        for chunk in resp:
            for ch in chunk.choices:
                counts[i] += len((ch.model_extra or {}).get("token_ids") or [])
            if stop.is_set():
                break
        resp.close()

    def made() -> int:  # output tokens the server has made (all requests)
        return round(metric(scrape(url), "vllm:generation_tokens_total"))

    def wait_until(done, what: str, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            assert time.monotonic() < deadline, f"timed out waiting until {what}"
            time.sleep(0.05)

    made_before = made()
    post(url, "/pause?mode=keep")
    threads = [threading.Thread(target=stream, args=(i,)) for i in range(len(reqs))]
    try:
        for t in threads:
            t.start()

        def settled() -> list[int]:  # every token the server made has reached the clients
            wait_until(lambda: sum(counts) == made() - made_before, "the clients have every token made")
            return list(counts)

        # The tiny model makes 1500 tokens in about a second: let the engine run in short bursts
        # (resume, pause at once) until every request is past its prefill, then read the pool.
        for _ in range(300):
            post(url, "/resume")
            post(url, "/pause?mode=keep")
            frozen = settled()
            if min(frozen) >= 1 or max(frozen) >= LONG:
                break
        usage = metric(scrape(url), "vllm:kv_cache_usage_perc")
        assert min(frozen) >= 1 and max(frozen) < LONG, frozen
        want = sum(blocks(plan_of(model, ids, x), len(ids) + g - 1) for ids, (_, x), g in zip(prompts, reqs, frozen))
        stock = sum(math.ceil((len(ids) + g - 1) / BS) * len(GROUP_STAGES) for ids, g in zip(prompts, frozen))
        assert want < stock
        assert round(usage * (pool - 1)) == want, (usage, pool, frozen, want)
    finally:
        stop.set()
        post(url, "/resume")
        for t in threads:
            t.join(120)
    assert len(token_ids(ask(client, model, IMAGE))) == MAX_TOKENS  # aborted streams left a working server
