"""Which vision rows V2Drop keeps: a segmented top-k over the scores, in torch.

Everything here runs on CPU and CUDA without a device-to-host sync: no
``.item()``, no ``.tolist()``, no ``nonzero()`` or boolean-mask indexing with
a data-dependent result size. The counts come from the plan
(:mod:`vllm_v2drop.core.counts`) on the host, the scores from
:mod:`vllm_v2drop.core.scorers`; only which rows is decided on the device.
"""

from __future__ import annotations

import torch

__all__ = ["kept_rows", "segmented_topk_keep"]


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
