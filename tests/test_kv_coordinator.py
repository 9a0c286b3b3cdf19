"""The scheduler side of ``kv_mode: per_stage`` without an engine: vLLM's own ``KVCacheManager``
over a per-stage ``KVCacheConfig`` (one group per stage layer, as vLLM groups the tiny models),
built with V2Drop's coordinator class, driven with ``allocate_slots`` as vLLM's scheduler
drives it: prefill in chunks that end between items, decode, speculative lookahead, preemption
(``free``) and recompute, requests interleaved.

Every group must hold exactly ``ceil(compact_len(stage, tokens) / block_size)`` blocks of a request
after each call, ``tokens`` being the most it has asked slots for since its admission (blocks for
rejected speculative tokens stay) (the plan is the single source of counts), and the pool's free count must match.
A decode step whose tokens fit in the blocks every group holds must not call a manager (the
coordinator answers from the request's recorded room), which is what keeps the per-step cost one
lookup per request instead of one call per request and group.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from vllm_v2drop.core.request_plan import plan_request

BS = 16
STAGES = (0, 1, 1, 2, 2, 2, 3, 3)  # stage of each group (one layer each)


def _kv_manager(num_blocks: int):
    from vllm.v1.core.kv_cache_manager import KVCacheManager
    from vllm.v1.kv_cache_interface import KVCacheConfig, KVCacheGroupSpec

    from vllm_v2drop.seams.kv_cache import V2DropStageSpec, building
    from vllm_v2drop.seams.kv_cache import install as register_stage_spec

    register_stage_spec()
    groups = [
        KVCacheGroupSpec([f"layers.{i}"], V2DropStageSpec(block_size=BS, num_kv_heads=1, head_size=8,
                                                          dtype=torch.float32, stage=s, schedule="test"))
        for i, s in enumerate(STAGES)
    ]
    config = KVCacheConfig(num_blocks=num_blocks, kv_cache_tensors=[], kv_cache_groups=groups)
    with building("test"):  # as the V2Drop scheduler builds its manager
        kv = KVCacheManager(config, max_model_len=8192, scheduler_block_size=BS, hash_block_size=BS,
                            enable_caching=False)
    assert type(kv.coordinator).__name__ == "V2DropStageKVCacheCoordinatorNoPrefixCache"
    return kv


def _request(rid: str, num_prompt: int):
    from vllm import SamplingParams
    from vllm.v1.request import Request

    return Request(rid, list(range(num_prompt)), SamplingParams(max_tokens=10_000), None)


def _random_plan(rng: random.Random, num_prompt: int):
    items, pos = [], rng.randrange(0, 40)
    while pos < num_prompt - 60 and len(items) < 4:
        size = rng.randrange(8, 60)
        items.append(list(range(pos, pos + size)))
        pos += size + rng.randrange(0, 30)
    ratios = (rng.choice((0.25, 0.5, 0.9)), rng.choice((0.3, 0.5)), 0.0)
    return plan_request(items, num_prompt, ratios)


def _check(kv, request, plan, num_tokens: int) -> None:
    for gid, (manager, stage) in enumerate(zip(kv.coordinator.single_type_managers, STAGES)):
        held = len(manager.req_to_blocks.get(request.request_id, ()))
        want = math.ceil(plan.compact_len(stage, num_tokens) / BS)
        assert held == want, (request.request_id, gid, stage, num_tokens, held, want)


def _count_manager_calls(kv) -> list[int]:
    calls = [0]
    for manager in kv.coordinator.single_type_managers:
        for name in ("get_num_blocks_to_allocate", "allocate_new_blocks"):
            original = getattr(manager, name)

            def counted(*args, _original=original, **kwargs):
                calls[0] += 1
                return _original(*args, **kwargs)

            setattr(manager, name, counted)
    return calls


@pytest.mark.parametrize("seed", range(6))
def test_blocks_per_group_follow_the_plan(seed):
    rng = random.Random(seed)
    kv = _kv_manager(num_blocks=4000)
    plans = kv.coordinator._v2drop_plans
    pool = kv.block_pool
    usable = pool.get_num_free_blocks()
    calls = _count_manager_calls(kv)
    live = {}
    for r in range(3):
        num_prompt = rng.randrange(120, 400)
        request = _request(f"r{seed}-{r}", num_prompt)
        plans.plans[request.request_id] = plan = _random_plan(rng, num_prompt)
        live[request.request_id] = (request, plan)
    decode_steps = decode_calls = preemptions = 0
    peak = dict.fromkeys(live, 0)
    for step in range(400):
        for rid, (request, plan) in list(live.items()):
            done = request.num_computed_tokens
            if done < request.num_prompt_tokens:  # a prefill chunk ending between items
                ends = [e for e in [*plan.ends.tolist(), request.num_prompt_tokens] if e > done]
                new = min(rng.choice(ends) - done, request.num_prompt_tokens - done)
                lookahead = 0
            else:
                new, lookahead = 1, rng.choice((0, 0, 0, 2))
                decode_steps += 1
            before = calls[0]
            blocks = kv.allocate_slots(request, new, num_lookahead_tokens=lookahead)
            assert blocks is not None
            if new == 1:
                decode_calls += calls[0] - before
            peak[rid] = max(peak[rid], done + new + lookahead)
            _check(kv, request, plan, peak[rid])
            request.num_computed_tokens = done + new
            if done + new >= request.num_prompt_tokens:
                request.append_output_token_ids(7)
            if rng.random() < 0.01:  # preempted: blocks freed, recomputed from 0 later
                kv.free(request)
                preemptions += 1
                _check(kv, request, plan, 0)
                request.num_computed_tokens = peak[rid] = 0
                request.num_prompt_tokens = len(request.all_token_ids)  # recompute prompt + output
                plans.plans[rid] = plan = plan_request(
                    [p.tolist() for p in plan.positions], request.num_prompt_tokens, plan.keep_ratios)
                live[rid] = (request, plan)
        held = sum(len(m.req_to_blocks.get(rid, ())) for m in kv.coordinator.single_type_managers for rid in live)
        assert pool.get_num_free_blocks() == usable - held
    assert decode_steps > 1000 and preemptions
    # A decode step needs a block in some group only where one of the 4 stages crosses a block
    # boundary (at most 4 of every 16 steps); the others call no manager at all. vLLM's own
    # coordinator calls each of the 8 managers twice in every step.
    assert decode_calls < 0.3 * decode_steps * 2 * len(STAGES), (decode_calls, decode_steps)
    for request, _ in live.values():
        kv.free(request)
    assert pool.get_num_free_blocks() == usable


def test_room_is_forgotten_with_the_blocks():
    """A request freed and re-admitted gets its blocks again from the first decode step on; a stale
    room (from blocks it no longer holds) would give it none."""
    kv = _kv_manager(num_blocks=500)
    plans = kv.coordinator._v2drop_plans
    request = _request("a", 100)
    plans.plans["a"] = plan = plan_request([list(range(10, 74))], 100, (0.5, 0.5, 0.0))
    assert kv.allocate_slots(request, 100) is not None
    request.num_computed_tokens = 100
    assert kv.allocate_slots(request, 1) is not None
    assert "a" in kv.coordinator._v2drop_room
    blocks = kv.coordinator.single_type_managers[0].req_to_blocks["a"]
    kv.free(request)
    assert "a" not in kv.coordinator._v2drop_room
    request.num_computed_tokens = 0
    assert kv.allocate_slots(request, 101) is not None
    _check(kv, request, plan, 101)
    # the room check also refuses a request whose first group's block list is not the one recorded
    kv.coordinator._v2drop_room["a"] = (74, 10_000, blocks, len(blocks))
    request.num_computed_tokens = 101
    assert kv.allocate_slots(request, 40) is not None
    _check(kv, request, plan, 141)
