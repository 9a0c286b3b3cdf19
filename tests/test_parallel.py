"""Past one device: tensor, pipeline and data parallelism on the CPU engine (tiny Qwen2-VL).

vLLM's CPU backend runs every rank as its own worker process (shared-memory communicator); on
these 2-core machines each rank is pinned to one core (``VLLM_CPU_OMP_THREADS_BIND=0|1``).
One engine per parallel configuration, each running the same workload (an image, two images,
a video, each alone, then a mixed batch of 9) under a schedule with a stage at layer 4, which
is where PP=2 splits the 8 layers (ranks hold layers 0-3 and 4-7): the first rank cuts that
stage after its last layer and hands the kept rows on. Every engine is compared with the TP=1
engine: greedy tokens, and the trace (kept rows per item per stage), which every worker writes
to its own file (``v2drop-trace-<pid>.jsonl``): TP ranks must each record the whole, identical
trace; PP ranks each record their own stages, merged here by layer.

* TP=2 also runs once with its second rank scoring the opposite way (it would keep the LEAST
  active rows): the kept rows are still rank 0's on both ranks and the tokens are unchanged,
  since rank 0 decides and broadcasts (``runtime.same_on_every_rank``).
* TP=2 and PP=2 run ``kv_mode: per_stage`` (the TP=1 engine runs ``shared``): blocks in use
  equal the plan (vLLM's usage metric; prefix caching off there, so that identical prompts hold
  their own blocks; the TP=1 engine keeps vLLM's default, on).
* PP=2 runs with torch.compile on: vLLM 0.32's CPU runner with ``enforce_eager`` and PP > 1
  fails in stock vLLM too (no intermediate-tensor buffers without a warm-up run).
* DP=2 through ``vllm serve``: a burst of concurrent chats, each answered as the TP=1 engine
  answers it offline, served by both engines' workers (both log V2Drop lines).
"""

from __future__ import annotations

import contextlib
import glob
import json
import math
import os
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

import cloudpickle
import numpy as np
import pytest
from conftest import ensure_model, greedy, llm_engine, make_image, prompt
from test_engine import generate_each, mixed_batch, requests, tokens

from vllm_v2drop.dev.demo import image_data_url, image_part, video_data_url, video_part

pytestmark = pytest.mark.slow
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # probes run in the workers
cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers need not import this file

ARCH = "qwen2-vl"
DEPTH = 8
BS = 32
SCHEDULE = {"layers": [1, 4, 6], "keep_ratios": [0.667, 0.5, 0.0]}  # stage 2 at PP=2's rank boundary
MAX_TOKENS = 12


def _two_core_lists() -> str:
    """``VLLM_CPU_OMP_THREADS_BIND`` for 2 local ranks: this process's CPUs in two halves
    (``0|1`` on a 2-core machine; both ranks on the one core of a 1-core machine)."""
    cpus = sorted(os.sched_getaffinity(0))
    half = max(1, len(cpus) // 2)
    first, second = cpus[:half], cpus[half:] or cpus[:half]
    return "|".join(",".join(map(str, c)) for c in (first, second))


BIND = {"VLLM_CPU_OMP_THREADS_BIND": _two_core_lists()}  # local ranks of TP x PP, or of DP
ENGINE = dict(block_size=BS, max_model_len=1024, kv_cache_memory_bytes=64 << 20)  # prefix caching: vLLM's default
INFLIGHT = 3


def _text(t: str) -> dict:
    return {"type": "text", "text": t}


@lru_cache(maxsize=1)
def chats() -> list[list[dict]]:
    """The DP test's chat contents: an image, two images, a video, text only."""
    return [
        [image_part(image_data_url((160, 120), seed=1)), _text("What is in this image?")],
        [image_part(image_data_url((112, 112), seed=2)), image_part(image_data_url((224, 168), seed=3)),
         _text("Compare the two images.")],
        [video_part(video_data_url(8, (64, 64), seed=4)), _text("What happens in this video?")],
        [_text("Tell me about the sky.")],
    ]


BURST = 12


@pytest.fixture(scope="module")
def model_dir():
    return ensure_model(ARCH)


@contextlib.contextmanager
def parallel_engine(model_dir, **kw):
    """``llm_engine`` with the ranks' thread binding (read when vLLM starts the workers)."""
    old = {k: os.environ.get(k) for k in BIND}
    os.environ.update(BIND)
    try:
        with llm_engine(model_dir, **kw) as llm:
            yield llm
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _v2drop(trace=None, kv_mode: str = "shared") -> dict:
    config = {**SCHEDULE, "kv_mode": kv_mode, **({"trace": str(trace)} if trace else {})}
    return dict(model_impl="v2drop", additional_config={"v2drop": config})


# ------------------------------------------------------------------------------------ workload


def named(model_dir) -> dict[str, dict]:
    return {k: v for k, v in requests(ARCH, model_dir).items() if k != "text"}


def run_workload(llm, model_dir) -> dict:
    """Tokens and engine request ids: the named requests alone, then the mixed batch together."""
    reqs = named(model_dir)
    alone = generate_each(llm, list(reqs.values()), MAX_TOKENS)
    batch = llm.generate(mixed_batch(ARCH, model_dir), greedy(MAX_TOKENS), use_tqdm=False)
    return {"tokens": dict(zip(reqs, tokens(alone))), "batch": tokens(batch),
            "ids": [o.request_id for o in alone + batch]}


def rank_traces(trace_dir) -> list[dict[str, dict]]:
    """Per worker (trace file), its trace lines by engine request id."""
    out = []
    for path in sorted(glob.glob(os.path.join(trace_dir, "*.jsonl"))):
        with open(path) as f:
            out.append({rec["request_id"]: rec for rec in map(json.loads, f)})
    return out


def merged(ranks: list[dict[str, dict]]) -> dict[str, dict]:
    """One trace from the workers' traces: each stage (layer) from the worker(s) that cut it."""
    out = {}
    for trace in ranks:
        for rid, rec in trace.items():
            into = out.setdefault(rid, {"items": [{k: it[k] for k in ("modality", "first", "rows")}
                                                  for it in rec["items"]], "kept": {}})
            assert [it["first"] for it in into["items"]] == [it["first"] for it in rec["items"]]
            for layer, per_item in zip(rec["layers"], zip(*[it["kept"] for it in rec["items"]])):
                # tensor-parallel ranks each record every stage: they must agree
                assert into["kept"].setdefault(layer, list(per_item)) == list(per_item), (rid, layer)
    return out


def in_order(result: dict, trace: dict[str, dict]) -> list[dict]:
    """The trace of every request of ``result`` (with vision items), in workload order, ids dropped."""
    out = []
    for rid in result["ids"]:
        hits = [v for k, v in trace.items() if k == rid or k.startswith(rid + "-")]
        assert len(hits) <= 1
        out.extend({**hits[0], "kept": sorted(hits[0]["kept"].items())} for _ in hits[:1])
    return out


def traced(trace_dir, result) -> tuple[list, list[dict]]:
    ranks = rank_traces(trace_dir)
    return ranks, in_order(result, merged(ranks))


# ------------------------------------------------------------------------------- worker probes


def _contrarian(worker, on: bool) -> None:
    """On every tensor-parallel rank but 0, score rows the opposite way (``on``) or normally again."""
    from vllm.distributed import get_tensor_model_parallel_rank

    from vllm_v2drop.core import scorers
    from vllm_v2drop.worker import runtime

    if get_tensor_model_parallel_rank() == 0:
        return
    runtime.stage_scores = (lambda *a, **kw: -scorers.stage_scores(*a, **kw)) if on else scorers.stage_scores


def _logs_requests(worker) -> bool:
    from vllm_v2drop.worker.runtime import logs_requests

    return logs_requests()


# ------------------------------------------------------------------------------------- engines


@pytest.fixture(scope="module")
def single(model_dir, tmp_path_factory):
    """TP=1: the workload, its trace, and the DP test's chats answered offline."""
    trace = tmp_path_factory.mktemp("tp1")
    with llm_engine(model_dir, **ENGINE, **_v2drop(trace)) as llm:
        res = run_workload(llm, model_dir)
        res["chats"] = [o.outputs[0].text for o in llm.chat(
            [[{"role": "user", "content": c}] for c in chats()], greedy(MAX_TOKENS), use_tqdm=False)]
    res["ranks"], res["trace"] = traced(trace, res)
    return res


def _metrics(llm) -> dict:
    names = {"vllm:kv_cache_usage_perc": "usage", "vllm:num_requests_running": "running"}
    return {names[m.name]: m.value for m in llm.get_metrics() if m.name in names}


def _image_request(model_dir) -> dict:
    return {"prompt": prompt(model_dir, n_images=1, text="Describe this picture in detail."),
            "multi_modal_data": {"image": make_image((336, 224), 1)}}


def parallel_run(model_dir, trace, contrary: bool = False, **parallel) -> dict:
    """One engine per parallel configuration, ``kv_mode: per_stage`` (prefix caching off, so that
    identical prompts hold their own blocks), tracing: every rank's KV groups and the blocks in use
    after every step of 3 identical image requests; then the workload; with ``contrary``, the named
    requests again with every rank but 0 scoring the opposite way."""
    from vllm import SamplingParams

    from vllm_v2drop.dev.kv_probe import kv_groups

    with parallel_engine(model_dir, disable_log_stats=False, max_num_batched_tokens=4096, **parallel,
                         **{**ENGINE, "enable_prefix_caching": False}, **_v2drop(trace, "per_stage")) as llm:
        groups = llm.collective_rpc(kv_groups)
        engine, pool = llm.llm_engine, groups[0][0]["num_blocks"]
        params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
        for i in range(INFLIGHT):
            engine.add_request(f"in{i}", _image_request(model_dir), params)
        steps, outs = [], {}
        while engine.has_unfinished_requests():
            outs.update({o.request_id: o for o in engine.step() if o.finished})
            m = _metrics(llm)
            steps.append({"running": m["running"], "blocks": round(m["usage"] * (pool - 1))})
        res = run_workload(llm, model_dir)
        res.update(groups=groups, steps=steps, prompt=outs["in0"].prompt_token_ids,
                   logs=llm.collective_rpc(_logs_requests))
        if contrary:
            llm.collective_rpc(_contrarian, args=(True,))
            try:
                outs = generate_each(llm, list(named(model_dir).values()), MAX_TOKENS)
            finally:
                llm.collective_rpc(_contrarian, args=(False,))
            res["contrary"] = {"tokens": tokens(outs), "ids": [o.request_id for o in outs]}
    res["ranks"], res["trace"] = traced(trace, res)
    if contrary:
        res["contrary"]["ranks"], res["contrary"]["trace"] = traced(trace, res["contrary"])
    return res


@pytest.fixture(scope="module")
def tp2(model_dir, tmp_path_factory):
    return parallel_run(model_dir, tmp_path_factory.mktemp("tp2"), contrary=True, tensor_parallel_size=2)


@pytest.fixture(scope="module")
def pp2(model_dir, tmp_path_factory):
    # enforce_eager=False: stock vLLM 0.32 on CPU cannot run PP > 1 eagerly (see the module doc)
    return parallel_run(model_dir, tmp_path_factory.mktemp("pp2"), pipeline_parallel_size=2, enforce_eager=False)


# -------------------------------------------------------------------------------------- tests


def _check_trace(res):
    assert res["trace"], "no trace lines"
    for rec in res["trace"]:
        assert [layer for layer, _ in rec["kept"]] == SCHEDULE["layers"]


def test_tp2_equals_tp1(single, tp2):
    """TP=2: the TP=1 tokens and kept rows for image, two-image and video requests and a mixed batch."""
    assert tp2["tokens"] == single["tokens"] and tp2["batch"] == single["batch"]
    _check_trace(single)
    assert len(tp2["trace"]) == len(single["trace"]) == 3 + 7  # the batch: 9 requests, 2 text-only
    assert tp2["trace"] == single["trace"]


def test_tp2_every_rank_records_the_same_kept_rows(tp2):
    ranks = tp2["ranks"]
    assert len(ranks) == 2 and len(ranks[0]) == INFLIGHT + 3 + 7 + 3  # in-flight, the workload, the contrary run
    assert ranks[0] == ranks[1]
    assert all(rec["layers"] == SCHEDULE["layers"] for rec in ranks[0].values())


def test_tp2_rank0_decides(single, tp2):
    """A second rank that would keep other rows (it scores them the opposite way) still keeps and
    caches rank 0's: TP=1's kept rows and tokens."""
    contrary = tp2["contrary"]
    assert contrary["tokens"] == list(single["tokens"].values())
    assert contrary["trace"] == single["trace"][:3]


def test_pp2_equals_tp1(single, pp2):
    """PP=2: TP=1's tokens and kept rows; the first rank cut stage 1 and stage 2 (its boundary)."""
    assert pp2["tokens"] == single["tokens"] and pp2["batch"] == single["batch"]
    assert pp2["trace"] == single["trace"]
    layers = sorted({tuple(rec["layers"]) for rank in pp2["ranks"] for rec in rank.values()})
    assert layers == [(1, 4), (6,)]


def test_one_rank_logs_requests(tp2, pp2):
    """The per-request V2Drop log line comes from one worker of an engine, not from every rank."""
    assert tp2["logs"] == pp2["logs"] == [True, False]


@pytest.mark.parametrize("config", ["tp2", "pp2"])
def test_per_stage_blocks_match_plan(single, config, model_dir, request):
    """``kv_mode: per_stage`` with TP=2 and PP=2: the blocks in use are the plan's; one device's tokens."""
    from vllm_v2drop.core.request_plan import plan_request

    res = request.getfixturevalue(config)
    assert len(res["groups"]) == 2
    if config == "tp2":
        assert res["groups"][0] == res["groups"][1]  # the same KV groups on both ranks
    else:  # the same groups (stages) on both ranks, each with its own layers in them
        assert [g["stage"] for g in res["groups"][0]] == [g["stage"] for g in res["groups"][1]]
        layers = [name for rank in res["groups"] for g in rank for name in g["layers"]]
        assert len(layers) == len(set(layers)) == DEPTH
    groups = res["groups"][0]
    assert sorted({g["stage"] for g in groups}) == [0, 1, 2, 3]
    ids = np.asarray(res["prompt"])
    pad = prompt_pad_id(model_dir)
    plan = plan_request([np.flatnonzero(ids == pad)], len(ids), SCHEDULE["keep_ratios"])
    per_request = sum(math.ceil(plan.compact_len(min(g["stage"], plan.num_stages), len(ids)) / g["block_size"])
                      for g in groups)
    assert per_request < len(groups) * math.ceil(len(ids) / BS)  # fewer blocks than without drops
    assert max(s["running"] for s in res["steps"]) == INFLIGHT
    prefilled = [s for s in res["steps"] if s["running"]]
    assert prefilled and all(s["blocks"] == s["running"] * per_request for s in prefilled), res["steps"]
    assert res["tokens"] == single["tokens"]  # per_stage gives shared's tokens


def prompt_pad_id(model_dir) -> int:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir)).convert_tokens_to_ids("<|image_pad|>")


# ------------------------------------------------------------------------------ data parallel


@pytest.fixture(scope="module")
def dp2(model_dir, tmp_path_factory):
    """``vllm serve --data-parallel-size 2``: the chats one by one, then a burst of concurrent ones."""
    openai = pytest.importorskip("openai")
    from vllm_v2drop.dev.server import serve

    args = ["--model-impl", "v2drop", "--enforce-eager", "--dtype", "float32", "--seed", "0",
            "--block-size", str(BS), "--max-model-len", str(ENGINE["max_model_len"]),
            "--kv-cache-memory-bytes", str(ENGINE["kv_cache_memory_bytes"]),
            "--limit-mm-per-prompt", json.dumps({"image": 2, "video": 1}),
            "--additional-config", json.dumps({"v2drop": SCHEDULE}), "--data-parallel-size", "2"]
    log = tmp_path_factory.mktemp("dp2") / "server.log"
    with serve(model_dir, args, log_path=log, env={**BIND, "VLLM_CPU_KVCACHE_SPACE": None},
               startup_timeout=600) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="EMPTY", max_retries=0, timeout=300)

        def ask(content):
            r = client.chat.completions.create(
                model=str(model_dir), messages=[{"role": "user", "content": content}], max_tokens=MAX_TOKENS,
                temperature=0.0, extra_body={"ignore_eos": True})
            return r.choices[0].message.content, r.id

        sequential = [ask(c) for c in chats()]
        with ThreadPoolExecutor(BURST) as pool:
            burst = list(pool.map(ask, [chats()[i % len(chats())] for i in range(BURST)]))
    return {"sequential": sequential, "burst": burst, "log": log.read_text(errors="replace")}


def test_dp2_serves_a_burst(single, dp2):
    """Every answer, one by one or in a concurrent burst, is the TP=1 engine's; both engines prune."""
    assert [t for t, _ in dp2["sequential"]] == single["chats"]
    assert [t for t, _ in dp2["burst"]] == [single["chats"][i % len(chats())] for i in range(BURST)]
    lines = re.findall(r"\((\w+) pid=(\d+)\)[^\n]*V2Drop request (\S+):", dp2["log"])
    pruned = {rid for _, _, rid in lines}
    vision = [rid for (t, rid), c in zip(dp2["sequential"] + dp2["burst"],
                                         chats() + [chats()[i % len(chats())] for i in range(BURST)])
              if len(c) > 1]
    assert all(any(p.startswith(rid) for p in pruned) for rid in vision)
    assert len({pid for _, pid, _ in lines}) == 2, "both data-parallel engines pruned requests"
