"""The frontend side of V2Drop: live metrics of what V2Drop did (and, through the frontend seam,
per-request settings checked at admission).

Runs in the process that holds vLLM's ``InputProcessor`` and ``OutputProcessor``: the
OpenAI API server (``AsyncLLM``) or the offline ``LLM`` (``LLMEngine``). Nothing here runs
in the engine core or the workers.

Admission. ``InputProcessor.process_inputs`` is where vLLM checks a request's params
before it becomes an ``EngineCoreRequest`` (its own ``SamplingParams.verify`` and custom
logits processors' ``validate_params`` run there). For a V2Drop engine the wrapper first
(:mod:`vllm_v2drop.seams.frontend`) reads the request's ``v2drop_*`` keys with :func:`vllm_v2drop.overrides.validate`; a bad
value raises :class:`~vllm_v2drop.overrides.V2DropRequestError`, a ``ValueError`` and a
``VLLMValidationError``: the OpenAI server answers HTTP 400 with its message, offline
``LLM.generate`` raises it, and the engine core never sees the request.

Metrics. vLLM 0.32's API server and engine core are separate processes, and the engine
core only sends back fixed, typed per-step stats (``SchedulerStats``, a msgspec-encoded
dataclass with no field for a plugin's numbers). But everything V2Drop's counts depend on
is already in the frontend: each ``EngineCoreRequest`` carries the prompt length, the
multimodal placeholders (``mm_features``) and the sampling params, the exact inputs from
which the worker and the scheduler build a request's plan (:func:`vllm_v2drop.requests.plan_for`,
the single place a request becomes a plan). So the frontend builds the same plan when
``OutputProcessor.add_request`` registers a request, and adds it to the counters when the
engine core returns the request's first token (its prefill, hence every drop, is done).
Counts are exact integers (sums over plans), need no new inter-process channel, and are
Prometheus objects of the API server's own registry, so ``/metrics`` shows them next to
vLLM's. With ``--api-server-count > 1`` vLLM turns on prometheus_client's multiprocess
mode before it starts the API servers; each request goes through exactly one of them, so
the summed counters stay exact.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from vllm_v2drop.requests import plan_for, request_override, request_view
from vllm_v2drop.core.kv_layout import group_layout, stage_layer_counts
from vllm_v2drop.overrides import probe_choice

logger = logging.getLogger("vllm.v2drop")

__all__ = ["METRICS", "FrontendStats", "make_metric", "retention_of", "stats_of"]

#: Prometheus metric names (counters get vLLM's ``_total`` suffix on ``/metrics``) -> what they count.
METRICS: dict[str, str] = {
    "vllm:v2drop_requests_pruned": "Requests whose vision rows V2Drop dropped (counted when their prefill is done).",
    "vllm:v2drop_requests_unpruned": "Requests with vision items that V2Drop left whole, by reason "
                                     "(request_off: v2drop_off; prompt_logprobs; schedule: nothing to drop).",
    "vllm:v2drop_vision_rows_received": "Vision rows (image/video embeddings) of pruned requests entering the LLM.",
    "vllm:v2drop_vision_rows_present": "Vision rows of pruned requests present in each stage "
                                       "(stage 0: before the first drop layer; stage s: from the s-th drop layer on).",
    "vllm:v2drop_kv_rows_not_written": "KV-cache rows not written: per pruned request, vision rows dropped, "
                                       "summed over all decoder layers.",
    "vllm:v2drop_kv_blocks_not_allocated": "kv_mode per_stage: KV-cache blocks not allocated, per finished pruned "
                                           "request at its final KV length, summed over the KV-cache groups.",
    "vllm:v2drop_request_retention": "Per pruned request: the share of its vision rows present per layer, "
                                     "averaged over the layers.",
}
RETENTION_BUCKETS = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)



@dataclass
class _Live:
    plan: object
    prompt_len: int
    generated: int = 0
    counted: bool = False
    reason: str | None = None  # why it is not pruned (None: pruned)


@dataclass
class FrontendStats:
    """What V2Drop did, summed over the requests one frontend (API server / ``LLMEngine``) served.

    ``totals`` holds the same numbers as the Prometheus counters (``prometheus=True``).
    """

    schedule: object
    block_size: int | None = None
    model_name: str = ""
    prometheus: bool = False
    totals: dict = field(default_factory=dict)
    live: dict = field(default_factory=dict)
    probe: object = None  # the quality probe (vllm_v2drop.frontend.probe.QualityProbe), when on

    def __post_init__(self) -> None:
        s = self.schedule
        self.per_stage = s.kv_mode == "per_stage" and bool(s.layers) and self.block_size is not None
        self.groups: list[int] = []  # stage of every KV-cache group (per_stage)
        if self.per_stage:
            self.groups = [stage for stage, _ in group_layout(stage_layer_counts(s))]
        self.totals = {
            "requests_pruned": 0,
            "requests_unpruned": {"request_off": 0, "prompt_logprobs": 0, "schedule": 0},
            "vision_rows_received": 0,
            "vision_rows_present": [0] * (len(s.layers) + 1),
            "kv_rows_not_written": 0,
            "kv_blocks_not_allocated": 0,
            "retention": [],
        }
        self._prom = _prometheus_metrics(self) if self.prometheus else None

    # ---- requests ------------------------------------------------------------------------------
    def on_add(self, request) -> None:
        """``OutputProcessor.add_request``: plan the request as the worker and scheduler will."""
        if request.request_id in self.live or not request.mm_features or request.sampling_params is None:
            return
        ids = request.prompt_token_ids  # vLLM checked at admission that one of them is given
        n = len(ids) if ids is not None else len(request.prompt_embeds)
        view = request_view(request.request_id, n, request.mm_features, request.sampling_params)
        plan = plan_for(self.schedule, view)
        if not plan.num_items:
            return  # no vision item of an enabled modality
        reason = None
        if not plan.pruned or not plan.drops_anything:
            override = request_override(self.schedule, view) if view.extra_args else None
            reason = ("prompt_logprobs" if view.wants_prompt_logprobs else
                      "request_off" if override is not None and override.off else "schedule")
        self.live[request.request_id] = _Live(plan, n, reason=reason)
        if self.probe is not None and reason != "prompt_logprobs":
            self.probe.consider(
                request, pruned=reason is None, choice=probe_choice(view.extra_args, self.schedule),
                modalities=[it.modality for it in view.items if it.modality in self.schedule.modalities],
                retention=retention_of(self.schedule, plan), vision_rows=plan.total_vision_rows,
                vision_rows_per_layer=plan.rows_per_layer(self.schedule.layers, self.schedule.num_layers)
                if plan.pruned else [plan.total_vision_rows] * self.schedule.num_layers)

    def on_outputs(self, outputs) -> None:
        """``OutputProcessor.process_outputs``: count a request at its first token; blocks at its end."""
        live = self.live
        if not live:
            return
        for out in outputs:
            st = live.get(out.request_id)
            if st is None:
                continue
            st.generated += len(out.new_token_ids)
            if not st.counted and st.generated:
                st.counted = True
                if st.reason is not None:
                    self._count_unpruned(st.reason)
                else:
                    self._count_request(st.plan)
                if not self.per_stage or st.reason is not None:
                    del live[out.request_id]
                    continue
            if out.finish_reason is not None:
                self._finish(out.request_id)

    def on_abort(self, request_ids) -> None:
        for rid in request_ids:
            if rid in self.live:
                self._finish(rid)

    def _finish(self, request_id: str) -> None:
        st = self.live.pop(request_id)
        if st.counted and self.per_stage and st.reason is None:
            self._add("kv_blocks_not_allocated", self.blocks_saved(st.plan, st.prompt_len + st.generated - 1))

    # ---- counting ------------------------------------------------------------------------------
    def blocks_saved(self, plan, num_tokens: int) -> int:
        """KV blocks a request of ``num_tokens`` KV rows does not hold in ``per_stage``: per KV-cache
        group, ``ceil(n / block) - ceil(compact_len(stage, n) / block)``."""
        bs = self.block_size
        full = -(-num_tokens // bs)
        return sum(full - -(-plan.compact_len(s, num_tokens) // bs) for s in self.groups)

    def _count_request(self, plan) -> None:
        s = self.schedule
        per_stage = [int(x) for x in plan.counts.sum(axis=0)]
        n0 = plan.total_vision_rows
        retention = retention_of(s, plan)
        t = self.totals
        t["requests_pruned"] += 1
        t["vision_rows_received"] += n0
        for i, n in enumerate(per_stage):
            t["vision_rows_present"][i] += n
        saved = plan.kv_rows_saved(s.layers, s.num_layers)
        t["kv_rows_not_written"] += saved
        t["retention"].append(retention)
        if len(t["retention"]) > 4096:  # the histogram keeps the distribution; keep the list short
            del t["retention"][:2048]
        p = self._prom
        if p is not None:
            p["requests_pruned"].inc()
            p["vision_rows_received"].inc(n0)
            for i, n in enumerate(per_stage):
                p["vision_rows_present"][i].inc(n)
            p["kv_rows_not_written"].inc(saved)
            p["retention"].observe(retention)

    def _count_unpruned(self, reason: str) -> None:
        self.totals["requests_unpruned"][reason] += 1
        if self._prom is not None:
            self._prom["requests_unpruned"][reason].inc()

    def _add(self, key: str, value: int) -> None:
        self.totals[key] += value
        if self._prom is not None and key in self._prom:
            self._prom[key].inc(value)


def retention_of(schedule, plan) -> float:
    """A request's share of its vision rows present per decoder layer, averaged over the layers
    (1.0 for a request that is not pruned)."""
    if not plan.pruned:
        return 1.0
    per_layer = plan.rows_per_layer(schedule.layers, schedule.num_layers)
    n0 = plan.total_vision_rows
    return sum(per_layer) / (len(per_layer) * n0) if n0 else 1.0


# ------------------------------------------------------------------------------- Prometheus
_registered: list = []


def make_metric(cls, name: str, docs: dict, labels=(), **kw):
    """A V2Drop metric in prometheus_client's default registry, labelled by ``model_name`` first;
    :func:`_prometheus_metrics` unregisters it when the next engine of the process creates its own."""
    m = cls(name, docs[name], labelnames=["model_name", *labels], **kw)
    _registered.append(m)
    return m


def _prometheus_metrics(stats: FrontendStats) -> dict:
    """Create the V2Drop metrics in prometheus_client's default registry (what ``/metrics`` serves).

    Called after vLLM's ``PrometheusStatLogger`` exists (it unregisters every ``vllm:``
    collector when it is created). A second engine in the same process replaces the first one's.
    """
    from prometheus_client import REGISTRY, Counter, Histogram

    for collector in _registered:
        try:
            REGISTRY.unregister(collector)
        except KeyError:
            pass
    _registered.clear()

    def make(cls, name, labels=(), **kw):
        return make_metric(cls, name, METRICS, labels, **kw)

    model = stats.model_name
    unpruned = make(Counter, "vllm:v2drop_requests_unpruned", ["reason"])
    present = make(Counter, "vllm:v2drop_vision_rows_present", ["stage"])
    out = {
        "requests_pruned": make(Counter, "vllm:v2drop_requests_pruned").labels(model),
        "requests_unpruned": {r: unpruned.labels(model, r) for r in stats.totals["requests_unpruned"]},
        "vision_rows_received": make(Counter, "vllm:v2drop_vision_rows_received").labels(model),
        "vision_rows_present": [present.labels(model, str(i)) for i in range(len(stats.schedule.layers) + 1)],
        "kv_rows_not_written": make(Counter, "vllm:v2drop_kv_rows_not_written").labels(model),
        "retention": make(Histogram, "vllm:v2drop_request_retention", buckets=RETENTION_BUCKETS).labels(model),
    }
    if stats.per_stage:
        out["kv_blocks_not_allocated"] = make(Counter, "vllm:v2drop_kv_blocks_not_allocated").labels(model)
    return out


def stats_of(engine) -> FrontendStats | None:
    """The :class:`FrontendStats` of an ``AsyncLLM`` / ``LLMEngine`` (``llm.llm_engine``), or None."""
    return getattr(getattr(engine, "output_processor", None), "_v2drop_stats", None)
