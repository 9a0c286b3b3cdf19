"""The worker's stash (``chunked_items``), on CPU tensors: rows held at the first drop layer come back
in place, so the step that completes an item sees exactly the rows an unsplit step would."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vllm_v2drop.core.request_plan import plan_request
from vllm_v2drop.core.step_plan import SplitItemError, plan_step
from vllm_v2drop.worker.stash import Stash

RATIOS = (0.5, 0.25)
H = 4


def run_first_cut(stash: Stash, plans, ids, nc, ns):
    """One step's exchange at the first drop layer, with each row's values its original position."""
    step = plan_step(plans, np.asarray(nc), np.asarray(ns), chunked=True)
    chunk = stash.begin(step, ids)
    for name in ("stash_index", "merge", "merged_segment", "merged_token_index"):
        setattr(chunk, {"merged_segment": "segment", "merged_token_index": "token_index"}.get(name, name),
                torch.from_numpy(getattr(step, name)))
    pos = torch.from_numpy(step.token_index).double()
    hidden, residual = pos[:, None].repeat(1, H), 2 * pos[:, None].repeat(1, H)
    positions = torch.stack([pos.long()] * 3)  # M-RoPE-like [3, T]
    total = len(pos)
    out = chunk.exchange(hidden, residual, positions, torch.arange(total), pos.float() / 7, total)
    return step, out


def test_rows_come_back_in_place_across_chunks():
    a = plan_request([np.arange(3, 40)], 50, RATIOS)  # one item of 37 rows
    b = plan_request([np.arange(2, 12), np.arange(15, 30)], 33, RATIOS)
    stash = Stash()
    nc, done = {"a": 0, "b": 0}, {}
    budgets = [(9, 5), (9, 5), (9, 5), (9, 5), (9, 5), (9, 5), (9, 5)]
    for na, nb in budgets:
        ids = [r for r in ("a", "b") if nc[r] < {"a": 50, "b": 33}[r]]
        plans = [{"a": a, "b": b}[r] for r in ids]
        ns = [min({"a": na, "b": nb}[r], {"a": 50, "b": 33}[r] - nc[r]) for r in ids]
        step, (hidden, residual, positions, rows, scores) = run_first_cut(stash, plans, ids, [nc[r] for r in ids], ns)
        tok = torch.from_numpy(step.merged_token_index).double()
        assert torch.equal(hidden[:, 0], tok) and torch.equal(residual[:, 0], 2 * tok)
        assert torch.equal(positions[2], tok.long()) and torch.equal(scores, tok.float() / 7)
        assert len(rows) == len(step.merge)
        assert (rows >= int(sum(ns))).sum() == int(step.resume_rows[step.resume_done].sum())  # no output rows
        for g, r in enumerate(step.seg_request.tolist()):
            done.setdefault(ids[r], []).append(int(step.seg_item[g]))
        for r, n in zip(ids, ns):
            nc[r] += n
    assert done == {"a": [0], "b": [0, 1]}
    assert not stash.held and stash.nbytes == 0 and stash.peak > 0


def test_the_completing_step_sees_the_unsplit_rows():
    plan = plan_request([np.arange(3, 40)], 50, RATIOS)
    whole = plan_step([plan], np.asarray([0]), np.asarray([50]))
    stash = Stash()
    for c, n in ((0, 10), (10, 17)):
        run_first_cut(stash, [plan], ["a"], [c], [n])
    step, (hidden, *_rest) = run_first_cut(stash, [plan], ["a"], [27], [23])
    seg = step.merged_segment
    assert torch.equal(hidden[:, 0], torch.from_numpy(step.merged_token_index).double())
    np.testing.assert_array_equal(step.merged_token_index[seg >= 0], whole.token_index[whole.segment >= 0])
    assert step.num_rows(1) == whole.num_rows(1) - 3  # the 3 text rows before the item were in the first step


def test_resuming_without_held_rows_is_refused():
    plan = plan_request([np.arange(3, 40)], 50, RATIOS)
    stash = Stash()
    with pytest.raises(SplitItemError):
        run_first_cut(stash, [plan], ["a"], [10], [5])
    run_first_cut(stash, [plan], ["a"], [0], [10])
    with pytest.raises(SplitItemError):  # 7 rows held, the step says 9
        run_first_cut(stash, [plan], ["a"], [12], [5])


def test_held_rows_are_freed():
    plan = plan_request([np.arange(3, 40)], 50, RATIOS)
    stash = Stash()
    run_first_cut(stash, [plan], ["a"], [0], [10])
    run_first_cut(stash, [plan], ["b"], [0], [20])
    assert set(stash.held) == {"a", "b"} and stash.nbytes > 0
    stash.forget(["a"])  # finished, aborted or preempted
    assert set(stash.held) == {"b"}
    run_first_cut(stash, [plan], ["b"], [0], [2])  # b starts over (preempted, recomputed from 0)
    assert not stash.held and stash.nbytes == 0
