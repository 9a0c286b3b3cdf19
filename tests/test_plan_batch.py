"""The vectorised step planner (``BatchPlanner``) equals the reference ``plan_step`` on random batches.

The engine's batch changes between steps as vLLM's persistent batch does: requests arrive,
finish, are preempted and come back from 0 computed tokens, and rows are swapped and
condensed. Every step mixes prefill chunks (whole vision items, text between them),
decode, text-only and unpruned (prompt-logprobs) requests.
"""

from __future__ import annotations

import numpy as np
import pytest

from vllm_v2drop.core.batch_planner import BatchPlanner
from vllm_v2drop.core.request_plan import plan_request
from vllm_v2drop.core.step_plan import SplitItemError, plan_step, whole_item_limit

RATIOS = (0.5, 0.25, 0.0)


def random_request(rng) -> dict:
    """Prompt length and items (sorted, disjoint runs of positions, some non-contiguous)."""
    pos, items = int(rng.integers(0, 20)), []
    for _ in range(int(rng.integers(0, 4))):
        n = int(rng.integers(1, 40))
        rows = np.arange(pos, pos + n)
        if n > 4 and rng.random() < 0.3:  # a video-like item with text rows inside its placeholder
            rows = rows[rng.random(n) < 0.8] if (rng.random(n) < 0.8).any() else rows
        items.append(rows)
        pos += n + int(rng.integers(0, 15))
    prompt = pos + int(rng.integers(1, 10))
    return {"prompt": prompt, "items": items, "prune": rng.random() > 0.1}


def next_chunk(rng, req: dict, computed: int) -> int:
    """Tokens a step computes: the rest of the prompt or a random whole-item chunk; 1 in decode."""
    if computed >= req["prompt"]:
        return 1
    want = int(rng.integers(1, req["prompt"] - computed + 1))
    starts = np.asarray([it[0] for it in req["items"]], dtype=np.int64)
    ends = np.asarray([it[-1] + 1 for it in req["items"]], dtype=np.int64)
    n = whole_item_limit(starts, ends, computed, want)
    if n == 0:  # the next item did not fit: take it whole
        i = int(np.searchsorted(starts, computed))
        n = int(ends[i]) - computed
    return n


@pytest.mark.parametrize("seed", range(40))
def test_batch_planner_equals_plan_step(seed):
    rng = np.random.default_rng(seed)
    plans, reqs, computed = {}, {}, {}
    planner = BatchPlanner(len(RATIOS), lambda rid: plans[rid])
    order: list[str] = []
    next_id = 0
    for _ in range(60):
        # arrivals, finishes, preemptions, swaps (vLLM's persistent batch moves rows around)
        for _ in range(int(rng.integers(0, 4))):
            rid = f"r{next_id}"
            next_id += 1
            reqs[rid] = random_request(rng)
            plans[rid] = plan_request(reqs[rid]["items"], reqs[rid]["prompt"], RATIOS, prune=reqs[rid]["prune"])
            computed[rid] = 0
            order.append(rid)
        if order and rng.random() < 0.3:
            order.pop(int(rng.integers(len(order))))
        if order and rng.random() < 0.2:
            computed[order[int(rng.integers(len(order)))]] = 0  # preempted and resumed: recomputed from 0
        if len(order) > 1 and rng.random() < 0.5:
            i, j = rng.integers(len(order), size=2)
            order[i], order[j] = order[j], order[i]
        if not order:
            continue
        nc = np.asarray([computed[r] for r in order])
        ns = np.asarray([next_chunk(rng, reqs[r], computed[r]) for r in order])
        planner.sync(order)
        fast = planner.plan(nc, ns)
        ref = plan_step([plans[r] for r in order], nc, ns)
        if fast is None:
            assert not ref.has_candidates and not ref.compacted
        else:
            for field in ("query_lens", "seq_lens", "kv_starts", "segment", "token_index",
                          "seg_counts", "seg_request", "seg_item"):
                np.testing.assert_array_equal(getattr(fast, field), getattr(ref, field), err_msg=field)
        for r, n in zip(order, ns):
            computed[r] += int(n)


def test_decode_step_plans_no_request():
    """A pure decode step never calls plan_step per request: only the planner's arrays."""
    plans = {f"r{i}": plan_request([np.arange(5, 5 + 576)], 600, (0.5, 0.5, 0.0)) for i in range(256)}
    calls = []

    def plan_of(rid):
        calls.append(rid)
        return plans[rid]

    planner = BatchPlanner(3, plan_of)
    ids = list(plans)
    planner.sync(ids)
    assert len(calls) == 256
    step = planner.plan(np.full(256, 700), np.ones(256, np.int64))
    planner.sync(ids[::-1])  # reordered: no request is planned again
    assert len(calls) == 256
    assert step.seq_lens[:, 0].tolist() == [701, 701 - 288, 701 - 432, 701 - 575]
    assert not step.has_candidates


def test_split_item_is_refused_with_a_clear_message():
    plan = plan_request([np.arange(16, 352)], 400, RATIOS)
    with pytest.raises(SplitItemError, match=r"computes prompt positions \[159, 389\).*vision item 0"):
        plan_step([plan], np.asarray([159]), np.asarray([230]))
    planner = BatchPlanner(3, lambda rid: plan)
    planner.sync(["a"])
    with pytest.raises(SplitItemError, match="part of vision item 0"):
        planner.plan(np.asarray([16]), np.asarray([100]))


def test_whole_item_limit():
    starts, ends = np.asarray([16, 400]), np.asarray([352, 500])
    assert whole_item_limit(starts, ends, 0, 100) == 16  # stops before the item
    assert whole_item_limit(starts, ends, 16, 230) == 0  # at the item's start: waits for room
    assert whole_item_limit(starts, ends, 16, 336) == 336  # the whole item
    assert whole_item_limit(starts, ends, 0, 420) == 400  # first item whole, second not
    assert whole_item_limit(starts, ends, 352, 10) == 10  # text between items
    assert whole_item_limit(starts, ends, 500, 1) == 1  # decode
    assert whole_item_limit(np.zeros(0), np.zeros(0), 0, 50) == 50  # text only


@pytest.mark.parametrize("seed", range(20))
def test_steps_after_every_item_equal_plan_step(seed):
    """The planner's path for steps in which every request has computed all its items (every
    decode step; text chunks after the last item too): equal to plan_step, step after step with
    the same batch (the planner's sync then compares one list), reordered, and grown."""
    rng = np.random.default_rng(1000 + seed)
    reqs = [random_request(rng) for _ in range(int(rng.integers(1, 30)))]
    plans = {f"r{i}": plan_request(r["items"], r["prompt"], RATIOS, prune=r["prune"]) for i, r in enumerate(reqs)}
    planner = BatchPlanner(len(RATIOS), lambda rid: plans[rid])
    order = list(plans)
    computed = {rid: max([int(it[-1]) + 1 for it in r["items"]] or [0]) + int(rng.integers(0, 5))
                for rid, r in zip(order, reqs)}
    for step in range(6):
        if step == 3:
            rng.shuffle(order)
        nc = np.asarray([computed[r] for r in order])
        ns = np.ones(len(order), np.int64) if step % 2 == 0 else rng.integers(1, 4, len(order))
        planner.sync(list(order))
        fast = planner.plan(nc, ns)
        ref = plan_step([plans[r] for r in order], nc, ns)
        if fast is None:
            assert not ref.has_candidates and not ref.compacted
        else:
            assert not fast.has_candidates
            for field in ("query_lens", "seq_lens", "kv_starts", "segment", "token_index",
                          "seg_counts", "seg_request", "seg_item"):
                np.testing.assert_array_equal(getattr(fast, field), getattr(ref, field), err_msg=field)
            # the views the planner knows from its rows are those the arrays show
            assert fast.same_view is not None
            assert [fast.same_view_as_before(s) for s in range(len(RATIOS) + 1)] == \
                [ref.same_view_as_before(s) for s in range(len(RATIOS) + 1)]
            # a pure decode step (the runner's one-row-per-request path) exactly where the arrays say so
            assert fast.decode == bool((ref.query_lens == 1).all() and not ref.has_candidates)
            assert fast.decode == (step % 2 == 0 or bool((ns == 1).all()))
        for r, n in zip(order, ns):
            computed[r] += int(n)
    nc_before = np.asarray([computed[r] for r in order])
    step = planner.plan(nc_before, np.ones(len(order), np.int64))
    if step is not None:  # the plan holds its own copy of the computed counts
        nc_before += 1
        np.testing.assert_array_equal(step.token_index, nc_before - 1)


def test_decode_step_knows_which_stages_see_the_same_rows():
    """A stage that keeps every row of the stage before sees the same KV view (the runner then
    reuses that stage's attention metadata); the planner says so from its rows, as the arrays do."""
    plans = {f"r{i}": plan_request([np.arange(5, 5 + 64 * (i + 1))], 400 + 64 * i, (0.5, 1.0, 0.25)) for i in range(4)}
    planner = BatchPlanner(3, lambda rid: plans[rid])
    planner.sync(list(plans))
    nc = np.asarray([700 + 64 * i for i in range(4)])
    step = planner.plan(nc, np.ones(4, np.int64))
    ref = plan_step(list(plans.values()), nc, np.ones(4, np.int64))
    assert step.same_view == (False, False, True, False)
    assert [ref.same_view_as_before(s) for s in range(4)] == [False, False, True, False]
    np.testing.assert_array_equal(step.seq_lens, ref.seq_lens)
