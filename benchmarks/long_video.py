"""Long videos arriving among decoding streams: inter-token latency, video TTFT, output throughput.

    python benchmarks/long_video.py --arch llava-onevision --size mid [options]
    python benchmarks/long_video.py --model DIR [options]

``--streams`` text requests decode continuously (each slot issues a new request of ``--stream-out``
tokens when its last one ends) while ``--videos`` video requests (one mp4 of ``--video``
FRAMESxWxH each, ``--video-out`` tokens) arrive every ``--interval`` seconds. Each step budget in
``--budgets`` (``--max-num-batched-tokens``) is served by:

* ``stock``: stock vLLM, chunked prefill splitting vision items freely (no ``--disable-chunked-mm-input``);
* ``v2drop-chunked``: V2Drop with ``chunked_items`` at the same budget;

and once, after them:

* ``v2drop-unsplit``: V2Drop without ``chunked_items`` (vLLM's ``disable_chunked_mm_input`` forced),
  its budget raised to the smallest multiple of 512 that holds a whole video request (measured
  on the first server: the video request's prompt tokens), so one video is one prefill step.

Measured inside the window from the first video's arrival to the last video's completion:
inter-token latency of the decoding streams (gaps between consecutive streamed chunks of a
request, one token each at vLLM's default stream interval; p50, p90, p99, max), time to first
token of the videos, and output throughput (every streamed token of every request in the
window / the window's length). Servers run one at a time (``bench_v2drop.serve``); the machine's
stalls in the window are recorded (``bench_v2drop.StallMonitor``). Writes a JSON file and a PNG.

    python benchmarks/long_video.py --markdown RESULT.json     # the README table of a result file
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_v2drop as bench

from vllm_v2drop.dev.demo import parse_request_stats, read_log, startup_lines
from vllm_v2drop.dev.server import serve

REPO = bench.REPO
ENGINES = ("stock", "v2drop-chunked", "v2drop-unsplit")
# What the benchmark is for, checked on every budget (V2Drop chunked against the others at it).
GOALS = ("V2Drop chunked: decode p99 ITL <= 1.1x stock's and below V2Drop unsplit's; "
         "video TTFT and output tok/s no worse than stock's")


# ----------------------------------------------------------------------------------------- client


async def stream_request(client, model: str, content: list[dict], max_tokens: int, rid: str,
                         rec: dict | None = None) -> dict:
    """One streaming chat completion into ``rec``: its start, the arrival time of every streamed token
    chunk, the usage. A cancelled request keeps the chunks it saw in ``rec``."""
    rec = {} if rec is None else rec
    rec.update(id=rid, start=time.perf_counter(), times=[], prompt_tokens=None, completion_tokens=None)
    stream = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": content}], max_tokens=max_tokens, temperature=0.0,
        stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
        extra_headers={"X-Request-Id": rid})
    try:
        async for chunk in stream:
            # Every chunk with a choice carries one token, but the first, which only opens the
            # assistant's message (it comes with the first token).
            if chunk.choices and not chunk.choices[0].delta.role:
                rec["times"].append(time.perf_counter())
            if chunk.usage is not None:
                rec["prompt_tokens"] = chunk.usage.prompt_tokens
                rec["completion_tokens"] = chunk.usage.completion_tokens
    finally:
        # A cancelled stream is closed here, so the server aborts the request.
        await stream.close()
    return rec


async def run_mix(url: str, model: str, args, texts: list[list[dict]], videos: list[list[dict]], tag: str) -> dict:
    """Decoding streams from the start; after ``--warmup`` s one video every ``--interval`` s; the
    streams stop (their requests aborted) once the last video has finished."""
    import openai

    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="EMPTY", max_retries=0, timeout=3600)
    stop = asyncio.Event()
    streams: list[dict] = []  # every decoding request, finished or cut off at the end
    counter = 0

    async def slot(k: int) -> None:
        nonlocal counter
        # The slots' first requests are shorter, by different amounts, so the streams do not all
        # end (and start anew) in the same step.
        out = max(8, args.stream_out * (k + 1) // args.streams)
        while not stop.is_set():
            i, counter = counter, counter + 1
            rec = {"id": f"{tag}-text-{i}", "times": [], "cut": True}
            streams.append(rec)
            task = asyncio.ensure_future(stream_request(client, model, texts[i % len(texts)], out, rec["id"], rec))
            out = args.stream_out
            stopper = asyncio.ensure_future(stop.wait())
            done, _ = await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if task in done:
                stopper.cancel()
                task.result()  # raises what the request raised
                rec["cut"] = False
            else:  # the run is over: abort the request, keep the chunks it streamed
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                break

    async def video(j: int) -> dict:
        await asyncio.sleep(args.warmup + j * args.interval)
        return await stream_request(client, model, videos[j % len(videos)], args.video_out, f"{tag}-video-{j}")

    t_wall0 = time.time()
    t0 = time.perf_counter()
    slots = [asyncio.ensure_future(slot(k)) for k in range(args.streams)]
    vids = await asyncio.gather(*(video(j) for j in range(args.videos)))
    stop.set()
    await asyncio.gather(*slots, return_exceptions=True)
    await client.close()
    return {"t0": t0, "wall_t0": t_wall0, "videos": vids, "streams": streams}


# ----------------------------------------------------------------------------------------- metrics


def chunk_timeline(mix: dict) -> dict:
    """Per decoding request its chunk times, and per video its start and chunk times (s from the run's start)."""
    t0 = mix["t0"]
    r = lambda xs: [round(x - t0, 4) for x in xs]  # noqa: E731
    return {"streams": [r(rec["times"]) for rec in mix["streams"]],
            "videos": [{"start": round(v["start"] - t0, 4), "times": r(v["times"])} for v in mix["videos"]]}


def window(tl: dict) -> tuple[float, float]:
    """The measured window of a run: from the first video's arrival to the last video's last token."""
    vids = tl["videos"]
    return min(v["start"] for v in vids), max(v["times"][-1] if v["times"] else v["start"] for v in vids)


def window_metrics(timelines: list[dict]) -> dict:
    """The metrics of the windows of one or more runs (timelines of :func:`chunk_timeline`), pooled."""
    gaps, ttfts, tokens, length, reqs = [], [], 0, 0.0, 0
    for tl in timelines:
        w0, w1 = window(tl)
        length += w1 - w0
        for ts in tl["streams"]:
            tokens += sum(w0 <= t <= w1 for t in ts)
            reqs += any(w0 <= t <= w1 for t in ts)
            gaps += [b - a for a, b in zip(ts, ts[1:]) if w0 <= b <= w1]
        tokens += sum(w0 <= t <= w1 for v in tl["videos"] for t in v["times"])
        ttfts += [v["times"][0] - v["start"] for v in tl["videos"] if v["times"]]
    return {
        "window_s": length,
        "decode_requests_in_window": reqs,
        "itl_samples": len(gaps),
        "itl_p50_s": bench.pct(gaps, 0.5),
        "itl_p90_s": bench.pct(gaps, 0.9),
        "itl_p99_s": bench.pct(gaps, 0.99),
        "itl_max_s": max(gaps, default=float("nan")),
        "video_ttft_median_s": statistics.median(ttfts) if ttfts else float("nan"),
        "video_ttft_max_s": max(ttfts, default=float("nan")),
        "video_ttfts_s": ttfts,
        "output_tok_s": tokens / length if length else float("nan"),
    }


def tokens_per_chunk(mix: dict) -> float:
    """Completion tokens per counted chunk of the finished requests: 1.0 at vLLM's default stream interval."""
    done = [r for r in [*mix["streams"], *mix["videos"]] if r.get("completion_tokens")]
    return sum(r["completion_tokens"] for r in done) / max(sum(len(r["times"]) for r in done), 1)


# ------------------------------------------------------------------------------------------- main

# vLLM sizes its encoder cache (and the encoder's per-step budget) as max(--max-num-batched-tokens,
# the largest item its profiler assumes), and the profiler caps a video at 14-16 frames: with the
# small vision towers of the CPU models (16 rows a frame) a long video would be refused at the
# smaller budgets. Every server of a run gets the same larger encoder cache through this
# sitecustomize (on the servers' PYTHONPATH); it changes what is admitted, not what is computed.
ENCODER_CACHE_SITE = """\
import importlib.abc, importlib.machinery, os, sys

_TOKENS = int(os.environ.get("LONG_VIDEO_ENCODER_CACHE_TOKENS") or 0)
_TARGET = "vllm.v1.core.encoder_cache_manager"


def _patch(mod):
    original = mod.compute_mm_encoder_budget

    def compute_mm_encoder_budget(scheduler_config, mm_max_toks_per_item):
        compute, cache = original(scheduler_config, mm_max_toks_per_item)
        if not mm_max_toks_per_item:
            return compute, cache
        print(f"long_video.py: encoder cache and budget raised to {_TOKENS} tokens", file=sys.stderr, flush=True)
        return max(compute, _TOKENS), max(cache, _TOKENS)

    mod.compute_mm_encoder_budget = compute_mm_encoder_budget


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != _TARGET:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        exec_module = spec.loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            _patch(module)

        spec.loader.exec_module = exec_and_patch
        return spec


if _TOKENS:
    sys.meta_path.insert(0, _Finder())
"""


def encoder_cache_env(log_dir: Path, tokens: int) -> dict[str, str]:
    """The servers' environment for an encoder cache of ``tokens`` (see ENCODER_CACHE_SITE)."""
    site = log_dir / "long-video-site"
    site.mkdir(parents=True, exist_ok=True)
    (site / "sitecustomize.py").write_text(ENCODER_CACHE_SITE)
    path = os.pathsep.join(x for x in (str(site), os.environ.get("PYTHONPATH", "")) if x)
    return {"PYTHONPATH": path, "LONG_VIDEO_ENCODER_CACHE_TOKENS": str(tokens)}



def server_args(args, budget: int, impl: str, v2cfg: dict) -> list[str]:
    """Engine settings: the same for every engine but the budget, chunking of vision items and the impl."""
    limits = {"image": 0, "video": {"count": 1, "num_frames": args.video_frames}}
    common = ["--max-model-len", str(args.max_model_len), "--limit-mm-per-prompt", json.dumps(limits),
              "--media-io-kwargs", json.dumps({"video": {"num_frames": args.video_frames}}),
              "--seed", "0", "--no-enable-prefix-caching", "--max-num-seqs", str(args.max_num_seqs),
              "--max-num-batched-tokens", str(budget)]
    if args.kv_cache_bytes:
        common += ["--kv-cache-memory-bytes", str(args.kv_cache_bytes)]
    if args.built:
        common += ["--enforce-eager", "--dtype", "float32"]
    common += shlex.split(args.server_args)
    if impl == "stock":
        return common
    cfg = {**v2cfg, "chunked_items": impl == "v2drop-chunked"}
    return common + ["--model-impl", "v2drop", "--additional-config", json.dumps({"v2drop": cfg})]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--markdown"]:
        print(markdown_table(json.loads(Path(argv[1]).read_text())))
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="model directory or hub name")
    src.add_argument("--arch", choices=("llava-onevision", "qwen2-vl", "qwen2.5-vl"),
                     help="build a random-weight model of this architecture (with --size)")
    p.add_argument("--size", choices=("tiny", "mid", "7b"), default="tiny", help="with --arch (see bench_v2drop.py)")
    p.add_argument("--models-dir", default=str(REPO / "build" / "bench-models"))
    p.add_argument("--budgets", default="512,2048", help="--max-num-batched-tokens values, comma-separated")
    p.add_argument("--streams", type=int, default=32, help="decoding streams (text requests, continuously)")
    p.add_argument("--stream-text", type=int, default=32, help="words in a decoding stream's prompt")
    p.add_argument("--stream-out", type=int, default=256, help="tokens per decoding request")
    p.add_argument("--video", default="32x128x128", help="FRAMESxWxH of every video (mp4)")
    p.add_argument("--videos", type=int, default=4, help="video requests per run")
    p.add_argument("--interval", type=float, default=8.0, help="seconds between video arrivals")
    p.add_argument("--warmup", type=float, default=5.0, help="seconds of decoding before the first video")
    p.add_argument("--video-out", type=int, default=8, help="tokens per video request")
    p.add_argument("--v2drop-config", default="{}", help="V2Drop settings (JSON) of both V2Drop engines")
    p.add_argument("--max-model-len", type=int, default=8192)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--kv-cache-bytes", type=int, default=None,
                   help="KV cache size (default: 512 MiB without CUDA, vLLM's default with; 0 = vLLM's default)")
    p.add_argument("--server-args", default="", help="more `vllm serve` arguments, given to every server")
    p.add_argument("--unsplit-budget", type=int, default=None,
                   help="V2Drop unsplit's budget (default: the video request's prompt tokens, rounded up to 512)")
    p.add_argument("--encoder-cache-tokens", type=int, default=None,
                   help="vLLM's encoder cache size and per-step encoder budget in every server (default: "
                        "--max-model-len; 0: vLLM's own sizing, which may refuse long videos)")
    p.add_argument("--rounds", type=int, default=1,
                   help="repeats of the whole sequence of servers (odd rounds in reverse order); pooled")
    p.add_argument("--engines", default=",".join(ENGINES), help="which engines to run (comma-separated)")
    p.add_argument("--out", default=None, help="JSON result file (a .png is written beside it)")
    p.add_argument("--label", default=None)
    p.add_argument("--log-dir", default=str(REPO / "build" / "bench-logs"))
    args = p.parse_args(argv)

    v2cfg = json.loads(args.v2drop_config)
    if args.kv_cache_bytes is None:
        try:
            import torch

            args.kv_cache_bytes = 0 if torch.cuda.is_available() else 512 << 20
        except ImportError:
            args.kv_cache_bytes = 512 << 20
    args.built = args.arch is not None and args.size != "7b"
    model = str(bench.build_model(args.arch, args.size, Path(args.models_dir)) if args.arch else args.model)
    budgets = [int(b) for b in args.budgets.split(",")]
    engines = [e for e in args.engines.split(",") if e]
    if unknown := set(engines) - set(ENGINES):
        raise SystemExit(f"--engines: unknown {sorted(unknown)}")
    video = tuple(int(x) for x in args.video.split("x"))
    args.video_frames = video[0]
    label = args.label or f"long-video-{Path(model).name}"
    out_path = Path(args.out or REPO / "benchmarks" / "results" / f"{label}.json")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    log_dir = Path(args.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)

    if args.encoder_cache_tokens is None:
        args.encoder_cache_tokens = args.max_model_len
    env = encoder_cache_env(log_dir, args.encoder_cache_tokens) if args.encoder_cache_tokens else {}
    print(f"model: {model}", flush=True)
    print("preparing request contents ...", flush=True)
    texts = [[{"type": "text", "text": bench.prompt_text(args.stream_text, 50_000 + i)}] for i in range(64)]
    videos = [[bench.media_part("video", video, 7_000 + j), {"type": "text", "text": bench.prompt_text(16, 60_000 + j)}]
              for j in range(args.videos)]
    probe = [bench.media_part("video", video, 6_999), {"type": "text", "text": bench.prompt_text(16, 59_999)}]

    plan = [(impl, b) for b in budgets for impl in ("stock", "v2drop-chunked") if impl in engines]
    runs: list[dict] = []
    video_prompt_tokens = None
    monitor = bench.StallMonitor()
    startup: list[str] = []
    v2_rows: dict[str, list] = {}
    todo = list(plan) + ([("v2drop-unsplit", None)] if "v2drop-unsplit" in engines else [])
    order = [(rnd, impl, b) for rnd in range(args.rounds) for impl, b in (todo if rnd % 2 == 0 else todo[::-1])]
    for rnd, impl, budget in order:
        if budget is None:  # the unsplit engine: one video request per step
            need = video_prompt_tokens or 0
            budget = args.unsplit_budget or max(512 * math.ceil((need + 1) / 512), max(budgets))
        tag = f"{impl}-{budget}" + (f"-r{rnd}" if args.rounds > 1 else "")
        sargs = server_args(args, budget, impl, v2cfg)
        log_path = log_dir / f"{label}-{tag}.log"
        print(f"\n[{tag}] starting vllm serve {' '.join(sargs)}", flush=True)
        t_start = time.monotonic()
        with serve(model, sargs, log_path=log_path, startup_timeout=900, env=env) as url:
            print(f"[{tag}] up after {time.monotonic() - t_start:.0f} s; warm-up video", flush=True)
            warm = asyncio.run(_one(url, model, probe, f"{tag}-warmup"))
            video_prompt_tokens = video_prompt_tokens or warm["prompt_tokens"]
            print(f"[{tag}] warm-up video: {warm['prompt_tokens']} prompt tokens, TTFT "
                  f"{warm['times'][0] - warm['start']:.2f} s (alone); running the mix", flush=True)
            load = os.getloadavg()[0]
            before = bench.scrape(url)
            mix = asyncio.run(run_mix(url, model, args, texts, videos, tag))
            counters = bench.counter_delta(before, bench.scrape(url))
            tl = chunk_timeline(mix)
            s = window_metrics([tl])
            w0, w1 = window(tl)
            s["stall_s"] = monitor.stalled(mix["wall_t0"] + w0, mix["wall_t0"] + w1)
            s["preemptions"] = counters.get("vllm:num_preemptions_total", 0.0)
            s["tokens_per_chunk"] = tokens_per_chunk(mix)
            s["video_prompt_tokens"] = [v["prompt_tokens"] for v in mix["videos"]]
            s["warmup_video_alone_ttft_s"] = warm["times"][0] - warm["start"]
            s["load_average_1min_before"] = load
        text = read_log(log_path)
        if args.encoder_cache_tokens and "encoder cache and budget raised" not in text:
            raise SystemExit(f"{log_path}: the encoder cache was not raised (vLLM changed? see ENCODER_CACHE_SITE)")
        if impl != "stock":
            startup = startup or startup_lines(text)
            stats = [st for st in parse_request_stats(text) if "-video-" in st.request_id]
            if stats:
                v2_rows[impl] = list(stats[0].rows_per_stage)
        print(f"[{tag}] window {s['window_s']:.1f} s: ITL p50 {bench.fmt(s['itl_p50_s'], ' s')}, p99 "
              f"{bench.fmt(s['itl_p99_s'], ' s')}, max {bench.fmt(s['itl_max_s'], ' s')}; video TTFT p50 "
              f"{bench.fmt(s['video_ttft_median_s'], ' s')}; {bench.fmt(s['output_tok_s'], ' tok/s')}; "
              f"machine stalled {s['stall_s']:.2f} s", flush=True)
        runs.append({"round": rnd, "engine": impl, "budget": budget, "server_args": sargs, "summary": s,
                     "timeline": tl})
        # What is measured so far, should a later server fail.
        out_path.with_suffix(".partial.json").write_text(json.dumps(runs) + "\n")
    monitor.close()

    report = make_report(args, model, v2cfg, budgets, runs, startup, v2_rows, label, video)
    out_path.write_text(json.dumps(report, indent=1) + "\n")
    out_path.with_suffix(".partial.json").unlink(missing_ok=True)
    png = out_path.with_suffix(".png")
    plot(report, png)
    print("\n" + markdown_table(report))
    print(f"\nwrote {out_path} and {png}", flush=True)
    return 0


async def _one(url: str, model: str, content: list[dict], rid: str) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="EMPTY", max_retries=0, timeout=3600)
    try:
        return await stream_request(client, model, content, 2, rid)
    finally:
        await client.close()


def _ratio(a, b):
    return a / b if a is not None and b and not math.isnan(a) and not math.isnan(b) else None


def make_report(args, model, v2cfg, budgets, runs, startup, v2_rows, label, video) -> dict:
    import vllm

    # Per engine and budget, the windows of every round pooled.
    keys = list(dict.fromkeys((r["engine"], r["budget"]) for r in runs))
    results = []
    for engine, budget in keys:
        mine = [r for r in runs if (r["engine"], r["budget"]) == (engine, budget)]
        pooled = window_metrics([r["timeline"] for r in mine])
        pooled["stall_s"] = sum(r["summary"]["stall_s"] for r in mine)
        pooled["preemptions"] = sum(r["summary"]["preemptions"] for r in mine)
        pooled["rounds"] = len(mine)
        pooled["per_round"] = {k: [r["summary"][k] for r in mine]
                               for k in ("itl_p50_s", "itl_p99_s", "video_ttft_median_s", "output_tok_s")}
        results.append({"engine": engine, "budget": budget, "summary": pooled})
    by = {(r["engine"], r["budget"]): r["summary"] for r in results}
    unsplit = next((r for r in results if r["engine"] == "v2drop-unsplit"), None)
    comparisons = []
    for b in budgets:
        st, ch = by.get(("stock", b)), by.get(("v2drop-chunked", b))
        un = unsplit["summary"] if unsplit else None
        if not (st and ch):
            continue
        c = {"budget": b,
             "per_round_p99_chunked_over_stock": [_ratio(x, y) for x, y in zip(ch["per_round"]["itl_p99_s"],
                                                                                 st["per_round"]["itl_p99_s"])],
             "chunked_over_stock": {k: _ratio(ch[k], st[k]) for k in
                                    ("itl_p50_s", "itl_p99_s", "itl_max_s", "video_ttft_median_s", "output_tok_s")},
             "chunked_over_unsplit": {k: _ratio(ch[k], un[k]) for k in ("itl_p99_s", "itl_max_s")} if un else None}
        r = c["chunked_over_stock"]
        c["goals"] = {
            "p99_itl_within_1.1x_stock": r["itl_p99_s"] is not None and r["itl_p99_s"] <= 1.1,
            "p99_itl_below_unsplit": (c["chunked_over_unsplit"]["itl_p99_s"] is not None
                                      and c["chunked_over_unsplit"]["itl_p99_s"] < 1.0) if un else None,
            "video_ttft_no_worse_than_stock": r["video_ttft_median_s"] is not None and r["video_ttft_median_s"] <= 1.0,
            "output_tok_s_no_worse_than_stock": r["output_tok_s"] is not None and r["output_tok_s"] >= 1.0,
        }
        comparisons.append(c)
    model_cfg = json.loads(Path(model, "config.json").read_text()) if Path(model, "config.json").exists() else {}
    return {
        "label": label,
        "command": "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, REPO), *sys.argv[1:]]),
        "model": model,
        "architecture": (model_cfg.get("architectures") or [None])[0],
        "workload": {"streams": args.streams, "stream_text_words": args.stream_text, "stream_out": args.stream_out,
                     "video": list(video), "videos": args.videos, "interval_s": args.interval,
                     "warmup_s": args.warmup, "video_out": args.video_out},
        "encoder_cache_tokens": args.encoder_cache_tokens,
        "v2drop_config": v2cfg,
        "v2drop_startup_log": startup,
        "video_rows_per_stage": v2_rows,
        "budgets": budgets,
        "goals": GOALS,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "vllm": vllm.__version__, "load_average": os.getloadavg()},
        "rounds": max((r["round"] for r in runs), default=0) + 1,
        "results": results,
        "comparisons": comparisons,
        "runs": runs,
    }


def _ms(v) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{1000 * v:.0f}"


def markdown_table(report: dict) -> str:
    """Engine x budget: decode ITL, video TTFT, output tok/s; then V2Drop chunked / stock (and / unsplit)."""
    rows = ["| budget | engine | decode ITL p50 (ms) | p99 (ms) (per round) | max (ms) | video TTFT p50 (s) | "
            "output tok/s | "
            "machine stall in window (s) |", "|---|---|---|---|---|---|---|---|"]
    unsplit = next((r for r in report["results"] if r["engine"] == "v2drop-unsplit"), None)
    for b in report["budgets"]:
        for r in [x for x in report["results"] if x["budget"] == b and x["engine"] != "v2drop-unsplit"] + (
                [unsplit] if unsplit else []):
            s = r["summary"]
            name = r["engine"] + (f" (budget {r['budget']})" if r["engine"] == "v2drop-unsplit" else "")
            per = "" if s["rounds"] < 2 else " (" + ", ".join(_ms(x) for x in s["per_round"]["itl_p99_s"]) + ")"
            rows.append(f"| {b} | {name} | {_ms(s['itl_p50_s'])} | {_ms(s['itl_p99_s'])}{per} | "
                        f"{_ms(s['itl_max_s'])} | "
                        f"{bench.fmt(s['video_ttft_median_s'])} | {bench.fmt(s['output_tok_s'])} | "
                        f"{s['stall_s']:.2f} |")
    rows += ["", "| budget | ITL p50 chunked/stock | ITL p99 chunked/stock | ITL p99 chunked/unsplit | "
             "video TTFT chunked/stock | output tok/s chunked/stock | goals met |", "|---|---|---|---|---|---|---|"]
    for c in report["comparisons"]:
        r, u, g = c["chunked_over_stock"], c["chunked_over_unsplit"] or {}, c["goals"]
        met = ", ".join(f"{k}: {'yes' if v else 'no'}" for k, v in g.items() if v is not None)
        rows.append(f"| {c['budget']} | {bench.fmt(r['itl_p50_s'])} | {bench.fmt(r['itl_p99_s'])} | "
                    f"{bench.fmt(u.get('itl_p99_s'))} | {bench.fmt(r['video_ttft_median_s'])} | "
                    f"{bench.fmt(r['output_tok_s'])} | {met} |")
    return "\n".join(rows)


def plot(report: dict, png: Path) -> None:
    """Left: decode ITL p50 / p99 per engine and budget. Right: each first-round run's ITL over time
    (the largest gap ending in each 0.25 s, drawn back to the previous bin with a gap)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = report["results"]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [1, 1.6]})
    names = [f"{r['engine']}\n@{r['budget']}" for r in runs]
    xs = range(len(runs))
    p50 = [1000 * r["summary"]["itl_p50_s"] for r in runs]
    p99 = [1000 * r["summary"]["itl_p99_s"] for r in runs]
    ax.bar([x - 0.2 for x in xs], p50, 0.4, label="ITL p50")
    ax.bar([x + 0.2 for x in xs], p99, 0.4, label="ITL p99")
    for x, v in zip(xs, p99):
        ax.annotate(f"{v:.0f}", (x + 0.2, v), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(list(xs), names, fontsize=7)
    ax.set_ylabel("decode inter-token latency (ms)")
    ax.legend(fontsize=7)
    first = [r for r in report["runs"] if r["round"] == 0]
    for r in first:
        tl = r["timeline"]
        gaps = [(b, b - a) for ts in tl["streams"] for a, b in zip(ts, ts[1:])]
        if not gaps:
            continue
        bins: dict[int, float] = {}
        for t, g in gaps:
            bins[int(t / 0.25)] = max(bins.get(int(t / 0.25), 0.0), g)
        ks = sorted(bins)
        bx.plot([k * 0.25 for k in ks], [1000 * bins[k] for k in ks], lw=0.8, drawstyle="steps-pre",
                label=f"{r['engine']} @{r['budget']}")
    for v in (first[0]["timeline"]["videos"] if first else []):
        bx.axvline(v["start"], color="grey", lw=0.5, ls=":")
    bx.set_xlabel("s from the start of the run, first round (dotted: video arrivals)")
    bx.set_ylabel("largest ITL ending in each 0.25 s (ms)")
    bx.legend(fontsize=7)
    fig.suptitle(f"{report['label']}: decoding streams beside long videos (vLLM {report['machine']['vllm']})",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
