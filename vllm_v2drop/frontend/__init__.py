"""API-server side of V2Drop (the process that holds vLLM's input and output processors):
per-request settings at admission and the metrics. The frontend seam
(:mod:`vllm_v2drop.seams.frontend`) calls it."""

from vllm_v2drop.frontend.stats import METRICS, FrontendStats, stats_of

__all__ = ["METRICS", "FrontendStats", "stats_of"]
