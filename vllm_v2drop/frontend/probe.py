"""The live quality probe: what pruning did to the answers of this server's own traffic.

A sampled share of finished pruned requests (``quality_probe.rate``), and every request that
sends ``vllm_xargs: {"v2drop_probe": true}`` (``false`` exempts one), get one **shadow**
after their answer is complete: the same prompt and vision inputs followed by the answer's
tokens, run unpruned (``v2drop_off``) with ``prompt_logprobs=1`` and one output token. Its
prompt log-probabilities give, per answer token, the unpruned model's top-1 token and its
log-probability of the answer token: :func:`vllm_v2drop.core.quality.measure` turns them into
the request's top-1 agreement and log-probability gap, observed in
``vllm:v2drop_probe_agreement`` and ``vllm:v2drop_probe_logprob_gap`` (labelled by modality
and retention bucket) and logged at debug level.

Cost and isolation: one extra prefill of prompt + answer per probed request, no decode. The
shadow is submitted straight to the engine core after the client's last output was handed
over, never registered with vLLM's output processor (so it reaches no client and no client
usage counter; its prompt tokens are counted in ``vllm:v2drop_probe_prompt_tokens``), and
its outputs are taken out before vLLM's output processing. It is skipped, and counted in
``vllm:v2drop_probe_skipped{reason}``, when ``max_in_flight`` shadows run (``in_flight``),
when more than ``max_waiting`` requests wait for their first token (``queue``), when prompt
+ answer would not fit the model's length (``too_long``), when the vision inputs are no
longer in vLLM's multimodal cache (``mm_cache``), or when the shadow fails (``error``).
Aborted requests are never probed; nothing about a request stays here once it ended.

This module holds the bookkeeping; :mod:`vllm_v2drop.seams.frontend` builds and submits the
shadow (vLLM's ``EngineCoreRequest``) and feeds the outputs in.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from vllm_v2drop.core.quality import measure, modality_label, retention_bucket

logger = logging.getLogger("vllm.v2drop")

__all__ = ["SKIP_REASONS", "ProbeResult", "ProbeSkip", "QualityProbe"]

SKIP_REASONS = ("in_flight", "queue", "too_long", "mm_cache", "error")


class ProbeSkip(Exception):
    """Raised by a submitter: the shadow cannot run; ``reason`` is one of :data:`SKIP_REASONS`."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class ProbeResult:
    """One probed request (kept in :attr:`QualityProbe.results` when ``collect`` is on)."""

    request_id: str
    external_id: str | None
    modality: str
    retention: float
    tokens: int
    agreement: float
    logprob_gap: float
    prompt_tokens: int = 0
    vision_rows: int = 0  # the request's vision rows entering the LLM
    vision_rows_per_layer: tuple = ()  # of them, present in each decoder layer


@dataclass
class _Watched:  # a request to probe once it finishes
    template: object  # what the submitter builds the shadow from
    external_id: str | None
    prompt_len: int
    modality: str
    retention: float
    vision_rows: int = 0
    vision_rows_per_layer: tuple = ()
    tokens: list = field(default_factory=list)


@dataclass
class _Shadow:  # a shadow running
    request_id: str
    watched: _Watched
    answer: list
    first_row: int  # prompt-logprob row of the first answer token (prompt_len - 1)
    rows_seen: int = 0
    top_ids: list = field(default_factory=list)
    top_lps: list = field(default_factory=list)
    ans_lps: list = field(default_factory=list)
    mismatch: bool = False
    started: float = field(default_factory=time.monotonic)


class QualityProbe:
    """Chooses the requests to probe, follows their answers and their shadows, counts.

    ``template(request)`` keeps what a shadow of ``request`` needs (called for the requests
    chosen); ``submit(template, answer) -> shadow_request_id`` starts a shadow (or raises
    :class:`ProbeSkip`); ``waiting()`` is the number of requests waiting for their first token;
    ``normal_finishes`` are the finish reasons of an answer that completed (stop, length).
    """

    def __init__(self, settings, *, template: Callable, submit: Callable, waiting: Callable[[], int],
                 normal_finishes: Iterable, max_model_len: int | None = None, model_name: str = "",
                 prometheus: bool = False, collect: bool = False, rng: Callable[[], float] = random.random) -> None:
        self.rate = float(settings.rate)
        self.max_in_flight = int(settings.max_in_flight)
        self.max_waiting = int(settings.max_waiting)
        self.template = template
        self.submit = submit
        self.waiting = waiting
        self.normal_finishes = frozenset(normal_finishes)
        self.max_model_len = max_model_len
        self.model_name = model_name
        self.rng = rng
        self.watched: dict[str, _Watched] = {}
        self.shadows: dict[str, _Shadow] = {}
        self.results: list[ProbeResult] | None = [] if collect else None
        self.totals = {"requests": 0, "skipped": dict.fromkeys(SKIP_REASONS, 0), "prompt_tokens": 0}
        self._prom = _prometheus_metrics(self) if prometheus else None

    # ---- choosing ------------------------------------------------------------------------------
    def consider(self, request, *, pruned: bool, choice: bool | None, modalities: Iterable[str],
                 retention: float, vision_rows: int = 0, vision_rows_per_layer: tuple = ()) -> bool:
        """At admission: watch ``request`` if it is to be probed (``choice``: its ``v2drop_probe``)."""
        if choice is False or request.request_id in self.watched:
            return False
        if choice is None and not (pruned and self.rate > 0 and self.rng() < self.rate):
            return False
        if getattr(request, "resumable", False) or request.prompt_token_ids is None:
            return False  # streamed inputs, prompt embeddings: no single prompt to replay
        self.watched[request.request_id] = _Watched(
            self.template(request), getattr(request, "external_req_id", None), len(request.prompt_token_ids),
            modality_label(modalities), float(retention), int(vision_rows), tuple(vision_rows_per_layer))
        self._set_watched()
        return True

    # ---- following the answer --------------------------------------------------------------------
    def after_outputs(self, outputs, stopped: Iterable[str] = ()) -> None:
        """After vLLM processed ``outputs`` (stop strings trimmed): collect the answer tokens;
        start the shadow of a request that completed. ``stopped``: requests vLLM ended on a
        stop string (still running in the engine core, aborted there next)."""
        watched = self.watched
        stopped = set(stopped) if stopped else ()
        for out in outputs:
            w = watched.get(out.request_id)
            if w is None:
                continue
            w.tokens.extend(out.new_token_ids)
            reason = out.finish_reason
            if reason is None and out.request_id not in stopped:
                continue
            del watched[out.request_id]
            self._set_watched()
            if reason is None or reason in self.normal_finishes:
                self._start(out.request_id, w)

    def on_abort(self, request_ids) -> None:
        for rid in request_ids:
            self.watched.pop(rid, None)
        self._set_watched()

    def _start(self, request_id: str, w: _Watched) -> None:
        if not w.tokens:
            return
        if len(self.shadows) >= self.max_in_flight:
            self._drop_stale()
        if len(self.shadows) >= self.max_in_flight:
            return self._skip("in_flight", request_id)
        if self.waiting() > self.max_waiting:
            return self._skip("queue", request_id)
        if self.max_model_len is not None and w.prompt_len + len(w.tokens) + 1 > self.max_model_len:
            return self._skip("too_long", request_id)
        try:
            sid = self.submit(w.template, w.tokens)
        except ProbeSkip as skip:
            return self._skip(skip.reason, request_id)
        except Exception:  # noqa: BLE001 (a probe must never hurt serving)
            logger.exception("V2Drop probe of request %s could not start", request_id)
            return self._skip("error", request_id)
        self.shadows[sid] = _Shadow(request_id, w, list(w.tokens), w.prompt_len - 1)
        self._add("prompt_tokens", w.prompt_len + len(w.tokens))
        self._set_in_flight()

    # ---- the shadows ------------------------------------------------------------------------------
    #: A shadow with no output for this long is given up (an engine that never answers must not
    #: hold a slot forever); it counts as ``error``.
    STALE_AFTER_S = 600.0
    #: ``results`` (offline only) keeps at most this many, the newest.
    MAX_RESULTS = 100_000

    def _drop_stale(self) -> None:
        limit = time.monotonic() - self.STALE_AFTER_S
        for sid in [sid for sid, s in self.shadows.items() if s.started < limit]:
            self.finish(sid, ok=False)

    def take_shadow_outputs(self, outputs) -> list:
        """The outputs that are not shadows'; the shadows' are consumed here."""
        shadows = self.shadows
        rest = []
        for out in outputs:
            s = shadows.get(out.request_id)
            if s is None:
                rest.append(out)
            else:
                self._shadow_output(s, out)
        return rest

    def _shadow_output(self, s: _Shadow, out) -> None:
        t = getattr(out, "new_prompt_logprobs_tensors", None)
        if t is not None:
            token_ids, logprobs = t[0], t[1]
            n = int(token_ids.shape[0])
            lo, hi = max(s.first_row - s.rows_seen, 0), min(s.first_row + len(s.answer) - s.rows_seen, n)
            if hi > lo:
                ids = token_ids[lo:hi].tolist()
                lps = logprobs[lo:hi].tolist()
                for row_ids, row_lps in zip(ids, lps):
                    i = len(s.top_ids)
                    if int(row_ids[0]) != int(s.answer[i]):
                        s.mismatch = True
                    s.ans_lps.append(float(row_lps[0]))
                    s.top_ids.append(int(row_ids[1]) if len(row_ids) > 1 else int(row_ids[0]))
                    s.top_lps.append(float(row_lps[1]) if len(row_lps) > 1 else float(row_lps[0]))
            s.rows_seen += n
        if out.finish_reason is not None:
            self.finish(out.request_id, ok=out.finish_reason in self.normal_finishes)

    def finish(self, shadow_id: str, ok: bool = True) -> None:
        """A shadow ended (``ok``: normally; the seam also calls this when a submission failed)."""
        s = self.shadows.pop(shadow_id, None)
        if s is None:
            return
        self._set_in_flight()
        if not ok or s.mismatch or len(s.top_ids) != len(s.answer):
            logger.warning("V2Drop probe of request %s failed (%s)", s.request_id,
                           "shadow did not finish" if not ok else
                           f"rows for {len(s.top_ids)} of {len(s.answer)} answer tokens"
                           + (", answer tokens differ" if s.mismatch else ""))
            return self._skip("error", s.request_id)
        a = measure(s.answer, s.top_ids, s.top_lps, s.ans_lps)
        w = s.watched
        bucket = retention_bucket(w.retention)
        self.totals["requests"] += 1
        if self.results is not None:
            if len(self.results) >= self.MAX_RESULTS:
                del self.results[: self.MAX_RESULTS // 2]
            self.results.append(ProbeResult(s.request_id, w.external_id, w.modality, w.retention, a.tokens,
                                            a.agreement, a.logprob_gap, w.prompt_len, w.vision_rows,
                                            w.vision_rows_per_layer))
        p = self._prom
        if p is not None:
            p["requests"].inc()
            p["agreement"].labels(self.model_name, w.modality, bucket).observe(a.agreement)
            p["gap"].labels(self.model_name, w.modality, bucket).observe(a.logprob_gap)
        logger.debug("V2Drop probe request %s: %s, retention %.3f, %d answer tokens, top-1 agreement %.4f, "
                     "log-probability gap %.4f nats, shadow %.0f ms", s.request_id, w.modality, w.retention,
                     a.tokens, a.agreement, a.logprob_gap, (time.monotonic() - s.started) * 1e3)

    # ---- counting ------------------------------------------------------------------------------
    def _skip(self, reason: str, request_id: str) -> None:
        self.totals["skipped"][reason] += 1
        if self._prom is not None:
            self._prom["skipped"][reason].inc()
        logger.debug("V2Drop probe of request %s skipped: %s", request_id, reason)

    def _add(self, key: str, n: int) -> None:
        self.totals[key] += n
        if self._prom is not None:
            self._prom[key].inc(n)

    def _set_in_flight(self) -> None:
        if self._prom is not None:
            self._prom["in_flight"].set(len(self.shadows))

    def _set_watched(self) -> None:
        if self._prom is not None:
            self._prom["watched"].set(len(self.watched))


#: Prometheus metric names -> what they show (beside :data:`vllm_v2drop.frontend.stats.METRICS`).
PROBE_METRICS: dict[str, str] = {
    "vllm:v2drop_probe_requests": "Requests whose answer the quality probe compared with the unpruned model.",
    "vllm:v2drop_probe_skipped": "Requests chosen for the quality probe but not probed, by reason "
                                 "(in_flight, queue, too_long, mm_cache, error).",
    "vllm:v2drop_probe_agreement": "Per probed request: the share of its answer tokens that the unpruned model, "
                                   "teacher-forced on the answer, ranks top-1.",
    "vllm:v2drop_probe_logprob_gap": "Per probed request: mean over its answer tokens of log p(top-1) - "
                                     "log p(answer token) under the unpruned model, in nats.",
    "vllm:v2drop_probe_prompt_tokens": "Prompt tokens prefilled by the quality probe's shadows (not client usage).",
    "vllm:v2drop_probe_in_flight": "Quality-probe shadows running now.",
    "vllm:v2drop_probe_watched": "Running requests chosen for the quality probe (probed when they finish).",
}


def _prometheus_metrics(probe: QualityProbe) -> dict:
    from prometheus_client import Counter, Gauge, Histogram

    from vllm_v2drop.core.quality import AGREEMENT_BUCKETS, GAP_BUCKETS
    from vllm_v2drop.frontend.stats import make_metric

    model = probe.model_name
    skipped = make_metric(Counter, "vllm:v2drop_probe_skipped", PROBE_METRICS, ["reason"])
    return {
        "requests": make_metric(Counter, "vllm:v2drop_probe_requests", PROBE_METRICS).labels(model),
        "skipped": {r: skipped.labels(model, r) for r in SKIP_REASONS},
        "agreement": make_metric(Histogram, "vllm:v2drop_probe_agreement", PROBE_METRICS,
                                 ["modality", "retention"], buckets=AGREEMENT_BUCKETS),
        "gap": make_metric(Histogram, "vllm:v2drop_probe_logprob_gap", PROBE_METRICS,
                           ["modality", "retention"], buckets=GAP_BUCKETS),
        "prompt_tokens": make_metric(Counter, "vllm:v2drop_probe_prompt_tokens", PROBE_METRICS).labels(model),
        "in_flight": make_metric(Gauge, "vllm:v2drop_probe_in_flight", PROBE_METRICS,
                                 multiprocess_mode="livesum").labels(model),
        "watched": make_metric(Gauge, "vllm:v2drop_probe_watched", PROBE_METRICS,
                               multiprocess_mode="livesum").labels(model),
    }
