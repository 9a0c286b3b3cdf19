"""``kv_mode: per_stage``: blocks for dropped rows are never allocated, so more requests fit.

Real CPU engines on the tiny Qwen2-VL (8 layers), block size 32, prefix caching
off everywhere (V2Drop forces it off; stock vLLM gets the same setting so that
identical prompts do not share blocks). Engines run one at a time: each
module-scoped fixture starts one, runs its workloads, records what the tests
check (vLLM's own ``kv_cache_usage_perc`` / running / preemption metrics after
every engine step, tokens, KV rows) and shuts it down.

Workload geometry (``PROMPT_TEXT`` + one 336x224 image): a 130-token prompt
with 96 vision rows. Schedule ``layers [1, 4, 6]``, ``keep_ratios [0.667, 0.5,
0.0]`` keeps 96 -> 64 -> 32 -> 1 rows, so the stages hold 130 / 98 / 66 / 35
rows: 5 / 4 / 3 / 2 blocks. Per request: stock 5 blocks x 8 layers = 40 layer
pages, V2Drop 5 + 3x4 + 2x3 + 2x2 = 27 (every stage is 2-3 rows into its last
block, so 29 decode tokens fit before any stage needs a new block).
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
from conftest import greedy, llm_engine, make_image, prompt

from vllm_v2drop.core.kv_layout import group_layout, padding_waste
from vllm_v2drop.core.counts import stage_of_layer
from vllm_v2drop.core.request_plan import plan_request

os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # probes run in the worker

ARCH = "qwen2-vl"
DEPTH = 8
BS = 32
SCHEDULE = {"layers": [1, 4, 6], "keep_ratios": [0.667, 0.5, 0.0]}
IDENTITY = {"layers": [3, 5], "keep_ratios": [1.0, 1.0]}  # stages of 3/2/3 layers: vLLM pads two groups
PROMPT_TEXT = "Describe this picture in detail."
IMAGE_SIZE = (336, 224)
STOCK_POOL_BLOCKS = 61  # usable 60 = 12 requests x 5 blocks
CAPACITY_REQUESTS, CAPACITY_TOKENS = 40, 40
INFLIGHT_REQUESTS, INFLIGHT_TOKENS = 3, 8

# A: memory engines (every prompt prefilled in one step); B: fidelity engines (chunked prefill).
ENGINE_A = dict(max_model_len=512, block_size=BS, max_num_batched_tokens=4096, max_num_seqs=64,
                enable_prefix_caching=False, limit_mm_per_prompt={"image": 2}, disable_log_stats=False)
ENGINE_B = dict(max_model_len=1024, block_size=BS, max_num_batched_tokens=672, enable_prefix_caching=False,
                limit_mm_per_prompt={"image": 2}, mm_processor_kwargs={"max_pixels": 336 * 224})


# ------------------------------------------------------------------------------------ helpers


def _page_bytes(model_dir) -> int:
    cfg = json.loads((model_dir / "config.json").read_text())
    text = cfg.get("text_config", cfg)
    head_dim = text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]
    return 2 * text["num_key_value_heads"] * head_dim * 4 * BS  # K and V, float32


def _v2drop(config: dict, kv_mode: str) -> dict:
    return dict(model_impl="v2drop", additional_config={"v2drop": {**config, "kv_mode": kv_mode}})


def _image_request(model_dir, seed: int = 1) -> dict:
    return {"prompt": prompt(model_dir, n_images=1, text=PROMPT_TEXT),
            "multi_modal_data": {"image": make_image(IMAGE_SIZE, seed)}}


def _mixed_requests(model_dir, long: bool = False) -> list[dict]:
    text = " ".join(f"word{i}" for i in range(150)) if long else "Describe."
    return [
        _image_request(model_dir, 1),
        {"prompt": prompt(model_dir, n_images=1, text=text), "multi_modal_data": {"image": make_image((224, 168), 2)}},
        {"prompt": prompt(model_dir, n_images=2, text="Compare. " + text),
         "multi_modal_data": {"image": [make_image((112, 112), 3), make_image((224, 168), 4)]}},
        {"prompt": prompt(model_dir, text="Only text here. " + text)},
    ]


def _metrics(llm) -> dict:
    names = {"vllm:kv_cache_usage_perc": "usage", "vllm:num_requests_running": "running",
             "vllm:num_requests_waiting": "waiting", "vllm:num_preemptions": "preemptions"}
    return {names[m.name]: m.value for m in llm.get_metrics() if m.name in names}


def _run(llm, requests: dict, pool_blocks: int, abort_after: dict | None = None) -> dict:
    """Add ``requests`` (id -> (prompt, params)), step the engine to the end.

    Records vLLM's metrics after every step (blocks in use = usage x usable blocks)
    and the final outputs. ``abort_after``: step number -> ids to abort then.
    """
    engine = llm.llm_engine
    for rid, (p, params) in requests.items():
        engine.add_request(rid, p, params)
    steps, outputs, n = [], {}, 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                outputs[out.request_id] = out
        n += 1
        m = _metrics(llm)
        m["blocks"] = round(m["usage"] * (pool_blocks - 1))
        steps.append(m)
        for rid in (abort_after or {}).get(n, []):
            engine.abort_request([rid])
    return {"steps": steps, "outputs": outputs}


def _groups(llm) -> list[dict]:
    from vllm_v2drop.dev.kv_probe import kv_groups

    return llm.collective_rpc(kv_groups)[0]


def _image_plan(model_dir, prompt_token_ids, keep_ratios):
    from transformers import AutoTokenizer

    pad = AutoTokenizer.from_pretrained(str(model_dir)).convert_tokens_to_ids("<|image_pad|>")
    ids = np.asarray(prompt_token_ids)
    pos = np.flatnonzero(ids == pad)
    items = np.split(pos, np.flatnonzero(np.diff(pos) > 1) + 1) if len(pos) else []
    return plan_request(items, len(ids), keep_ratios)


def _blocks_per_request(groups, plan, num_tokens: int) -> int:
    """Blocks a request of ``num_tokens`` holds: per group, ceil(compact rows of its stage / block size)."""
    total = 0
    for g in groups:
        stage = g["stage"] or 0
        rows = plan.compact_len(min(stage, plan.num_stages), num_tokens)
        total += math.ceil(rows / g["block_size"])
    return total


def _memory_workloads(llm, model_dir) -> dict:
    from vllm import SamplingParams

    groups = _groups(llm)
    pool = groups[0]["num_blocks"]
    req = _image_request(model_dir)
    res = {"groups": groups, "pool": pool}
    params = SamplingParams(temperature=0.0, max_tokens=INFLIGHT_TOKENS, ignore_eos=True)
    res["inflight"] = _run(llm, {f"in{i}": (req, params) for i in range(INFLIGHT_REQUESTS)}, pool)
    params = SamplingParams(temperature=0.0, max_tokens=CAPACITY_TOKENS, ignore_eos=True)
    res["capacity"] = _run(llm, {f"cap{i}": (req, params) for i in range(CAPACITY_REQUESTS)}, pool)
    # Aborts: two right after they are added (still waiting), three while running.
    reqs = {f"ab{i}": (req, params) for i in range(10)}
    res["abort"] = _run(llm, reqs, pool, abort_after={1: ["ab8", "ab9"], 3: ["ab0", "ab3", "ab5"]})
    res["prompt_token_ids"] = next(iter(res["inflight"]["outputs"].values())).prompt_token_ids
    res["mixed"] = [list(o.outputs[0].token_ids) for o in llm.generate(_mixed_requests(model_dir), greedy(16))]
    return res


# ----------------------------------------------------------------------------------- engines


@pytest.fixture(scope="module")
def stock(model_dir):
    with llm_engine(model_dir, kv_cache_memory_bytes=STOCK_POOL_BLOCKS * DEPTH * _page_bytes(model_dir),
                 **ENGINE_A) as llm:
        return _memory_workloads(llm, model_dir)


@pytest.fixture(scope="module")
def per_stage(model_dir):
    with llm_engine(model_dir, kv_cache_memory_bytes=STOCK_POOL_BLOCKS * DEPTH * _page_bytes(model_dir),
                 **ENGINE_A, **_v2drop(SCHEDULE, "per_stage")) as llm:
        return _memory_workloads(llm, model_dir)


@pytest.fixture(scope="module")
def identity(model_dir):
    with llm_engine(model_dir, kv_cache_memory_bytes=STOCK_POOL_BLOCKS * DEPTH * _page_bytes(model_dir),
                 **ENGINE_A, **_v2drop(IDENTITY, "per_stage")) as llm:
        from vllm import SamplingParams

        groups = _groups(llm)
        params = SamplingParams(temperature=0.0, max_tokens=INFLIGHT_TOKENS, ignore_eos=True)
        inflight = _run(llm, {f"in{i}": (_image_request(model_dir), params) for i in range(INFLIGHT_REQUESTS)},
                        groups[0]["num_blocks"])
        mixed = [list(o.outputs[0].token_ids) for o in llm.generate(_mixed_requests(model_dir), greedy(16))]
        return {"groups": groups, "inflight": inflight, "mixed": mixed}


def _fidelity_workload(llm, model_dir) -> dict:
    """Tokens of a chunked-prefill batch, and each request's KV rows per layer while it runs."""
    from vllm import SamplingParams

    from vllm_v2drop.dev.kv_probe import request_kv_rows, zero_kv_cache

    reqs = _mixed_requests(model_dir, long=True)
    outs = llm.generate(reqs, greedy(12))
    res = {"tokens": [list(o.outputs[0].token_ids) for o in outs],
           "prompt_token_ids": [list(o.prompt_token_ids) for o in outs], "rows": []}
    engine = llm.llm_engine
    # The last probe asks for prompt logprobs: that request is not pruned (full KV rows, full blocks).
    probes = [(r, {}) for r in reqs] + [(reqs[0], {"prompt_logprobs": 1})]
    for i, (req, extra) in enumerate(probes):
        llm.collective_rpc(zero_kv_cache)
        rid = f"kv{i}"
        engine.add_request(rid, req, SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True, **extra))
        rows = None
        while rows is None:
            if any(len(o.outputs[0].token_ids) for o in engine.step()):
                rows = llm.collective_rpc(request_kv_rows, args=(rid,))[0]
        engine.abort_request([rid])
        while engine.has_unfinished_requests():
            engine.step()
        res["rows"].append(rows)
    return res


@pytest.fixture(scope="module")
def fidelity(model_dir):
    out = {}
    for mode in ("shared", "per_stage"):
        with llm_engine(model_dir, **ENGINE_B, **_v2drop(SCHEDULE, mode)) as llm:
            out[mode] = _fidelity_workload(llm, model_dir)
    return out


# ------------------------------------------------------------------------------- fast checks


def test_group_layout_matches_vllm_rule():
    assert group_layout([1, 3, 2, 2]) == [(0, 1), (1, 1), (1, 1), (1, 1), (2, 1), (2, 1), (3, 1), (3, 1)]
    assert group_layout([2, 2, 4, 8]) == [(0, 2), (1, 2), (2, 2), (2, 2)] + [(3, 2)] * 4
    assert group_layout([3, 4, 3]) == [(0, 3), (1, 4), (2, 3)]  # max < 1.5 min: G = 4, stages 0 and 2 padded
    assert group_layout([3, 2, 3]) == [(0, 2), (0, 1), (1, 2), (2, 2), (2, 1)]  # G = 2, two 1-layer groups
    assert padding_waste([2, 2, 4, 8]) == 0.0
    assert padding_waste([3, 4, 3]) == pytest.approx(2 / 12)
    assert padding_waste([3, 2, 3]) == pytest.approx(2 / 10)
    # Qwen2-VL-7B reference schedule (3, 16, 22) of 28 layers: 3/13/6/6 -> G = 3, 2 padding pages.
    assert group_layout([3, 13, 6, 6]) == [(0, 3), (1, 3), (1, 3), (1, 3), (1, 2), (1, 2), (2, 3), (2, 3), (3, 3),
                                           (3, 3)]


def test_stage_spec_groups_by_stage():
    """vLLM's own grouping puts each stage in its own group(s); stages never merge."""
    import torch
    from vllm.v1.core.kv_cache_utils import _get_kv_cache_groups_uniform_page_size, is_kv_cache_spec_uniform
    from vllm.v1.kv_cache_interface import FullAttentionSpec, UniformTypeKVCacheSpecs, replace_as

    from vllm_v2drop.seams.kv_cache import V2DropStageSpec

    base = FullAttentionSpec(block_size=BS, num_kv_heads=2, head_size=32, dtype=torch.float32)
    stages = stage_of_layer(SCHEDULE["layers"], DEPTH)
    specs = {f"l{i}": replace_as(base, V2DropStageSpec, stage=int(s), schedule=None) for i, s in enumerate(stages)}
    assert not is_kv_cache_spec_uniform(specs)
    assert UniformTypeKVCacheSpecs.from_specs(specs) is None
    groups = _get_kv_cache_groups_uniform_page_size(specs)
    assert [(g.kv_cache_spec.stage, len(g.layer_names)) for g in groups] == group_layout([1, 3, 2, 2])
    with pytest.raises(AssertionError):
        V2DropStageSpec.merge([specs["l0"], specs["l1"]])


def test_per_stage_refused_without_hybrid_manager():
    from types import SimpleNamespace

    from vllm_v2drop.config import V2DropConfig, V2DropConfigError
    from vllm_v2drop.engine.per_stage import check_per_stage_supported

    schedule = V2DropConfig(**SCHEDULE, kv_mode="per_stage").resolve(DEPTH, "Qwen2VLForConditionalGeneration")
    cfg = SimpleNamespace(
        scheduler_config=SimpleNamespace(disable_hybrid_kv_cache_manager=True),
        model_config=SimpleNamespace(attention_chunk_size=None),
        attention_config=SimpleNamespace(hisparse_config=None),
        use_v2_model_runner=False,
    )
    with pytest.raises(V2DropConfigError,
                       match="per_stage cannot run.*disable-hybrid-kv-cache-manager.*kv_mode: shared"):
        check_per_stage_supported(cfg, schedule)
    cfg.scheduler_config.disable_hybrid_kv_cache_manager = None
    assert check_per_stage_supported(cfg, schedule)  # forces the hybrid manager on
    assert cfg.scheduler_config.disable_hybrid_kv_cache_manager is False


# ------------------------------------------------------------------------------ engine checks


def _per_request(res, model_dir, keep_ratios) -> int:
    plan = _image_plan(model_dir, res["prompt_token_ids"], keep_ratios)
    return _blocks_per_request(res["groups"], plan, len(res["prompt_token_ids"]))


def test_start_up_error_without_hybrid_manager(model_dir):
    """Where the engine cannot give stages their own KV groups, config creation fails and says why."""
    from vllm.engine.arg_utils import EngineArgs

    import vllm_v2drop

    vllm_v2drop.register()
    args = EngineArgs(model=str(model_dir), dtype="float32", enforce_eager=True, max_model_len=512,
                      disable_hybrid_kv_cache_manager=True, **_v2drop(SCHEDULE, "per_stage"))
    with pytest.raises(Exception, match="kv_mode: per_stage cannot run on this engine.*disable-hybrid-kv-cache"):
        args.create_engine_config()


@pytest.mark.slow
def test_stage_groups_in_engine(stock, per_stage, identity):
    assert [(g["stage"], len(g["layers"])) for g in stock["groups"]] == [(None, DEPTH)]
    counts = np.bincount(stage_of_layer(SCHEDULE["layers"], DEPTH)).tolist()
    assert [(g["stage"], len(g["layers"])) for g in per_stage["groups"]] == group_layout(counts)
    counts = np.bincount(stage_of_layer(IDENTITY["layers"], DEPTH)).tolist()
    assert [(g["stage"], len(g["layers"])) for g in identity["groups"]] == group_layout(counts)
    # Same memory: a stock block is 8 layer pages, a per-stage block 1.
    assert per_stage["pool"] == stock["pool"] * DEPTH


@pytest.mark.slow
def test_blocks_in_use_match_plan(stock, per_stage, model_dir):
    """N identical image requests in flight: vLLM's usage metric = N x the plan's blocks."""
    assert len(per_stage["prompt_token_ids"]) == 130
    stock_req = _per_request(stock, model_dir, [1.0, 1.0, 1.0])
    v2_req = _per_request(per_stage, model_dir, SCHEDULE["keep_ratios"])
    assert (stock_req, v2_req) == (5, 27)
    for res, per_req in ((stock, stock_req), (per_stage, v2_req)):
        steps = res["inflight"]["steps"]
        assert max(s["running"] for s in steps) == INFLIGHT_REQUESTS
        for s in steps:  # every running request is fully prefilled after its step, no decode growth yet
            assert s["blocks"] == s["running"] * per_req, steps
    # Per request in bytes (layer pages): 27 of 40.
    page_ratio = (v2_req * 1) / (stock_req * DEPTH)
    assert page_ratio == pytest.approx(27 / 40)


@pytest.mark.slow
def test_concurrency_rises_by_planned_factor(stock, per_stage, model_dir):
    stock_req = _per_request(stock, model_dir, [1.0, 1.0, 1.0]) * DEPTH  # layer pages
    v2_req = _per_request(per_stage, model_dir, SCHEDULE["keep_ratios"])
    peaks = {}
    for name, res, per_req_blocks in (("stock", stock, stock_req // DEPTH), ("per_stage", per_stage, v2_req)):
        steps = res["capacity"]["steps"]
        peaks[name] = max(s["running"] for s in steps)
        assert peaks[name] == (res["pool"] - 1) // per_req_blocks  # the pool is the only limit
        early = [s for s in steps[:20] if s["running"]]
        assert all(s["blocks"] == s["running"] * per_req_blocks for s in early), early
    planned = stock_req / v2_req
    print(f"\nKV pages per request: stock {stock_req}, V2Drop {v2_req}; max concurrent requests: "
          f"stock {peaks['stock']}, V2Drop {peaks['per_stage']} (planned x{planned:.3f}); preemptions: "
          f"stock {stock['capacity']['steps'][-1]['preemptions']}, "
          f"V2Drop {per_stage['capacity']['steps'][-1]['preemptions']}")
    assert abs(peaks["per_stage"] - peaks["stock"] * planned) <= 1, (peaks, planned)
    assert peaks["per_stage"] > peaks["stock"]


@pytest.mark.slow
def test_no_leak_after_finish_abort_and_preemption(stock, per_stage):
    for res in (stock, per_stage):
        cap = res["capacity"]
        assert cap["steps"][-1]["preemptions"] > 0  # the workload did preempt and resume
        assert len(cap["outputs"]) == CAPACITY_REQUESTS
        assert all(len(o.outputs[0].token_ids) == CAPACITY_TOKENS for o in cap["outputs"].values())
        tokens = {tuple(o.outputs[0].token_ids) for o in cap["outputs"].values()}
        assert len(tokens) == 1  # preempted-and-recomputed requests give the same tokens
        for name in ("inflight", "capacity", "abort"):
            assert res[name]["steps"][-1]["blocks"] == 0, name
            assert res[name]["steps"][-1]["usage"] == 0.0, name
        ab = res["abort"]["outputs"]
        aborted = {"ab0", "ab3", "ab5", "ab8", "ab9"}
        assert {f"ab{i}" for i in range(10)} - aborted <= set(ab)
        assert all(len(ab[r].outputs[0].token_ids) == CAPACITY_TOKENS for r in ab if r not in aborted)
        assert {r for r in ab if ab[r].outputs[0].finish_reason == "abort"} <= aborted


@pytest.mark.slow
def test_identity_per_stage_gives_stock_tokens(stock, identity, model_dir):
    assert identity["mixed"] == stock["mixed"]
    # Nothing dropped: 5 blocks per group. Stages of 3/2/3 layers make vLLM use 2-layer blocks and
    # split stages 0 and 2 into a 2- and a 1-layer group each; a 1-layer group's blocks are half
    # padding (vLLM's grouping cost): 25 blocks x 2 pages = 50 pages against stock's 40.
    groups = identity["groups"]
    assert sorted(len(g["layers"]) for g in groups) == [1, 1, 2, 2, 2]
    for s in identity["inflight"]["steps"]:
        assert s["blocks"] == s["running"] * 5 * len(groups)


@pytest.mark.slow
def test_metric_none_gives_stock_tokens(stock, model_dir):
    """An engine with metric ``none`` (no schedule at all: the V2Drop model classes with nothing to
    drop) gives stock vLLM's tokens. (Every ratio 1.0: ``identity`` above, and per request on every
    architecture in ``test_engine.py``.)"""
    with llm_engine(model_dir, kv_cache_memory_bytes=STOCK_POOL_BLOCKS * DEPTH * _page_bytes(model_dir),
                    **ENGINE_A, **_v2drop({"metric": "none"}, "shared")) as llm:
        mixed = [list(o.outputs[0].token_ids) for o in llm.generate(_mixed_requests(model_dir), greedy(16))]
    assert mixed == stock["mixed"]


@pytest.mark.slow
def test_fidelity_per_stage_equals_shared(fidelity, model_dir):
    """Same tokens and the same KV rows per layer as shared mode, on a chunked-prefill batch."""
    shared, per_stage = fidelity["shared"], fidelity["per_stage"]
    assert per_stage["tokens"] == shared["tokens"]
    assert per_stage["prompt_token_ids"] == shared["prompt_token_ids"]
    assert max(len(p) for p in shared["prompt_token_ids"]) > ENGINE_B["max_num_batched_tokens"]  # chunked
    stages = stage_of_layer(SCHEDULE["layers"], DEPTH)
    prompts = shared["prompt_token_ids"] + shared["prompt_token_ids"][:1]
    assert len(shared["rows"]) == len(per_stage["rows"]) == len(prompts)
    for k, (rows_s, rows_p, ids) in enumerate(zip(shared["rows"], per_stage["rows"], prompts)):
        names = sorted(rows_s, key=lambda n: int(n.split(".layers.")[1].split(".")[0]))
        assert sorted(rows_p) == sorted(rows_s) and len(names) == DEPTH
        plan = _image_plan(model_dir, ids, SCHEDULE["keep_ratios"])
        pruned = k < len(prompts) - 1  # the prompt-logprobs probe is not pruned
        expected = [plan.compact_len(int(s), len(ids)) if pruned else len(ids) for s in stages]
        for rows in (rows_s, rows_p):
            decoded = rows[names[0]] - len(ids)  # decode rows written so far (every layer has them)
            assert decoded >= 1
            assert [rows[n] - decoded for n in names] == expected
