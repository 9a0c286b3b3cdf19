"""The count logic: keep counts, per-layer rows, the retention solver, request plans."""

from __future__ import annotations

import numpy as np
import pytest

from vllm_v2drop.core.counts import (
    average_retention,
    keep_counts,
    rows_per_layer,
    solve_keep_ratios,
    stage_of_layer,
)
from vllm_v2drop.core.request_plan import plan_request

LLAVA = ((3, 17, 22), (0.5, 0.5, 0.0), 32)
QWEN = ((3, 16, 22), (0.25, 0.05, 0.0), 28)


def test_keep_counts_reference_schedule():
    assert keep_counts(576, (0.5, 0.5, 0.0)) == (288, 144, 1)


def test_keep_counts_epsilon_and_min_keep():
    assert keep_counts(100, (0.29,)) == (29,)  # 0.29 * 100 == 28.999999999999996
    assert keep_counts(30, (0.1,)) == (3,)
    assert keep_counts(10, (0.0,), min_keep=4) == (4,)
    assert keep_counts(3, (0.0,), min_keep=4) == (3,)  # never more than present
    assert keep_counts(0, (0.5, 0.0)) == (0, 0)
    assert keep_counts(7, (1.0, 1.0)) == (7, 7)


def test_spec_table_llava():
    rows = rows_per_layer(576, *LLAVA)
    assert rows == [576] * 3 + [288] * 14 + [144] * 5 + [1] * 10
    assert sum(rows) / 32 == pytest.approx(202.8, abs=0.05)
    assert average_retention(576, *LLAVA) == pytest.approx(0.352, abs=5e-4)


def test_spec_table_qwen2_vl():
    n = 1000
    rows = rows_per_layer(n, *QWEN)
    assert rows == [n] * 3 + [n // 4] * 13 + [12] * 6 + [1] * 6  # 12 = floor(0.05 * 250), ~1.25% of n


def test_stage_of_layer():
    assert stage_of_layer((3, 17, 22), 32).tolist() == [0] * 3 + [1] * 14 + [2] * 5 + [3] * 10
    assert stage_of_layer((), 4).tolist() == [0, 0, 0, 0]


@pytest.mark.parametrize(
    "bad",
    [((3, 3), (0.5, 0.5), 8), ((0,), (0.5,), 8), ((8,), (0.5,), 8), ((3,), (1.5,), 8), ((3,), (0.5, 0.5), 8)],
)
def test_rows_per_layer_rejects_bad_schedules(bad):
    with pytest.raises(ValueError):
        rows_per_layer(576, *bad)


@pytest.mark.parametrize("target,rows", [(0.333, 192), (0.222, 128), (0.111, 64), (1 / 3, 192), (2 / 9, 128)])
def test_solver_lands_within_one_row(target, rows):
    ratios, achieved = solve_keep_ratios((3, 17, 22), 32, target)
    assert abs(achieved * 576 - rows) <= 1.0
    assert achieved == average_retention(576, (3, 17, 22), ratios, 32)
    assert ratios[-1] == 0.0  # follows the reference schedule's shape


def test_solver_is_closest_and_deterministic():
    for target in (0.05, 0.2, 0.3, 0.352, 0.6, 0.9, 1.0):
        ratios, achieved = solve_keep_ratios((3, 17, 22), 32, target)
        assert solve_keep_ratios((3, 17, 22), 32, target) == (ratios, achieved)
        if 0.1 < target:  # inside the reachable range: within one row
            assert abs(achieved - target) * 576 <= 1.0
    # Below the reachable range: the lowest schedule (everything dropped at layer 3).
    ratios, achieved = solve_keep_ratios((3, 17, 22), 32, 0.01)
    assert ratios == (0.0, 0.0, 0.0)
    assert achieved == pytest.approx((3 * 576 + 29) / (32 * 576))
    # One stage.
    ratios, achieved = solve_keep_ratios((16,), 32, 0.75)
    assert ratios == (0.5,) and achieved == pytest.approx(0.75)


# ---------------------------------------------------------------- RequestPlan


def _two_items():
    # Prompt of 40 rows: text 0-4, image A at 5-14 (10 rows), text 15-19,
    # image B at 20-27 (8 rows), text 28-39.
    return plan_request([range(5, 15), np.arange(20, 28)], 40, (0.5, 0.0))


def test_plan_two_items_counts():
    p = _two_items()
    assert p.num_items == 2 and p.num_stages == 2
    assert p.starts.tolist() == [5, 20] and p.ends.tolist() == [15, 28]
    assert p.counts.tolist() == [[10, 5, 1], [8, 4, 1]]
    assert p.total_vision_rows == 18
    assert p.drops_anything


def test_plan_dropped_before_and_compact_len():
    p = _two_items()
    assert p.dropped_before(0, 40) == 0
    assert p.dropped_before(1, 5) == 0
    assert p.dropped_before(1, 15) == 5
    assert p.dropped_before(1, 20) == 5
    assert p.dropped_before(1, 28) == 5 + 4
    assert p.dropped_before(2, 40) == 9 + 7
    assert p.compact_len(2, 40) == 40 - 16
    assert p.compact_len(1, 15) == 10
    # A prefix ending inside an item counts only whole items.
    assert p.dropped_before(1, 10) == 0
    assert p.dropped_before(1, 24) == 5
    lens = np.array([0, 5, 10, 15, 24, 28, 40])
    assert p.dropped_before_many(1, lens).tolist() == [p.dropped_before(1, int(x)) for x in lens]
    assert p.compact_len_many(2, lens).tolist() == [p.compact_len(2, int(x)) for x in lens]


def test_plan_rows_per_layer_and_kv_saved():
    p = _two_items()
    layers, num_layers = (2, 4), 6
    assert p.rows_per_layer(layers, num_layers) == [18, 18, 9, 9, 2, 2]
    assert p.kv_rows_saved(layers, num_layers) == 9 + 9 + 16 + 16
    with pytest.raises(ValueError):
        p.rows_per_layer((2,), num_layers)


def test_plan_last_row_is_never_a_candidate():
    # The image ends the prompt: its last row is the request's last prompt row.
    p = plan_request([range(3, 13)], 13, (0.5,))
    assert p.ends.tolist() == [12] and p.counts.tolist() == [[9, 4]]
    assert p.dropped_before(1, 12) == 5 and p.dropped_before(1, 13) == 5
    # A one-row item at the end disappears from the plan.
    p = plan_request([range(0, 4), [9]], 10, (0.5,))
    assert p.num_items == 1 and p.counts.tolist() == [[4, 2]]


def test_plan_prune_false_drops_nothing():
    p = plan_request([range(5, 15), range(20, 28)], 40, (0.5, 0.0), prune=False)
    assert p.counts.tolist() == [[10, 10, 10], [8, 8, 8]]
    assert not p.drops_anything and not p.pruned
    assert p.dropped_before(2, 40) == 0 and p.compact_len(2, 40) == 40
    assert p.kv_rows_saved((1, 2), 4) == 0


def test_plan_empty_items():
    p = plan_request([[], range(2, 6)], 10, (0.5,))
    assert p.num_items == 1 and p.counts.tolist() == [[4, 2]]
    p = plan_request([], 10, (0.5,))
    assert p.num_items == 0 and p.counts.shape == (0, 2)
    assert p.total_vision_rows == 0 and p.dropped_before(1, 10) == 0
    assert p.rows_per_layer((1,), 3) == [0, 0, 0]


def test_plan_non_contiguous_item():
    # is_embed may leave holes inside a placeholder: positions, not a range.
    p = plan_request([[4, 5, 7, 8, 10]], 20, (0.4,))
    assert p.starts.tolist() == [4] and p.ends.tolist() == [11] and p.counts.tolist() == [[5, 2]]


@pytest.mark.parametrize(
    "items,match",
    [
        ([range(5, 15), range(10, 20)], "overlaps"),
        ([range(20, 28), range(5, 15)], "overlaps or precedes"),
        ([[5, 4, 6]], "strictly increasing"),
        ([[5, 5]], "strictly increasing"),
        ([[38, 39, 40]], "within"),
        ([[-1, 0]], "within"),
    ],
)
def test_plan_rejects_bad_items(items, match):
    with pytest.raises(ValueError, match=match):
        plan_request(items, 40, (0.5,))


# ---- prefix-cache keys of compacted KV (kv_mode: per_stage) -------------------------------------
def _compacted_layout(plan, stage, rng):
    """A stage's compacted rows, built row by row: ``(position, item)`` per row, for one random
    choice of kept rows per item (which rows is the model's; the counts are the plan's)."""
    rows, item_of = [], {int(p): i for i, pos in enumerate(plan.positions) for p in pos}
    kept = {}
    for i, pos in enumerate(plan.positions):
        kept.update((int(p), i) for p in rng.choice(pos, int(plan.counts[i, stage]), replace=False))
    for p in range(plan.num_prompt_tokens):
        i = item_of.get(p)
        if i is None or p in kept:  # kept; a non-candidate row inside an item's span counts as the item's
            rows.append((p, next((k for k, (s, e) in enumerate(zip(plan.starts, plan.ends)) if s <= p < e), -1)))
    return rows


@pytest.mark.parametrize("seed", range(40))
def test_prefix_cache_keys_match_a_row_by_row_layout(seed):
    """``original_rows``, ``block_key_positions`` and ``resume_position`` against a layout built row
    by row: text rows map to their positions, rows inside an item only to the item; block ``j``'s
    key position is the furthest prompt position any of its rows depends on (an item row: the item's
    end); a request holding ``k`` rows resumes at the next row's position, or its item's start."""
    rng = np.random.default_rng(seed)
    n, items, p = int(rng.integers(40, 160)), [], int(rng.integers(0, 12))
    while p < n - 4 and len(items) < 4:
        size = int(rng.integers(1, 30))
        pos = np.arange(p, min(p + size, n - 1))
        if rng.random() < 0.3 and len(pos) > 3:  # a non-candidate row inside (a video timestamp)
            pos = np.delete(pos, len(pos) // 2)
        items.append(pos)
        p = int(pos[-1]) + 1 + int(rng.integers(0, 20))
    plan = plan_request(items, n, (0.5, 0.3, 0.0)[: int(rng.integers(1, 4))], min_keep=int(rng.integers(1, 3)))
    bs = int(rng.choice([2, 4, 8, 16]))
    for stage in range(plan.num_stages + 1):
        layout = _compacted_layout(plan, stage, rng)
        assert len(layout) == plan.compact_len(stage, n)
        pos, item = plan.original_rows(stage, np.arange(len(layout)))
        assert item.tolist() == [i for _, i in layout]
        assert [q for q, i in zip(pos.tolist(), item.tolist()) if i < 0] == [q for q, i in layout if i < 0]
        depends = [q if i < 0 else int(plan.ends[i]) - 1 for q, i in layout]
        blocks = len(layout) // bs
        expect = [max(depends[: (j + 1) * bs]) for j in range(blocks)]
        assert plan.block_key_positions(stage, blocks, bs).tolist() == expect
        for k in range(len(layout)):
            q, i = layout[k]
            assert plan.resume_position(stage, k) == (q if i < 0 else int(plan.starts[i]))
            # resuming there, the stage holds exactly the first k rows, or those before the item
            assert plan.compact_len(stage, plan.resume_position(stage, k)) == (k if i < 0 else
                                                                               [j for j, (_, t) in enumerate(layout) if t == i][0])


def test_stable_end_marks_an_item_cut_by_the_prompt_end():
    assert plan_request([range(4, 10)], 20, (0.5,)).stable_end >= 2**62  # tokens after the prompt too
    cut = plan_request([range(4, 10)], 10, (0.5,))  # the prompt's last row is the item's
    assert cut.stable_end == 4 and cut.counts[0, 0] == 5
    assert cut.keep_ratios == (0.5,) and cut.min_keep == 1
