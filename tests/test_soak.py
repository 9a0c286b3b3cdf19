"""Soak: under real, mixed load with a small KV pool a V2Drop server never dies.

A bounded run of ``benchmarks/soak.py`` per (architecture, KV mode) against ``vllm serve
--model-impl v2drop``: greedy images of several sizes, multi-turn chats that re-send their image,
text, 4- and 8-frame videos, streaming, logprobs, prompt logprobs, stop strings, ``n=2``, bursts of
``n=4`` requests with two large images, client aborts, malformed requests. ``shared``: 100 requests,
24 at a time, a 36-block pool. ``per_stage``: 200 requests, 32 at a time, 32-token blocks and a
2,304-token pool, so that prefix caching Level 2 reuses pruned KV while blocks are evicted and
requests preempted, under the KV audit, with the quality probe at rate 1.0. Each run checks: the server is alive, no 5xx, every
malformed request got a 4xx, no valid request failed, every greedy answer equals the same request
sent alone, no request hung, running / waiting / KV usage back to 0, no traceback through
``vllm_v2drop`` in the server log, and the pool did force preemptions.
About 45-85 s per parametrisation on the 2-core CI machine, so the suite runs two of the four
(each architecture once, each KV mode once); ``V2DROP_SOAK_ALL=1`` runs all four, and each again
with ``chunked_items`` and a 64-token step budget that splits every vision item across steps.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import soak

pytestmark = [pytest.mark.slow, pytest.mark.soak]
openai = pytest.importorskip("openai")

NUM_REQUESTS = 100
CONCURRENCY = 24


def log_tail(res: dict, lines: int = 60) -> str:
    text = Path(res["server_log"]).read_text(errors="replace").splitlines()
    return "\n".join(text[-lines:])


# per_stage runs prefix caching Level 2 under pressure: 32-token blocks (the chats reuse the pruned KV of
# the turn before), a pool of 2,304 tokens, 32 requests at a time; the KV audit checks every reuse. At
# this size a lookup that ended inside a block the same step had not written yet broke answers.
# It also runs the quality probe at rate 1.0: every pruned answer gets its unpruned shadow (as many as the
# probe's limits let start), and the answers stay those of the requests sent alone.
PER_STAGE = ["-n", "200", "-c", "32", "--block-size", "32", "--kv-blocks", "18", "--max-model-len", "2048",
             "--max-num-batched-tokens", "2048", "--probe-rate", "1.0"]
# chunked_items: a 64-token step budget splits every image and video across steps
CHUNKED = ["--chunked-items", "--max-num-batched-tokens", "64"]
COMBOS = [(a, m, c) for a in soak.ARCHS for m in soak.KV_MODES for c in (False, True)]
if not os.environ.get("V2DROP_SOAK_ALL"):
    COMBOS = [("llava-onevision", "shared", False), ("qwen2-vl", "per_stage", False)]


@pytest.mark.parametrize(("arch", "kv_mode", "chunked"), COMBOS)
def test_soak(arch, kv_mode, chunked, tmp_path):
    size = PER_STAGE if kv_mode == "per_stage" else ["-n", str(NUM_REQUESTS), "-c", str(CONCURRENCY)]
    if chunked:  # the last --max-num-batched-tokens given wins
        size = [*size, *CHUNKED]
    res = soak.run_soak(["--arch", arch, "--kv-mode", kv_mode, *size,
                         "--log", str(tmp_path / "server.log"), "--out", str(tmp_path / "soak.json")])
    print({k: res[k] for k in ("requests_by_category", "status", "compared", "preemptions", "peak", "load_s",
                               "wall_s")})
    assert res["alive"] and not res["engine_dead"], f"the server died:\n{log_tail(res)}"
    assert set(res["requests_by_category"]) == set(soak.WEIGHTS), res["requests_by_category"]
    assert res["status"].get("5xx", 0) == 0, res["valid_failed_examples"] + res["malformed_not_4xx"]
    assert res["malformed_4xx"] > 0 and not res["malformed_not_4xx"], res["malformed_not_4xx"]
    assert res["valid_failed"] == 0, res["valid_failed_examples"]
    assert res["compared"] > NUM_REQUESTS // 3 and res["mismatches"] == 0, res["mismatch_examples"]
    assert res["hangs"] == 0
    idle = {"num_requests_running": 0, "num_requests_waiting": 0, "kv_cache_usage_perc": 0}
    if kv_mode == "per_stage":  # and the quality probe follows no request, runs no shadow
        idle |= {"v2drop_probe_watched": 0, "v2drop_probe_in_flight": 0}
    assert res["final"] == idle, res["final"]
    assert res["v2drop_tracebacks"] == 0, res["v2drop_traceback_tails"]
    assert res["preemptions"] > 0, "the KV pool was meant to force preemptions"
    if kv_mode == "per_stage":  # the chats hit the pruned KV of the turn before
        assert res["prefix_cache"]["hits"] > 0, res["prefix_cache"]
        assert res["probe"]["requests"] > 0 and not res["probe"]["skipped"].get("error"), res["probe"]
    assert res["ok"], res["checks"]
