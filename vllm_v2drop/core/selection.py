"""Which vision rows V2Drop keeps: scores and a segmented top-k, in torch.

Everything here runs on CPU and CUDA without a device-to-host sync: no
``.item()``, no ``.tolist()``, no ``nonzero()`` or boolean-mask indexing with
a data-dependent result size. The counts come from :mod:`vllm_v2drop.core.request_plan`
on the host; only which rows is decided on the device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["kept_rows", "random_scores", "segmented_topk_keep", "stage_scores", "variation_scores"]

_MASK32 = 0xFFFFFFFF


def variation_scores(x_cur: torch.Tensor, x_prev: torch.Tensor, metric: str) -> torch.Tensor:
    """How much each row changed between two layers' residual-stream inputs.

    Args:
        x_cur: ``[N, H]``, the rows' input to layer ``layer_s``.
        x_prev: ``[N, H]``, their input to layer ``layer_s - 1``.
        metric: ``l2`` (``||x_cur - x_prev||_2``, the paper), ``l1`` (L1 norm
            of the same difference), ``cosine`` (the NEGATED cosine similarity
            of ``x_cur`` and ``x_prev``, so that keeping the largest scores
            keeps the least similar rows), ``none`` (zeros; callers never drop
            with it).

    Returns:
        ``[N]`` float32; larger means "more active, keep". Computed in float32.
    """
    if x_cur.shape != x_prev.shape:
        raise ValueError(f"x_cur {tuple(x_cur.shape)} and x_prev {tuple(x_prev.shape)} differ in shape")
    if metric == "none":
        return torch.zeros(x_cur.shape[:-1], dtype=torch.float32, device=x_cur.device)
    cur, prev = x_cur.float(), x_prev.float()
    if metric == "l2":
        return torch.linalg.vector_norm(cur - prev, ord=2, dim=-1)
    if metric == "l1":
        return torch.linalg.vector_norm(cur - prev, ord=1, dim=-1)
    if metric == "cosine":
        return -F.cosine_similarity(cur, prev, dim=-1, eps=1e-8)
    raise ValueError(f"unknown metric {metric!r} (allowed: l2, l1, cosine, none; 'random' uses random_scores)")


def _mul32(h: torch.Tensor, c: int) -> torch.Tensor:
    """``(h * c) mod 2**32`` for ``h`` in ``[0, 2**32)``, without int64 overflow.

    ``h`` is split into 16-bit halves so that every partial product stays
    below ``2**48``.
    """
    lo = (h & 0xFFFF) * c
    hi = ((h >> 16) * c) & 0xFFFF
    return (lo + (hi << 16)) & _MASK32


def random_scores(seed: int, stage: int, token_index: torch.Tensor) -> torch.Tensor:
    """Seeded pseudo-random scores in ``[0, 1)``, a pure function of each row's identity.

    The formula (all values unsigned 32-bit, ``M = 2**32 - 1``)::

        x = (seed * 0x9E3779B1 + stage * 0x85EBCA77 + token_index * 0xC2B2AE3D) & M
        x ^= x >> 15; x = (x * 0x2C1B3C6D) & M
        x ^= x >> 12; x = (x * 0x297A2D39) & M
        x ^= x >> 15
        score = (x & 0xFFFFFF) / 2**24

    ``token_index`` is the row's ORIGINAL index within its request (its prompt
    position), so the rows a request keeps do not depend on what else is in the
    batch. On the device the products are formed from 16-bit halves, so no int64
    overflow occurs and CPU and CUDA give bit-identical results; the division is
    exact in float32.

    Args:
        seed: the config's seed.
        stage: the stage index (1 for the first drop).
        token_index: ``[N]`` int64.

    Returns:
        ``[N]`` float32.
    """
    base = (seed * 0x9E3779B1 + stage * 0x85EBCA77) & _MASK32
    x = (_mul32(token_index.to(torch.int64) & _MASK32, 0xC2B2AE3D) + base) & _MASK32
    x = x ^ (x >> 15)
    x = _mul32(x, 0x2C1B3C6D)
    x = x ^ (x >> 12)
    x = _mul32(x, 0x297A2D39)
    x = x ^ (x >> 15)
    return (x & 0xFFFFFF).to(torch.float32) * (1.0 / (1 << 24))


def stage_scores(
    metric: str,
    x_cur: torch.Tensor,
    x_prev: torch.Tensor,
    *,
    seed: int = 0,
    stage: int = 0,
    token_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scores for any metric: :func:`random_scores` for ``random``, else :func:`variation_scores`."""
    if metric == "random":
        if token_index is None:
            raise ValueError("metric 'random' needs token_index (each row's original index in its request)")
        return random_scores(seed, stage, token_index)
    return variation_scores(x_cur, x_prev, metric)


def segmented_topk_keep(
    scores: torch.Tensor,
    segment: torch.Tensor,
    k: torch.Tensor,
    seg_sizes: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per segment, keep the ``k[j]`` rows with the largest score.

    Args:
        scores: ``[N]`` float; NaN counts as the lowest score.
        segment: ``[N]`` int64 segment id (a vision item of a request) in
            ``[0, num_segments)``, or ``-1`` for rows that are not candidates
            (text, the last prompt row, rows of unpruned requests): always kept.
        k: ``[num_segments]`` int64, rows to keep per segment (``>= size``
            keeps all).
        seg_sizes: ``[num_segments]`` int64, rows per segment; must equal the
            number of rows carrying each id. Computed on the device when None.

    Returns:
        ``[N]`` bool keep mask. Ties go to the lower row index.

    Method: a stable sort by score (descending), then a stable sort by segment
    id puts each segment's rows together, best first, ties in row order; a
    row's rank is its sorted position minus its segment's start (exclusive
    cumsum of ``seg_sizes``); ``keep = rank < k[segment]``, scattered back.
    """
    n = scores.shape[0]
    num_segments = k.shape[0]
    device = scores.device
    if n == 0 or num_segments == 0:
        return torch.ones(n, dtype=torch.bool, device=device)
    segment = segment.to(torch.int64)
    candidate = segment >= 0
    if seg_sizes is None:
        seg_sizes = torch.zeros(num_segments, dtype=torch.int64, device=device).scatter_add_(
            0, segment.clamp(min=0), candidate.to(torch.int64)
        )
    scores = torch.nan_to_num(scores.float(), nan=float("-inf"))
    by_score = torch.sort(scores, descending=True, stable=True).indices
    # Non-candidates sort after every segment.
    seg_key = torch.where(candidate, segment, num_segments)
    order = by_score[torch.sort(seg_key[by_score], stable=True).indices]
    sorted_seg = segment[order]
    seg_idx = sorted_seg.clamp(min=0)
    seg_start = torch.cumsum(seg_sizes.to(torch.int64), 0) - seg_sizes.to(torch.int64)
    rank = torch.arange(n, device=device) - seg_start[seg_idx]
    keep_sorted = (sorted_seg < 0) | (rank < k.to(torch.int64)[seg_idx])
    return torch.empty(n, dtype=torch.bool, device=device).scatter_(0, order, keep_sorted)


def kept_rows(keep: torch.Tensor, num_kept: int) -> torch.Tensor:
    """Indices of the kept rows, in their original order: ``[num_kept]`` int64.

    ``num_kept`` is the host-known number of True entries (from the plan), so
    the output size is static: a stable argsort of ``~keep`` puts the kept
    rows first, in row order.
    """
    return torch.sort(torch.logical_not(keep).to(torch.int32), stable=True).indices[:num_kept]
