"""Scores and the segmented top-k, against brute force."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_v2drop.core.scorers import SCORERS, Scorer, random_scores, register, stage_scores
from vllm_v2drop.core.selection import kept_rows, segmented_topk_keep

# ----------------------------------------------------------------- metrics


def test_l2_l1_cosine_on_known_vectors():
    cur = torch.tensor([[3.0, 4.0], [1.0, 0.0], [1.0, 1.0]])
    prev = torch.tensor([[0.0, 0.0], [0.0, 1.0], [2.0, 2.0]])
    assert stage_scores("l2", cur, prev).tolist() == pytest.approx([5.0, math.sqrt(2), math.sqrt(2)])
    assert stage_scores("l1", cur, prev).tolist() == pytest.approx([7.0, 2.0, 2.0])
    # Negated similarity: orthogonal -> 0, parallel -> -1; zero vector -> 0 (eps).
    assert stage_scores("cosine", cur, prev).tolist() == pytest.approx([0.0, 0.0, -1.0], abs=1e-6)
    assert stage_scores("none", cur, prev).tolist() == [0.0, 0.0, 0.0]


def test_scores_are_float32_from_half_inputs():
    cur = torch.full((4, 8), 300.0, dtype=torch.bfloat16)
    prev = torch.zeros(4, 8, dtype=torch.bfloat16)
    for metric in ("l2", "l1", "cosine", "none"):
        out = stage_scores(metric, cur, prev)
        assert out.dtype == torch.float32 and out.shape == (4,)
    assert stage_scores("l2", cur, prev)[0].item() == pytest.approx(300.0 * math.sqrt(8))


def test_cosine_keeps_lowest_similarity():
    cur = torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0]])
    prev = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    s = stage_scores("cosine", cur, prev)
    keep = segmented_topk_keep(s, torch.zeros(3, dtype=torch.int64), torch.tensor([1]))
    assert keep.tolist() == [False, False, True]


def test_unknown_metric_and_shape_mismatch():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"unknown metric 'l3' \(allowed: l2, l1, cosine, random, none\)"):
        stage_scores("l3", x, x)
    with pytest.raises(ValueError, match="shape"):
        stage_scores("l2", x, torch.zeros(3, 3))
    with pytest.raises(ValueError, match="token_index"):
        stage_scores("random", x, x)


def test_a_metric_is_one_registered_class():
    """A new metric: one Scorer subclass and its registration; the config then accepts it."""
    from vllm_v2drop.config import V2DropConfig

    class Largest(Scorer):
        name = "largest-test"

        def score(self, x_cur, x_prev, *, seed, stage, token_index):
            return x_cur.float().amax(dim=-1)

    try:
        register(Largest)
        x = torch.tensor([[1.0, 5.0], [3.0, 2.0]])
        assert stage_scores("largest-test", x, x).tolist() == [5.0, 3.0]
        assert V2DropConfig(metric="largest-test").resolve(8, "LlavaForConditionalGeneration").metric == "largest-test"
        with pytest.raises(ValueError, match="already registered"):
            register(Largest)
    finally:
        SCORERS.pop("largest-test", None)


# ------------------------------------------------------------ random scores

M = 0xFFFFFFFF


def _reference_random(seed: int, stage: int, index: int) -> float:
    """Re-implemented from random_scores' docstring."""
    x = (seed * 0x9E3779B1 + stage * 0x85EBCA77 + index * 0xC2B2AE3D) & M
    x ^= x >> 15
    x = (x * 0x2C1B3C6D) & M
    x ^= x >> 12
    x = (x * 0x297A2D39) & M
    x ^= x >> 15
    return (x & 0xFFFFFF) / 2**24


def test_random_scores_match_documented_formula():
    idx = torch.tensor([0, 1, 2, 575, 2**31, 2**40 + 7, 123456789], dtype=torch.int64)
    for seed, stage in ((0, 1), (42, 3), (-5, 2), (2**40, 1)):
        got = random_scores(seed, stage, idx)
        assert got.dtype == torch.float32
        assert got.tolist() == [_reference_random(seed, stage, i) for i in idx.tolist()]
        assert bool(((got >= 0) & (got < 1)).all())


def test_random_scores_deterministic_and_batch_independent():
    idx = torch.arange(100)
    a = random_scores(7, 1, idx)
    assert torch.equal(a, random_scores(7, 1, idx))
    # A request's rows score the same alone or packed after another request.
    packed = torch.cat([torch.arange(37), idx])
    assert torch.equal(random_scores(7, 1, packed)[37:], a)
    assert not torch.equal(a, random_scores(8, 1, idx))
    assert not torch.equal(a, random_scores(7, 2, idx))
    # Roughly uniform.
    big = random_scores(0, 1, torch.arange(20000))
    assert abs(big.mean().item() - 0.5) < 0.02


def test_stage_scores_dispatch():
    x = torch.randn(5, 4)
    y = torch.randn(5, 4)
    assert list(SCORERS) == ["l2", "l1", "cosine", "random", "none"]
    assert torch.equal(stage_scores("l2", x, y), torch.linalg.vector_norm(x - y, dim=-1))
    idx = torch.arange(5)
    assert torch.equal(stage_scores("random", x, y, seed=3, stage=2, token_index=idx), random_scores(3, 2, idx))


# ------------------------------------------------------------ segmented top-k


def _brute_force(scores: list[float], segment: list[int], k: list[int]) -> list[bool]:
    keep = [s < 0 for s in segment]
    for j, kj in enumerate(k):
        rows = [i for i, s in enumerate(segment) if s == j]
        for i in sorted(rows, key=lambda i: (-scores[i], i))[:kj]:
            keep[i] = True
    return keep


@st.composite
def packed_batches(draw):
    """Segments of 1..12 rows (possibly several requests) interleaved with non-candidate rows."""
    num_segments = draw(st.integers(0, 6))
    sizes = [draw(st.integers(1, 12)) for _ in range(num_segments)]
    k = [draw(st.integers(0, n + 2)) for n in sizes]  # covers k=0, k=1, k=n, k>n
    segment: list[int] = []
    for j, n in enumerate(sizes):
        segment += [-1] * draw(st.integers(0, 3)) + [j] * n
    segment += [-1] * draw(st.integers(0, 3))
    # Small integers force ties; floats also exercised.
    if draw(st.booleans()):
        scores = [float(draw(st.integers(0, 3))) for _ in segment]
    else:
        scores = [draw(st.floats(-10, 10, allow_nan=False, width=32)) for _ in segment]
    return scores, segment, k, sizes


@settings(max_examples=400, deadline=None)
@given(packed_batches())
def test_segmented_topk_matches_brute_force(batch):
    scores, segment, k, sizes = batch
    want = _brute_force(scores, segment, k)
    args = (
        torch.tensor(scores, dtype=torch.float32),
        torch.tensor(segment, dtype=torch.int64),
        torch.tensor(k, dtype=torch.int64),
    )
    assert segmented_topk_keep(*args, torch.tensor(sizes, dtype=torch.int64)).tolist() == want
    assert segmented_topk_keep(*args).tolist() == want  # seg_sizes computed on the device
    keep = torch.tensor(want, dtype=torch.bool)
    num_kept = sum(want)
    assert kept_rows(keep, num_kept).tolist() == [i for i, w in enumerate(want) if w]


def test_segmented_topk_simple_cases():
    scores = torch.tensor([1.0, 5.0, 5.0, 2.0, 9.0, 0.0])
    segment = torch.tensor([-1, 0, 0, 0, 1, 1])
    keep = segmented_topk_keep(scores, segment, torch.tensor([1, 1]), torch.tensor([3, 2]))
    assert keep.tolist() == [True, True, False, False, True, False]  # tie 5.0/5.0 -> lower index
    # No segments at all, and no rows at all.
    assert segmented_topk_keep(scores, torch.full((6,), -1), torch.zeros(0, dtype=torch.int64)).all()
    empty = torch.zeros(0)
    assert segmented_topk_keep(empty, empty.long(), torch.tensor([0])).shape == (0,)
    # NaN is the lowest score.
    keep = segmented_topk_keep(torch.tensor([float("nan"), 0.0]), torch.tensor([0, 0]), torch.tensor([1]))
    assert keep.tolist() == [False, True]


def test_kept_rows_order():
    keep = torch.tensor([False, True, True, False, True])
    assert kept_rows(keep, 3).tolist() == [1, 2, 4]
    assert kept_rows(keep, 0).tolist() == []


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu():
    g = torch.Generator().manual_seed(0)
    cur = torch.randn(300, 64, generator=g)
    prev = torch.randn(300, 64, generator=g)
    for metric in ("l2", "l1", "cosine"):
        torch.testing.assert_close(
            stage_scores(metric, cur.cuda(), prev.cuda()).cpu(), stage_scores(metric, cur, prev)
        )
    idx = torch.randint(0, 2**40, (300,), generator=g)
    assert torch.equal(random_scores(3, 2, idx.cuda()).cpu(), random_scores(3, 2, idx))
    scores = torch.randint(0, 4, (300,), generator=g).float()
    segment = torch.arange(300) // 50 - 1  # -1 for the first 50 rows, then 5 segments
    k = torch.tensor([0, 1, 25, 50, 60])
    want = segmented_topk_keep(scores, segment, k)
    got = segmented_topk_keep(scores.cuda(), segment.cuda(), k.cuda())
    assert torch.equal(got.cpu(), want)
    n = int(want.sum())
    assert torch.equal(kept_rows(got, n).cpu(), kept_rows(want, n))
