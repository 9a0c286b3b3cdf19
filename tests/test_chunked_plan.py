"""Chunked items: the plan of steps that end inside a vision item equals the unsplit plan.

A simulated engine runs random requests through random step budgets that split items at any
row, mixed with decode and text-only requests, with preemptions (recomputed from 0 or from the
first item's start, the points the plan allows) and batch reordering. It keeps each request's
stash (rows held back at the first drop layer) as the worker does, and checks every step's plan
(``plan_step`` and the ``BatchPlanner``, equal) against the unsplit plan: rows written per stage
are contiguous and total what one whole-prompt step writes, every item is ranked once with its
whole rows, and the rows entering the first drop layer are each request's rows in order.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vllm_v2drop.core.batch_planner import BatchPlanner
from vllm_v2drop.core.request_plan import plan_request
from vllm_v2drop.core.step_plan import SplitItemError, plan_step

RATIOS = (0.5, 0.25, 0.0)
FIELDS = ("query_lens", "seq_lens", "kv_starts", "segment", "token_index", "seg_counts", "seg_request",
          "seg_item", "stash_req", "stash_rows", "stash_item", "resume_req", "resume_rows", "resume_item",
          "resume_done", "rejoin_segment", "rejoin_token_index")


def random_request(rng) -> dict:
    pos, items = int(rng.integers(0, 12)), []
    for _ in range(int(rng.integers(0, 4))):
        n = int(rng.integers(1, 50))
        rows = np.arange(pos, pos + n)
        if n > 4 and rng.random() < 0.3:  # a video-like item with text rows inside its placeholder
            mask = rng.random(n) < 0.8
            rows = rows[mask] if mask.any() else rows
        items.append(rows)
        pos += n + int(rng.integers(0, 10))
    prompt = pos + int(rng.integers(1, 8))
    if items and rng.random() < 0.2:  # the prompt ends with the item: its last row is not a candidate
        prompt = int(items[-1][-1]) + 1
    ratios = RATIOS if rng.random() < 0.8 else (1.0, 0.5, 0.5)
    return {"prompt": prompt, "items": items, "prune": rng.random() > 0.1, "ratios": ratios}


def unsplit(plan, prompt: int) -> np.ndarray:
    """Rows per stage one whole-prompt step writes (the unsplit plan)."""
    return plan_step([plan], np.asarray([0]), np.asarray([prompt])).seq_lens[:, 0]


def check_step(step, plans, order, nc, ns, state) -> None:
    """The step against the simulated engine's state (written rows, stash), then advance it."""
    n_stages = step.num_stages
    np.testing.assert_array_equal(step.query_lens[0], ns)
    resumes = {int(r): (int(k), int(i), bool(d)) for r, k, i, d in
               zip(step.resume_req, step.resume_rows, step.resume_item, step.resume_done)}
    stashes = {int(r): (int(k), int(i)) for r, k, i in zip(step.stash_req, step.stash_rows, step.stash_item)}
    for r, rid in enumerate(order):
        st_ = state[rid]
        plan = plans[rid]
        # every stage writes its rows right after those it holds
        np.testing.assert_array_equal(step.kv_starts[:, r], st_["written"], err_msg=f"{rid} kv_starts")
        held = st_["stash"]
        if r in resumes:
            k, i, _ = resumes[r]
            assert held == (k, i), (rid, held, resumes[r])
        else:  # a step never starts inside an item whose rows it would need from a stash
            assert held is None
            assert plan.split_item(int(nc[r])) < 0 or not plan.defers
        st_["written"] = step.seq_lens[:, r].copy()
    # the rows entering the first drop layer: the step's rows less those stashed, stashed rows back
    merge = step.merge
    total = int(ns.sum())
    n_back = int(step.resume_rows[step.resume_done].sum()) if len(step.resume_req) else 0
    assert len(step.stash_index) == sum(k for k, _ in stashes.values())
    assert sorted(merge.tolist()) == sorted(set(range(total + n_back)) - set(step.stash_index.tolist()))
    seg, tok = step.merged_segment, step.merged_token_index
    if n_stages:
        dropped = int((step.seg_counts[:, 0] - step.seg_counts[:, 1]).sum())
        assert len(merge) == step.num_rows(1) + dropped
    for g in range(len(step.seg_counts)):
        assert int((seg == g).sum()) == int(step.seg_counts[g, 0])  # the whole item is ranked
        r, i = int(step.seg_request[g]), int(step.seg_item[g])
        plan = plans[order[r]]
        np.testing.assert_array_equal(np.sort(tok[seg == g]), plan.positions[i])
        np.testing.assert_array_equal(step.seg_counts[g, : plan.num_stages + 1], plan.counts[i])
        state[order[r]]["ranked"].append(i)
    # per request, merged rows come in position order, starting where stage 1 stands
    starts = np.concatenate([[0], np.cumsum(ns)])
    owner = np.concatenate([np.repeat(np.arange(len(order)), ns),
                            np.concatenate([np.full(k, r) for r, k, d in zip(step.resume_req, step.resume_rows,
                                                                                step.resume_done) if d] or [[]])]
                           ).astype(np.int64)[merge]
    assert (np.diff(owner) >= 0).all()
    for r in range(len(order)):
        t = tok[owner == r]
        assert (np.diff(t) == 1).all() or len(t) == 0 or (np.diff(t) > 0).all()
        assert starts[r + 1] - starts[r] == ns[r]
    # the stash after the step
    for r, rid in enumerate(order):
        held = state[rid]["stash"]
        if r in stashes:
            k, i = stashes[r]
            before = held[0] if held is not None and r in resumes and not resumes[r][2] else 0
            state[rid]["stash"] = (before + k, i)
        elif r in resumes:
            state[rid]["stash"] = None


def simulate(seed: int, steps: int = 50) -> None:
    rng = np.random.default_rng(seed)
    plans, reqs, state = {}, {}, {}
    planner = BatchPlanner(len(RATIOS), lambda rid: plans[rid], chunked=True)
    order: list[str] = []
    finished = []
    next_id = 0
    for _ in range(steps):
        for _ in range(int(rng.integers(0, 3))):
            rid = f"r{next_id}"
            next_id += 1
            req = reqs[rid] = random_request(rng)
            plans[rid] = plan_request(req["items"], req["prompt"], req["ratios"], prune=req["prune"])
            state[rid] = {"written": np.zeros(len(RATIOS) + 1, np.int64), "stash": None, "computed": 0,
                          "ranked": []}
            order.append(rid)
        if order and rng.random() < 0.15:  # preempted: recomputed from 0 or from its first item's start
            rid = order[int(rng.integers(len(order)))]
            plan, s = plans[rid], state[rid]
            point = 0 if rng.random() < 0.5 or not plan.num_items else min(int(plan.starts[0]), s["computed"])
            s["computed"] = point
            s["written"] = np.asarray(plan.compact_lens(point), np.int64)
            s["stash"], s["ranked"] = None, []
        if len(order) > 1 and rng.random() < 0.4:
            i, j = rng.integers(len(order), size=2)
            order[i], order[j] = order[j], order[i]
        if not order:
            continue
        batch = [rid for rid in order if rng.random() < 0.85] or order[:1]  # some wait this step
        budget = int(rng.integers(1, 80))
        nc, ns = [], []
        for rid in batch:
            c, prompt = state[rid]["computed"], reqs[rid]["prompt"]
            n = 1 if c >= prompt else min(prompt - c, budget, int(rng.integers(1, 60)))
            budget = max(budget - n, 1)
            nc.append(c)
            ns.append(n)
        nc, ns = np.asarray(nc, np.int64), np.asarray(ns, np.int64)
        planner.sync(batch)
        fast = planner.plan(nc, ns)
        ref = plan_step([plans[r] for r in batch], nc, ns, chunked=True)
        if fast is None:
            assert not ref.has_candidates and not ref.compacted and not ref.uses_stash
        else:
            for f in FIELDS:
                np.testing.assert_array_equal(getattr(fast, f), getattr(ref, f), err_msg=f)
        check_step(ref, plans, batch, nc, ns, state)
        for rid, n in zip(batch, ns):
            state[rid]["computed"] += int(n)
            req = reqs[rid]
            if state[rid]["computed"] >= req["prompt"] + 3:  # finished: every stage holds the unsplit rows
                plan = plans[rid]
                written = state[rid]["written"]
                whole = unsplit(plan, req["prompt"])
                np.testing.assert_array_equal(written - (state[rid]["computed"] - req["prompt"]), whole)
                assert state[rid]["stash"] is None
                if plan.defers:
                    assert sorted(state[rid]["ranked"]) == list(range(plan.num_items))
                order.remove(rid)
                finished.append(rid)


@pytest.mark.parametrize("seed", range(30))
def test_chunked_plan_equals_unsplit(seed):
    simulate(seed)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 2**31 - 1))
def test_chunked_plan_equals_unsplit_hypothesis(seed):
    simulate(seed, steps=30)


def test_compact_len_inside_an_item():
    """Stage 0 advances with the chunk; later stages hold none of an unfinished item's rows."""
    plan = plan_request([np.arange(4, 24)], 30, (0.5, 0.25))
    assert plan.compact_lens(4) == (4, 4, 4)
    assert plan.compact_lens(10) == (10, 4, 4)
    assert plan.compact_lens(23) == (23, 4, 4)
    assert plan.compact_lens(24) == (24, 14, 6)
    np.testing.assert_array_equal(plan.compact_len_many(1, np.asarray([3, 10, 24, 26])), [3, 4, 14, 16])
    keep_all = plan_request([np.arange(4, 24)], 30, (0.5, 0.25), prune=False)
    assert keep_all.compact_lens(10) == (10, 10, 10)  # a plan that drops nothing defers nothing


def test_split_step_layout():
    """An item split in three chunks: the first two go to the stash, the last brings them back."""
    plan = plan_request([np.arange(4, 24)], 30, (0.5, 0.25))
    first = plan_step([plan], np.asarray([0]), np.asarray([10]), chunked=True)
    assert first.stash_req.tolist() == [0] and first.stash_rows.tolist() == [6]
    assert first.query_lens[:, 0].tolist() == [10, 4, 4] and not first.has_candidates
    middle = plan_step([plan], np.asarray([10]), np.asarray([8]), chunked=True)
    assert middle.resume_rows.tolist() == [6] and not middle.resume_done.any()
    assert middle.stash_rows.tolist() == [8] and middle.query_lens[:, 0].tolist() == [8, 0, 0]
    last = plan_step([plan], np.asarray([18]), np.asarray([9]), chunked=True)
    assert last.resume_rows.tolist() == [14] and last.resume_done.tolist() == [True]
    assert last.query_lens[:, 0].tolist() == [9, 13, 5]  # 10 then 2 kept of 20, then 3 text rows
    assert last.merge.tolist() == list(range(9, 23)) + list(range(9))
    assert last.merged_token_index.tolist() == list(range(4, 27))
    with pytest.raises(SplitItemError):
        plan_step([plan], np.asarray([0]), np.asarray([10]))  # without chunked: refused
