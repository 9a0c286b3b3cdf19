"""Per-step host cost of V2Drop at 1 .. 1024 running requests, beside stock vLLM's own.

    python benchmarks/host_overhead.py [--arch llava-onevision] [--counts 1,16,64,256,1024]

Runs the real engine in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, the ``uni``
executor) three ways: stock vLLM, V2Drop ``kv_mode: shared`` and ``kv_mode: per_stage``.
For each count N it admits N one-image requests, waits until all N are decoding, and then
times ``--steps`` pure decode steps with wrappers around:

* worker, V2Drop: ``seams.runner.read_batch`` and ``V2DropRuntime.plan_step`` (reading the step off
  the runner, planning) and ``seams.runner.install_stage_metadata`` (per-stage attention metadata and
  slot mappings), together ``v2drop_worker_ms``. Of it, ``v2drop_backend_ms`` is the attention
  backend's own work that V2Drop calls per stage: vLLM's slot-mapping op and the backend's metadata
  builds (on this CPU backend, O(batch) C++ on the host; on a GPU a Triton kernel and, for
  FlashAttention, a kernel launch), and ``v2drop_worker_own_ms`` the rest (V2Drop's planning and
  bookkeeping);
* scheduler, V2Drop, ``v2drop_sched_ms``: plans built for requests (``StagePlans.register``: none
  on a decode step), the prefix-cache cap (``v2drop_cache_cap_ms``: the coordinator's
  ``cache_blocks``, called for every scheduled request, V2Drop's override against vLLM's own in the
  stock run at the same count; negative where the override saves vLLM's work), the scheduling guard
  around vLLM's ``_try_schedule_encoder_inputs`` (``v2drop_guard_ms``, every running multimodal
  request: the wrapped method against vLLM's own on the same requests) and, in ``per_stage``, the
  coordinator's compact counts (``coordinator_vs_vllm_ms``: its per-step calls against vLLM's own
  coordinator on the same requests; ``v2drop_sched_upper_ms`` counts instead everything in its calls
  but the managers', vLLM's own loop over the groups included). Each part counts when positive. The
  whole ``Scheduler.schedule()``, ``schedule_ms``, also holds vLLM's own work for the extra KV-cache
  groups of ``per_stage``;
* stock host work of the same step: ``GPUModelRunner._prepare_inputs`` + ``_build_attention_metadata``
  (``stock_worker_ms``) and ``Scheduler.schedule()`` (``schedule_ms`` of the stock run).

Python's garbage collector runs several times per step at 1024 requests (vLLM's allocations fill its
generations) and pauses whichever call allocates next: a collection that starts inside a timed call
is counted apart (``v2drop_worker_gc_ms``; ``v2drop_worker_with_gc_ms`` counts it in; ``gc_ms`` and
``gc_collections``: the whole step's).

Milliseconds per decode step, medians over the ``--steps`` timed steps (this machine's other jobs
preempt single steps; each row's ``means`` holds the means); JSON and a PNG go to ``--out``
(``benchmarks/results``).
CPU numbers: compare them with each other, not with a GPU's.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # engine core and worker in this process: timers see both
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)

REPO = Path(__file__).resolve().parents[1]
OVERHEAD = [0.0, 0.0]  # seconds a ``timed`` wrapper adds to a call; of them, inside its own measured interval
TIMES: dict[str, float] = defaultdict(float)
CALLS: dict[str, int] = defaultdict(int)
WRAPPED: list[tuple[object, str, object]] = []  # (owner, name, what it had before), to undo per engine
GC = [0.0, 0, 0.0]  # seconds in Python's garbage collector so far, collections so far, start of the current one


def _gc_clock(phase: str, info: dict) -> None:
    """``gc.callbacks`` hook: adds every collection's pause to ``GC``."""
    if phase == "start":
        GC[2] = time.perf_counter()
    else:
        GC[0] += time.perf_counter() - GC[2]
        GC[1] += 1


DEPTH: dict[str, int] = defaultdict(int)  # per key: timed calls running now


def timed(owner, name: str, key: str, inside: str | None = None) -> None:
    """Wrap ``owner.name`` so that its wall time adds up in ``TIMES[key]`` (calls nested in another
    call timed under the same key count once); with ``inside``, only the calls made while a call
    timed under that key runs."""
    original = getattr(owner, name)
    if getattr(original, "__timed__", None) == key:
        return

    def wrapper(*args, **kwargs):
        if inside is not None and not DEPTH[inside]:
            return original(*args, **kwargs)
        DEPTH[key] += 1
        g, t = GC[0], time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            DEPTH[key] -= 1
            if DEPTH[key] == 0:
                paused = GC[0] - g  # a collection that started inside the call: counted apart
                TIMES[key] += time.perf_counter() - t - paused
                TIMES["_gc_" + key] += paused
                CALLS[key] += 1

    wrapper.__timed__ = key
    wrapper.__wrapped__ = original
    WRAPPED.append((owner, name, owner.__dict__.get(name)))
    setattr(owner, name, wrapper)


def remove_timers() -> None:
    """Undo :func:`timed`, last first (a method timed for one engine is not timed inside the next)."""
    while WRAPPED:
        owner, name, before = WRAPPED.pop()
        if before is None:
            delattr(owner, name)
        else:
            setattr(owner, name, before)


def install_timers(engine) -> None:
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    from vllm.v1.worker.utils import AttentionGroup

    from vllm_v2drop.engine.plans import StagePlans
    from vllm_v2drop.seams import runner as v1
    from vllm_v2drop.worker.runtime import V2DropRuntime

    timed(Scheduler, "schedule", "schedule_ms")
    timed(GPUModelRunner, "_prepare_inputs", "stock_worker_ms")
    timed(GPUModelRunner, "_build_attention_metadata", "stock_worker_ms")
    timed(v1, "read_batch", "v2drop_plan_ms")  # reading the step off the runner counts as planning
    timed(V2DropRuntime, "plan_step", "v2drop_plan_ms")
    timed(v1, "install_stage_metadata", "v2drop_metadata_ms")
    # the attention backend's own O(batch) work inside V2Drop's metadata: vLLM's slot-mapping op
    # (a Triton kernel on a GPU) and the metadata builds (on the CPU backend, its C++ scheduler
    # metadata; FlashAttention's is a kernel launch): device work there, host work here
    timed(v1, "_slot_mapping", "v2drop_backend_ms", inside="v2drop_metadata_ms")
    timed(AttentionGroup, "build_metadata", "v2drop_backend_ms", inside="v2drop_metadata_ms")
    timed(StagePlans, "register", "v2drop_register_ms")
    coordinator_class = type(engine.engine_core.engine_core.scheduler.kv_cache_manager.coordinator)
    # the coordinator's cache_blocks, every scheduled request and step: vLLM's own in the stock run,
    # V2Drop's override (the prefix-cache cap, its calls of vLLM's method included) in the others
    timed(coordinator_class, "cache_blocks", "cache_blocks")
    from vllm_v2drop.seams.kv_cache import V2DropStageCoordinator

    if issubclass(coordinator_class, V2DropStageCoordinator):  # V2Drop's per_stage coordinator
        # it replaces vLLM's per-group loop: its own cost is the time in the override minus the time
        # in the managers' methods it calls (less the inner timer's own overhead, calibrated);
        # vLLM's own loop over the groups is counted as V2Drop's (an upper bound)
        for name in ("get_num_blocks_to_allocate", "allocate_new_blocks"):
            timed(coordinator_class, name, "mgr_total")
            timed(FullAttentionManager, name, "mgr_base")


def timer_overhead() -> tuple[float, float]:
    """Seconds one ``timed`` wrapper adds to a call, and the part of them its own measured interval
    holds (the clock read, the bookkeeping around the call)."""
    class Probe:
        def f(self):
            return None

    probe, n = Probe(), 200_000
    t = time.perf_counter()
    for _ in range(n):
        probe.f()
    bare = time.perf_counter() - t
    timed(Probe, "f", "_probe")
    TIMES["_probe"] = 0.0
    t = time.perf_counter()
    for _ in range(n):
        probe.f()
    total = max(0.0, (time.perf_counter() - t - bare) / n)
    return total, min(total, max(0.0, (TIMES["_probe"] - bare) / n))


def coordinator_added_ms(engine, repeats: int = 20) -> float:
    """What V2Drop's coordinator adds to one decode step of the running requests: its
    ``get_num_blocks_to_allocate`` against vLLM's own on the same coordinator, requests and counts
    (side-effect free, so both can run), times two for the step's two calls (the second,
    ``allocate_new_blocks``, has the same per-request work and would allocate if called twice)."""
    from vllm.v1.core.kv_cache_coordinator import KVCacheCoordinator
    from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager

    scheduler = engine.engine_core.engine_core.scheduler
    kv = scheduler.kv_cache_manager
    coordinator, empty = kv.coordinator, kv.empty_kv_cache_blocks.blocks
    calls = [
        (r.request_id, r.num_computed_tokens + 1, empty, 0, r.num_computed_tokens, r.num_computed_tokens,
         r.num_computed_tokens + 1, False, max(r.num_prompt_tokens, r.num_tokens - 1))
        for r in scheduler.running
    ]
    timings = []
    timers = [(k, v) for k, v in vars(FullAttentionManager).items() if getattr(v, "__timed__", None)]
    for k, v in timers:  # the managers' own methods, untimed: the timers would weigh on vLLM's loop only
        setattr(FullAttentionManager, k, v.__wrapped__)
    try:
        for fn in (type(coordinator).get_num_blocks_to_allocate, KVCacheCoordinator.get_num_blocks_to_allocate):
            fn = getattr(fn, "__wrapped__", fn)
            best = float("inf")
            for _ in range(repeats):
                t = time.perf_counter()
                for args in calls:
                    fn(coordinator, *args)
                best = min(best, time.perf_counter() - t)
            timings.append(best)
    finally:
        for k, v in timers:
            setattr(FullAttentionManager, k, v)
    return 2e3 * (timings[0] - timings[1])


def guard_added_ms(engine, repeats: int = 20) -> float:
    """What V2Drop's scheduling guard (``vllm_v2drop.seams.scheduler``: a step never ends inside a vision
    item) adds to one decode step: V2Drop's ``_try_schedule_encoder_inputs`` (its scheduler's override) against
    vLLM's own on the running requests, as the scheduler calls it (one token each; side-effect free
    for a request whose items are all computed), best of ``repeats``."""
    from vllm.v1.core.sched.scheduler import Scheduler

    scheduler = engine.engine_core.engine_core.scheduler
    wrapped, original = type(scheduler)._try_schedule_encoder_inputs, Scheduler._try_schedule_encoder_inputs
    if wrapped is original:  # stock vLLM's scheduler
        return 0.0
    budget = scheduler.max_num_encoder_input_tokens
    calls = [(r, r.num_computed_tokens, 1, budget) for r in scheduler.running if r.has_encoder_inputs]
    timings = []
    for fn in (wrapped, original):
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            for args in calls:
                fn(scheduler, *args, shift_computed_tokens=0)
            best = min(best, time.perf_counter() - t)
        timings.append(best)
    return 1e3 * (timings[0] - timings[1])


def step_row(mode: str, wall: float, times: dict, calls: dict) -> dict:
    """One decode step's numbers (ms) from its timers."""
    row = {"step_ms": 1e3 * wall}
    row.update({k: 1e3 * v for k, v in times.items() if not k.startswith(("mgr_", "cache_", "_"))})
    if "v2drop_plan_ms" in row:
        inner = calls.get("v2drop_backend_ms", 0)  # timers nested in install_stage_metadata: their own cost out
        row["v2drop_metadata_ms"] = row.get("v2drop_metadata_ms", 0.0) - 1e3 * inner * OVERHEAD[0]
        row["v2drop_backend_ms"] = row.get("v2drop_backend_ms", 0.0) - 1e3 * inner * OVERHEAD[1]
        row["v2drop_worker_ms"] = row["v2drop_plan_ms"] + row["v2drop_metadata_ms"]
        row["v2drop_worker_own_ms"] = row["v2drop_worker_ms"] - row["v2drop_backend_ms"]
        # collections that started in V2Drop's worker calls (vLLM's allocations fill the generations;
        # whichever call allocates next pays): apart, and counted in once more in ..._with_gc_ms
        row["v2drop_worker_gc_ms"] = 1e3 * (times.get("_gc_v2drop_plan_ms", 0.0) + times.get("_gc_v2drop_metadata_ms", 0.0))
        row["v2drop_worker_with_gc_ms"] = row["v2drop_worker_ms"] + row["v2drop_worker_gc_ms"]
    row["gc_ms"] = 1e3 * times.get("_gc_step", 0.0)
    row["gc_collections"] = calls.get("_gc_step", 0)
    # the coordinator's cache_blocks over the step's requests, less the timer's own cost
    row["cache_blocks_ms"] = 1e3 * (times.get("cache_blocks", 0.0) - calls.get("cache_blocks", 0) * OVERHEAD[1])
    if calls.get("mgr_total"):
        row["v2drop_coordinator_own_ms"] = 1e3 * (times["mgr_total"] - times["mgr_base"] - calls["mgr_base"] * OVERHEAD[0]
                                                  - calls["mgr_total"] * OVERHEAD[1])
        row["kv_manager_calls_per_step"] = calls["mgr_total"]
    return row


def scheduler_side(row: dict, stock: dict | None) -> None:
    """A V2Drop row's scheduler-side columns: plans registered, the prefix-cache cap (its
    ``cache_blocks`` against the stock run's at the same count: V2Drop's override answers most
    calls with one lookup and skips vLLM's), the guard and, in ``per_stage``, the coordinator."""
    base = stock.get("cache_blocks_ms", 0.0) if stock else 0.0
    row["v2drop_cache_cap_ms"] = row.get("cache_blocks_ms", 0.0) - base
    added = [row.get("v2drop_register_ms", 0.0), row["v2drop_cache_cap_ms"], row.get("v2drop_guard_ms", 0.0)]
    if "coordinator_vs_vllm_ms" in row:
        added.append(row["coordinator_vs_vllm_ms"])
        row["v2drop_sched_upper_ms"] = sum(max(0.0, a) for a in added[:3]) + row.get("v2drop_coordinator_own_ms", 0.0)
    row["v2drop_sched_ms"] = sum(max(0.0, a) for a in added)  # what V2Drop adds, its savings not counted


def run_mode(model: str, arch: str, mode: str, counts: list[int], steps: int, dtype: str = "float32",
             kv_bytes: int | None = None) -> list[dict]:
    from conftest import make_image, mm_request
    from vllm import LLM, SamplingParams

    kw = {} if mode == "stock" else {"model_impl": "v2drop", "additional_config": {"v2drop": {"kv_mode": mode}}}
    top = max(counts)
    kv_bytes = kv_bytes or top * 480 * 4096 + (256 << 20)  # tiny models: ~4 KiB of KV per token
    llm = LLM(model, dtype=dtype, enforce_eager=True, seed=0, max_model_len=4096, max_num_seqs=top,
              max_num_batched_tokens=8192, kv_cache_memory_bytes=kv_bytes,
              limit_mm_per_prompt={"image": 1, "video": 0}, distributed_executor_backend="uni",
              disable_log_stats=True, **kw)
    engine = llm.llm_engine
    install_timers(engine)
    rows = []
    for n in counts:
        params = SamplingParams(temperature=0.0, max_tokens=600, ignore_eos=True)  # none finishes while timed
        ids = [f"{mode}-{n}-{i}" for i in range(n)]
        for i, rid in enumerate(ids):
            engine.add_request(rid, mm_request(arch, model, images=[make_image("small", i)], text=f"Q{i}?"), params)
        started = set()
        while len(started) < n:  # prefill everything; every request has its first token
            for out in engine.step():
                if out.outputs and out.outputs[0].token_ids:
                    started.add(out.request_id)
        engine.step()  # one more so that no step below holds a prefill
        samples = []
        for _ in range(steps):
            TIMES.clear()
            CALLS.clear()
            g0, c0, t0 = GC[0], GC[1], time.perf_counter()
            engine.step()
            wall = time.perf_counter() - t0
            TIMES["_gc_step"], CALLS["_gc_step"] = GC[0] - g0, GC[1] - c0
            samples.append(step_row(mode, wall, TIMES, CALLS))
        running = engine.engine_core.engine_core.scheduler.get_num_unfinished_requests()
        assert running == n, f"{running} requests in the engine, expected {n}"
        keys = list(dict.fromkeys(k for sample in samples for k in sample))
        # medians over the steps: this machine's other jobs preempt single steps
        row = {"mode": mode, "running": n, "steps": steps}
        row.update({k: statistics.median(sample.get(k, 0.0) for sample in samples) for k in keys})
        row["means"] = {k: statistics.fmean(sample.get(k, 0.0) for sample in samples) for k in keys}
        if mode != "stock":  # the scheduling guard, measured against vLLM's own method
            row["v2drop_guard_ms"] = guard_added_ms(engine)
            if "v2drop_coordinator_own_ms" in row:  # per_stage: the coordinator against vLLM's (< 0: faster)
                row["coordinator_vs_vllm_ms"] = coordinator_added_ms(engine)
        rows.append(row)
        print(json.dumps(row), flush=True)
        engine.abort_request(ids)
        while engine.has_unfinished_requests():
            engine.step()
    remove_timers()
    engine.engine_core.shutdown()
    del llm
    return rows


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    by = defaultdict(list)
    for r in result["rows"]:
        by[r["mode"]].append(r)
    for mode, rows in by.items():
        xs = [r["running"] for r in rows]
        if mode == "stock":
            ax.plot(xs, [r.get("stock_worker_ms", 0) for r in rows], "k--", label="stock worker host (prepare inputs + metadata)")
            ax.plot(xs, [r.get("schedule_ms", 0) for r in rows], "k:", label="stock Scheduler.schedule()")
            continue
        ax.plot(xs, [r.get("v2drop_worker_ms", 0) for r in rows], "o-", label=f"V2Drop worker ({mode})")
        if mode == "per_stage":
            ax.plot(xs, [r.get("v2drop_sched_ms", 0) for r in rows], "s-", label="V2Drop scheduler (per_stage)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("running requests (pure decode step)")
    ax.set_ylabel("host ms per step")
    ax.set_title(f"Host cost per decode step ({result['arch']}, CPU)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="llava-onevision")
    ap.add_argument("--model", help="model directory (default: the tiny model of --arch, built if missing)")
    ap.add_argument("--counts", default="1,16,64,256,1024")
    ap.add_argument("--modes", default="stock,shared,per_stage")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--kv-cache-bytes", type=int, default=None, help="KV pool (default: sized for the tiny models)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import ensure_model

    model = args.model or str(ensure_model(args.arch))
    OVERHEAD[:] = timer_overhead()
    gc.callbacks.append(_gc_clock)
    counts = [int(c) for c in args.counts.split(",")]
    rows = []
    for mode in args.modes.split(","):
        rows += run_mode(model, args.arch, mode, counts, args.steps, args.dtype, args.kv_cache_bytes)
    stock = {r["running"]: r for r in rows if r["mode"] == "stock"}
    for row in rows:
        if row["mode"] != "stock":
            scheduler_side(row, stock.get(row["running"]))
    result = {"arch": args.arch, "model": model, "machine": platform.processor() or platform.machine(),
              "cpus": os.cpu_count(), "steps": args.steps, "rows": rows,
              "command": "python benchmarks/host_overhead.py " + " ".join(argv or sys.argv[1:])}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import torch

    stem = out / f"{'gpu' if torch.cuda.is_available() else 'cpu'}-host-overhead-{args.arch}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
    plot(result, stem.with_suffix(".png"))
    print(f"wrote {stem}.json and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
