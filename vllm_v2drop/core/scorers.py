"""How V2Drop scores a vision row at a drop stage: one :class:`Scorer` per metric.

A metric is one small class with a ``name`` and a :meth:`Scorer.score`, registered with
:func:`register`; the config accepts exactly the registered names (``metric`` in
``--additional-config``). Scores decide only *which* rows an item keeps: how many comes from
the plan (:mod:`vllm_v2drop.core.counts`), whatever the metric.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

__all__ = ["SCORERS", "Scorer", "get_scorer", "random_scores", "register", "stage_scores"]


class Scorer:
    """One metric: how much each candidate row is worth keeping at a drop stage.

    :meth:`score` runs inside the forward, on the device, for every row of the step (the
    segmented top-k then keeps each item's best). Its contract:

    * returns ``[N]`` float32, larger meaning "more active, keep"; ties go to the lower row;
    * no host-device sync (no ``.item()``, ``.tolist()``, ``nonzero()`` or boolean-mask
      indexing), so a step stays free of stalls and CUDA-graph friendly;
    * a pure function of its arguments: every tensor-parallel rank, and a request alone or
      batched with others, must score a row alike.
    """

    #: The ``metric`` value that selects this scorer.
    name: ClassVar[str] = ""

    def score(self, x_cur: torch.Tensor, x_prev: torch.Tensor, *, seed: int, stage: int,
              token_index: torch.Tensor | None) -> torch.Tensor:
        """Score the ``N`` rows still present before drop stage ``stage``.

        Args:
            x_cur: ``[N, H]``, the rows' residual-stream input to the drop layer ``layer_s``.
            x_prev: ``[N, H]``, their input to layer ``layer_s - 1``.
            seed: the config's ``seed``.
            stage: the stage index (1 for the first drop).
            token_index: ``[N]`` int64, each row's prompt position within its request.
        """
        raise NotImplementedError


#: Metric name -> its scorer, in registration order.
SCORERS: dict[str, Scorer] = {}


def register(cls: type[Scorer]) -> type[Scorer]:
    """Class decorator: make ``cls`` the scorer of the metric ``cls.name``."""
    if not cls.name or cls.name in SCORERS:
        raise ValueError(f"scorer {cls.__name__}: name {cls.name!r} is empty or already registered")
    SCORERS[cls.name] = cls()
    return cls


def get_scorer(metric: str) -> Scorer:
    """The scorer registered for ``metric``; a ``ValueError`` naming the registered ones otherwise."""
    scorer = SCORERS.get(metric)
    if scorer is None:
        raise ValueError(f"unknown metric {metric!r} (allowed: {', '.join(SCORERS)})")
    return scorer


def stage_scores(
    metric: str,
    x_cur: torch.Tensor,
    x_prev: torch.Tensor,
    *,
    seed: int = 0,
    stage: int = 0,
    token_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """``metric``'s :meth:`Scorer.score` of the rows (the drop loop's one call per stage)."""
    if x_cur.shape != x_prev.shape:
        raise ValueError(f"x_cur {tuple(x_cur.shape)} and x_prev {tuple(x_prev.shape)} differ in shape")
    return get_scorer(metric).score(x_cur, x_prev, seed=seed, stage=stage, token_index=token_index)


# ---- the metrics ---------------------------------------------------------------------------------
@register
class L2(Scorer):
    """``||x_cur - x_prev||_2`` in float32: the paper's variation."""

    name = "l2"

    def score(self, x_cur, x_prev, *, seed, stage, token_index):
        return torch.linalg.vector_norm(x_cur.float() - x_prev.float(), ord=2, dim=-1)


@register
class L1(Scorer):
    """The L1 norm of the same difference."""

    name = "l1"

    def score(self, x_cur, x_prev, *, seed, stage, token_index):
        return torch.linalg.vector_norm(x_cur.float() - x_prev.float(), ord=1, dim=-1)


@register
class Cosine(Scorer):
    """The NEGATED cosine similarity of ``x_cur`` and ``x_prev`` (the paper's first version): the
    least similar rows score highest."""

    name = "cosine"

    def score(self, x_cur, x_prev, *, seed, stage, token_index):
        return -F.cosine_similarity(x_cur.float(), x_prev.float(), dim=-1, eps=1e-8)


@register
class Random(Scorer):
    """A seeded baseline: :func:`random_scores` of each row's prompt position."""

    name = "random"

    def score(self, x_cur, x_prev, *, seed, stage, token_index):
        if token_index is None:
            raise ValueError("metric 'random' needs token_index (each row's original index in its request)")
        return random_scores(seed, stage, token_index)


@register
class NoScore(Scorer):
    """Zeros: with metric ``none`` the schedule drops nothing, so nothing is ranked."""

    name = "none"

    def score(self, x_cur, x_prev, *, seed, stage, token_index):
        return torch.zeros(x_cur.shape[:-1], dtype=torch.float32, device=x_cur.device)


# ---- the random metric's hash --------------------------------------------------------------------
_MASK32 = 0xFFFFFFFF


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
