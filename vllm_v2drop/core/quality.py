"""What pruning did to one answer, measured by teacher forcing (no vLLM, no torch).

A pruned request finished with answer tokens ``a_1..a_n``. The unpruned model, run once over
the original prompt followed by ``a_1..a_n`` with ``prompt_logprobs=1`` (one prefill, no
decode), gives for every answer position ``i`` its own top-1 token ``t_i`` and the
log-probabilities ``log p(t_i)`` and ``log p(a_i)``. From them:

* **top-1 agreement**: the share of answer tokens the unpruned model would also have chosen
  greedily, ``mean(a_i == t_i)``, in ``[0, 1]``;
* **log-probability gap**: ``mean(log p(t_i) - log p(a_i))``, in nats, ``>= 0``; 0 when every
  answer token is the unpruned model's top-1.

Both are under the unpruned model, conditioned on the pruned answer's own prefix (teacher
forcing): a token the pruned model chose differently does not make every later position
disagree. The live probe (:mod:`vllm_v2drop.frontend.probe`) and the budget finder
(``vllm-v2drop agreement``) both call :func:`measure`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = [
    "AGREEMENT_BUCKETS",
    "GAP_BUCKETS",
    "Agreement",
    "measure",
    "modality_label",
    "percentile",
    "retention_bucket",
    "rows_from_prompt_logprobs",
]

#: Histogram buckets of the live probe's metrics.
AGREEMENT_BUCKETS = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 0.99, 1.0)
GAP_BUCKETS = (0.0, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0)
#: Upper edges of the retention label (a request's average share of vision rows per layer).
RETENTION_EDGES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


@dataclass(frozen=True)
class Agreement:
    """One answer's teacher-forced comparison with the unpruned model."""

    tokens: int  # answer tokens compared
    agreed: int  # of them, the unpruned model's top-1
    logprob_gap: float  # mean of log p(top-1) - log p(answer token), nats

    @property
    def agreement(self) -> float:
        return self.agreed / self.tokens


def measure(answer: Sequence[int], top_ids: Sequence[int], top_logprobs: Sequence[float],
            answer_logprobs: Sequence[float]) -> Agreement:
    """Top-1 agreement and mean log-probability gap of ``answer`` under the unpruned model.

    Row ``i`` of the other arguments belongs to ``answer[i]``: the unpruned model's top-1 token
    at that position, its log-probability, and the log-probability of ``answer[i]``. A row
    whose top-1 is the answer token contributes a gap of exactly 0; so does an exact tie (the
    answer token's log-probability equals the top-1's: it is a top-1 token too, whichever of
    them vLLM lists first), which counts as agreement.
    """
    n = len(answer)
    if not n:
        raise ValueError("an answer of 0 tokens has no agreement")
    if not len(top_ids) == len(top_logprobs) == len(answer_logprobs) == n:
        raise ValueError(f"{n} answer tokens but rows of {len(top_ids)}, {len(top_logprobs)}, "
                         f"{len(answer_logprobs)} values")
    agreed = 0
    gap = 0.0
    for a, t, lt, la in zip(answer, top_ids, top_logprobs, answer_logprobs):
        if int(a) == int(t) or float(la) >= float(lt):
            agreed += 1
            continue
        d = float(lt) - float(la)
        if math.isfinite(d):
            gap += max(d, 0.0)  # top-1 is the maximum; a negative value is rounding
        else:
            gap = math.inf
    return Agreement(n, agreed, gap / n)


def rows_from_prompt_logprobs(prompt_logprobs: Sequence[Mapping | None], answer: Sequence[int],
                              prompt_len: int) -> tuple[list[int], list[float], list[float]]:
    """``(top_ids, top_logprobs, answer_logprobs)`` for :func:`measure`, from a request's
    ``prompt_logprobs`` (vLLM's ``RequestOutput.prompt_logprobs`` with ``prompt_logprobs=1``:
    per prompt position ``None`` or a dict token id -> object with ``.logprob``) over the
    prompt ``prompt[:prompt_len] + answer``."""
    if len(prompt_logprobs) != prompt_len + len(answer):
        raise ValueError(f"{len(prompt_logprobs)} prompt logprob rows for {prompt_len} + {len(answer)} tokens")
    top_ids, top_lps, ans_lps = [], [], []
    for i, a in enumerate(answer):
        row = prompt_logprobs[prompt_len + i]
        if row is None or a not in row:
            raise ValueError(f"no logprob of answer token {a} at answer position {i}")
        others = [k for k in row if k != a]
        top = others[0] if others else a  # with prompt_logprobs=1: the answer token and the top-1
        top_ids.append(top)
        top_lps.append(_logprob(row[top]))
        ans_lps.append(_logprob(row[a]))
    return top_ids, top_lps, ans_lps


def _logprob(entry) -> float:
    return float(getattr(entry, "logprob", entry))


def retention_bucket(retention: float) -> str:
    """The retention label of a request: the upper edge of its tenth (``"0.3"``: in (0.2, 0.3]),
    ``"<1"`` above 0.9, ``"1"`` for an unpruned request."""
    if retention >= 1.0:
        return "1"
    for edge in RETENTION_EDGES:
        if retention <= edge + 1e-12:
            return f"{edge:g}"
    return "<1"


def modality_label(modalities) -> str:
    """``image``, ``video``, or ``image+video`` (sorted, distinct)."""
    return "+".join(sorted(set(modalities))) or "none"


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) with linear interpolation (NumPy's default)."""
    if not values:
        return math.nan
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)
