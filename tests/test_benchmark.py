"""benchmarks/: the FLOP model, the benchmark script's parsing / report / plot, the committed results."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from vllm_v2drop.config import V2DropConfig
from vllm_v2drop.core.request_plan import plan_request
from vllm_v2drop.dev.demo import parse_request_stats

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import bench_v2drop
import flops
import long_video

TINY_OV_CONFIG = {
    "architectures": ["LlavaOnevisionForConditionalGeneration"],
    "text_config": {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 8,
                    "num_attention_heads": 4, "num_key_value_heads": 2},
}
LLAVA7B_CONFIG = {
    "architectures": ["LlavaForConditionalGeneration"],
    "text_config": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                    "num_attention_heads": 32, "num_key_value_heads": 32},
}


# ------------------------------------------------------------------------------------------ flops


def test_lm_shape_reads_text_config():
    s = flops.lm_shape(TINY_OV_CONFIG)
    assert (s.hidden_size, s.num_layers, s.num_heads, s.num_kv_heads, s.head_dim) == (128, 8, 4, 2, 32)
    # q + k + v + o + gate/up/down
    assert s.linear_weights_per_layer == 128 * 128 + 2 * 128 * 64 + 128 * 128 + 3 * 128 * 256


def test_no_drop_means_no_speedup():
    shape = flops.lm_shape(LLAVA7B_CONFIG)
    sched = flops.schedule_for(LLAVA7B_CONFIG, {"metric": "none"})
    r = flops.ideal_speedup(shape, [flops.Request(640, (576,))], sched)
    assert r["ideal_prefill_speedup"] == pytest.approx(1.0)


def test_llava_reference_schedule_rows_and_speedup():
    """LLaVA-1.5's 576 -> 288 -> 144 -> 1 schedule: rows per layer are the plan's, plus the text rows."""
    shape = flops.lm_shape(LLAVA7B_CONFIG)
    sched = flops.schedule_for(LLAVA7B_CONFIG, {})
    assert sched.layers == (3, 17, 22)
    req = flops.Request(prompt_tokens=576 + 64, items=(576,))
    rows = flops.rows_in_layers(req, sched.layers, sched.keep_ratios, 32)
    assert rows == [640] * 3 + [64 + 288] * 14 + [64 + 144] * 5 + [64 + 1] * 10
    # The same counts as the plan of a real request with that item.
    plan = plan_request([list(range(10, 586))], 640, sched.keep_ratios)
    assert [64 + r for r in plan.rows_per_layer(sched.layers, 32)] == rows
    r = flops.ideal_speedup(shape, [req], sched)
    linear_only = 32 * 640 / sum(rows)
    assert linear_only < r["ideal_prefill_speedup"] < linear_only * 1.1  # attention adds a little (quadratic)
    # Text-only requests are not pruned.
    assert flops.ideal_speedup(shape, [flops.Request(100)], sched)["ideal_prefill_speedup"] == pytest.approx(1.0)


def test_flop_model_agrees_with_logged_rows():
    """What the engine logs (rows per stage) is what the FLOP model plans for the same items."""
    line = ("INFO [runtime.py:186] V2Drop request chatcmpl-abc-123: 664 vision rows in 1 item(s); rows per stage "
            "664 -> 181 -> 49 -> 1 (layers [1, 5, 6]); average retention 27.1%; KV slots not written 3873")
    (st,) = parse_request_stats(line)
    # The logged run used video-25's 28-layer ratios (before budget presets re-solved them per depth).
    config = {"preset": "video-25", "keep_ratios": [0.274, 0.274, 0.0]}
    sched = V2DropConfig.from_additional_config({"v2drop": config}).resolve(8, "LlavaOnevisionForConditionalGeneration")
    assert sched.layers == st.layers
    rows = flops.rows_in_layers(flops.Request(677, (664,)), sched.layers, sched.keep_ratios, 8)
    assert [r - 13 for r in rows] == [664, 181, 181, 181, 181, 49, 1, 1]
    assert (664, 181, 49, 1) == st.rows_per_stage


# -------------------------------------------------------------------------------------- bench script


def test_workload_spec_parsing():
    w = bench_v2drop.Workload.parse("name=mix,images=384x384+640x480,video=16x128x96,text=10,out=4,n=3,conc=2,rate=1.5",
                                    0)
    assert w.images == [(384, 384), (640, 480)] and w.video == (16, 128, 96)
    assert (w.text, w.out, w.n, w.conc, w.rate) == (10, 4, 3, 2, 1.5)
    assert w.media_specs() == [("image", (384, 384)), ("image", (640, 480)), ("video", (16, 128, 96))]
    assert bench_v2drop.Workload.parse("video=8x64x64", 3).name == "w3"
    with pytest.raises(SystemExit, match="unknown key"):
        bench_v2drop.Workload.parse("imgs=1", 0)
    with pytest.raises(SystemExit, match="WxH"):
        bench_v2drop.Workload.parse("images=384", 0)


def test_requests_are_identical_for_both_servers():
    w = bench_v2drop.Workload.parse("images=64x48,video=4x64x64,text=5,n=2", 0)
    a, b = bench_v2drop.build_requests(w, 0), bench_v2drop.build_requests(w, 0)
    assert a == b and a[0] != a[1]
    assert [p["type"] for p in a[0]] == ["image_url", "video_url", "text"]
    assert a[0][1]["video_url"]["url"].startswith("data:video/mp4;base64,")


def test_metrics_scrape_parsing():
    text = ('# HELP x\nvllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25\n'
            'vllm:prompt_tokens_total{engine="0"} 1875.0\nvllm:request_prefill_time_seconds_sum{a="b"} 1.5e-01\n')
    got = {m[1]: float(m[3]) for line in text.splitlines() if (m := bench_v2drop._METRIC_LINE.match(line))}
    assert got == {"vllm:kv_cache_usage_perc": 0.25, "vllm:prompt_tokens_total": 1875.0,
                   "vllm:request_prefill_time_seconds_sum": 0.15}
    assert bench_v2drop.pct([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 0.9) == pytest.approx(9.1)


def test_report_and_plot_from_synthetic_runs(tmp_path):
    """make_report pools rounds and computes ratios, FLOP-ideal speed-up and the plan cross-check; plot writes a PNG."""
    from vllm_v2drop.dev.demo import RequestStats

    w = bench_v2drop.Workload.parse("name=img,images=384x384,n=2", 0)
    runs, v2_stats = [], {}
    for rnd in range(2):
        for impl, ttft in (("stock", 0.4), ("v2drop", 0.2)):
            recs = [bench_v2drop.Record(f"chatcmpl-{impl}-r{rnd}-img-{i}", ttft, ttft + 0.1, 677, 8) for i in range(2)]
            s = bench_v2drop.summarize(recs, 0.5, {"vllm:prompt_tokens_total": 1354,
                                                   "vllm:request_prefill_time_seconds_sum": 2 * ttft},
                                       0.1 if impl == "stock" else 0.05)
            runs.append({"round": rnd, "impl": impl, "workload": "img", "summary": s,
                         "records": [vars(r) for r in recs]})
            if impl == "v2drop":
                for r in recs:
                    v2_stats[r.request_id + "-x"] = RequestStats(r.request_id + "-x", 664, 1, (664, 181, 49, 1),
                                                                 (1, 5, 6), 0.271, 3873)

    class Args:
        rounds = 2

    report = bench_v2drop.make_report(Args, "m", TINY_OV_CONFIG, {}, [w], runs, {str(("image", (384, 384))): 664},
                                      v2_stats, ["V2Drop: ..."], ["--x"], "synthetic")
    (e,) = report["results"]
    assert e["measured_ttft_speedup"] == pytest.approx(2.0)
    assert e["measured_prefill_speedup"] == pytest.approx(2.0)
    assert e["ratio_v2drop_over_stock"]["kv_usage_peak"] == pytest.approx(0.5)
    assert len(e["per_round_ratio"]) == 2
    assert e["v2drop_rows"]["requests_logged"] == 4 and e["v2drop_rows"]["rows_per_stage_per_request"] == [664, 181,
                                                                                                            49, 1]
    assert e["flops"]["plan_matches_log"] and e["flops"]["ideal_prefill_speedup"] > 3
    json.dumps(report)
    png = tmp_path / "r.png"
    bench_v2drop.plot(report, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_variants_are_extra_v2drop_servers_with_their_ratios(tmp_path):
    """--variant NAME=JSON: the base config with JSON's keys over it; the report's ratios to stock and v2drop."""
    base = {"kv_mode": "shared", "quality_probe": None}
    got = bench_v2drop.parse_variants(['probe-1={"quality_probe": {"rate": 1.0}}', "off={}"], base)
    assert got == {"probe-1": {"kv_mode": "shared", "quality_probe": {"rate": 1.0}}, "off": base}
    for bad in ("probe", "v2drop={}", "a b={}", "x=[1]", "x={"):
        with pytest.raises(SystemExit, match="--variant"):
            bench_v2drop.parse_variants([bad], base)
    with pytest.raises(SystemExit, match="new NAME"):
        bench_v2drop.parse_variants(["x={}", "x={}"], base)

    w = bench_v2drop.Workload.parse("name=dec,images=64x64,out=16,n=2", 0)
    runs = []
    for rnd in range(2):
        for impl, wall, shadows in (("stock", 1.0, 0), ("v2drop", 0.8, 0), ("probe-1", 1.0, 2)):
            recs = [bench_v2drop.Record(f"{impl}-r{rnd}-{i}", 0.1, wall, 150, 16) for i in range(2)]
            s = bench_v2drop.summarize(recs, wall, {"vllm:v2drop_probe_requests_total": shadows,
                                                    "vllm:v2drop_probe_skipped_total": 1}, 0.1)
            runs.append({"round": rnd, "impl": impl, "workload": "dec", "summary": s,
                         "records": [vars(r) for r in recs]})

    class Args:
        rounds = 2

    report = bench_v2drop.make_report(Args, "m", TINY_OV_CONFIG, {}, [w], runs, {}, {}, [], [], "synthetic",
                                      {"probe-1": {"quality_probe": {"rate": 1.0}}})
    (e,) = report["results"]
    v = e["variants"]["probe-1"]
    assert e["ratio_v2drop_over_stock"]["output_tok_s"] == pytest.approx(1.25)
    assert v["ratio_over_stock"]["output_tok_s"] == pytest.approx(1.0)
    assert v["ratio_over_v2drop"]["output_tok_s"] == pytest.approx(0.8)
    assert [r["output_tok_s"] for r in v["per_round_ratio_over_v2drop"]] == pytest.approx([0.8, 0.8])
    assert (e["per_impl"]["probe-1"]["probe_requests"], e["per_impl"]["probe-1"]["probe_skipped"]) == (4, 2)
    assert report["variants"] == {"probe-1": {"quality_probe": {"rate": 1.0}}}
    json.dumps(report)
    bench_v2drop.plot(report, tmp_path / "r.png")
    assert (tmp_path / "r.png").exists()


# ------------------------------------------------------------------------------- long-video benchmark


def _synthetic_mix(step: float, stall: float) -> dict:
    """Two decoding streams with a token every ``step`` s; one video arriving at 1 s whose prefill
    stalls both streams once for ``stall`` s; its first token then, and 19 more a ``step`` apart."""
    t0 = 100.0
    video_start, first = t0 + 1.0, t0 + 1.0 + stall
    streams = []
    for k in range(2):
        times, t, stalled = [], t0 + 0.01 * k, False
        while t < t0 + 10.0:
            times.append(t)
            t += stall if t >= video_start and not stalled else step
            stalled = stalled or t - times[-1] == stall
        streams.append({"id": f"s{k}", "start": t0, "times": times, "completion_tokens": len(times),
                        "cut": False})
    video = {"id": "v", "start": video_start, "times": [first + i * step for i in range(20)],
             "prompt_tokens": 4136, "completion_tokens": 20}
    return {"t0": t0, "wall_t0": 0.0, "videos": [video], "streams": streams}


def test_long_video_window_metrics():
    mix = _synthetic_mix(step=0.05, stall=0.5)
    tl = long_video.chunk_timeline(mix)
    assert long_video.window(tl) == pytest.approx((1.0, 1.0 + 0.5 + 19 * 0.05))
    s = long_video.window_metrics([tl])
    assert s["window_s"] == pytest.approx(0.5 + 19 * 0.05)
    assert s["video_ttft_median_s"] == pytest.approx(0.5)
    assert s["itl_p50_s"] == pytest.approx(0.05) and s["itl_max_s"] == pytest.approx(0.5)
    assert long_video.tokens_per_chunk(mix) == pytest.approx(1.0)
    # Tokens streamed inside the window (both streams and the video) over its length.
    assert s["output_tok_s"] == pytest.approx((2 * 20 + 20) / 1.45, rel=0.1)
    # Rounds pool: the same window twice is the same rates, twice the samples.
    two = long_video.window_metrics([tl, tl])
    assert two["itl_samples"] == 2 * s["itl_samples"] and two["output_tok_s"] == pytest.approx(s["output_tok_s"])


def test_long_video_server_args_per_engine():
    class Args:
        max_model_len, video_frames, max_num_seqs, kv_cache_bytes, built, server_args = 8192, 256, 64, 0, True, ""

    stock = long_video.server_args(Args, 512, "stock", {})
    chunked = long_video.server_args(Args, 512, "v2drop-chunked", {"preset": "video-25"})
    unsplit = long_video.server_args(Args, 4608, "v2drop-unsplit", {})
    assert "--disable-chunked-mm-input" not in stock + chunked + unsplit  # stock splits items freely
    assert stock[stock.index("--max-num-batched-tokens") + 1] == "512" and "--model-impl" not in stock
    assert json.loads(chunked[-1]) == {"v2drop": {"preset": "video-25", "chunked_items": True}}
    assert json.loads(unsplit[-1]) == {"v2drop": {"chunked_items": False}}
    assert unsplit[unsplit.index("--max-num-batched-tokens") + 1] == "4608"
    assert chunked[:chunked.index("--model-impl")] == stock  # the same engine settings otherwise


def test_long_video_encoder_cache_site(tmp_path):
    """The servers' sitecustomize raises vLLM's encoder cache and encoder budget, nothing else."""
    env = {**__import__("os").environ, **long_video.encoder_cache_env(tmp_path, 8192)}
    code = ("from types import SimpleNamespace as N\n"
            "from vllm.v1.core.encoder_cache_manager import compute_mm_encoder_budget as f\n"
            "c = N(max_num_encoder_input_tokens=512, encoder_cache_size=512, disable_chunked_mm_input=False,"
            " max_num_batched_tokens=512)\n"
            "print(f(c, {'video': 257}), f(c, {}))\n")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split("\n")[0] == "(8192, 8192) (0, 0)"
    assert "encoder cache and budget raised to 8192 tokens" in out.stderr


def test_long_video_report_table_and_plot(tmp_path):
    runs = []
    for rnd in range(2):
        for engine, budget, stall in (("stock", 512, 0.5), ("v2drop-chunked", 512, 0.3),
                                      ("v2drop-unsplit", 4608, 2.0)):
            tl = long_video.chunk_timeline(_synthetic_mix(step=0.05, stall=stall))
            s = {**long_video.window_metrics([tl]), "stall_s": 0.0, "preemptions": 0.0}
            runs.append({"round": rnd, "engine": engine, "budget": budget, "server_args": [], "summary": s,
                         "timeline": tl})

    class Args:
        streams, stream_text, stream_out, videos, interval, warmup, video_out, encoder_cache_tokens = (
            2, 4, 8, 1, 1.0, 1.0, 2, 8192)

    report = long_video.make_report(Args, str(tmp_path), {}, [512], runs, [], {}, "synthetic", (256, 64, 64))
    (c,) = report["comparisons"]
    assert c["chunked_over_stock"]["video_ttft_median_s"] == pytest.approx(0.3 / 0.5)
    assert c["chunked_over_unsplit"]["itl_max_s"] == pytest.approx(0.3 / 2.0)
    assert c["goals"]["video_ttft_no_worse_than_stock"] and c["goals"]["p99_itl_below_unsplit"]
    assert len(c["per_round_p99_chunked_over_stock"]) == 2 and report["rounds"] == 2
    by = {(r["engine"], r["budget"]): r["summary"] for r in report["results"]}
    assert by["stock", 512]["itl_max_s"] == pytest.approx(0.5) and by["stock", 512]["rounds"] == 2
    table = long_video.markdown_table(report)
    assert "| 512 | v2drop-unsplit (budget 4608) |" in table and "goals met" in table
    json.dumps(report)
    png = tmp_path / "r.png"
    long_video.plot(report, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------------- committed results


@pytest.mark.parametrize("name", ["cpu-tiny-llava-onevision", "cpu-mid-llava-onevision"])
def test_committed_results_are_complete(name):
    path = REPO / "benchmarks" / "results" / f"{name}.json"
    report = json.loads(path.read_text())
    assert path.with_suffix(".png").exists()
    assert report["command"].startswith("python benchmarks/bench_v2drop.py")
    assert report["rounds"] >= 2
    for e in report["results"]:
        assert set(e["per_impl"]) == {"stock", "v2drop"}
        assert all(e["per_impl"][i]["requests"] == e["spec"]["n"] * report["rounds"] for i in e["per_impl"])
        assert e["flops"]["plan_matches_log"] and e["flops"]["ideal_prefill_speedup"] > 1
        assert e["v2drop_rows"]["requests_logged"] == e["v2drop_rows"]["requests"]
    assert f"{name}.json" in (REPO / "benchmarks" / "results" / "README.md").read_text()


def test_committed_long_video_result_is_complete():
    path = REPO / "benchmarks" / "results" / "cpu-long-video-llava-onevision.json"
    report = json.loads(path.read_text())
    assert path.with_suffix(".png").exists()
    assert report["command"].startswith("python benchmarks/long_video.py")
    engines = {(r["engine"], r["budget"]) for r in report["results"]}
    assert {("stock", 512), ("v2drop-chunked", 512), ("stock", 2048), ("v2drop-chunked", 2048)} <= engines
    assert any(e == "v2drop-unsplit" for e, _ in engines)
    assert len(report["comparisons"]) == 2
    for r in report["runs"]:
        assert r["summary"]["tokens_per_chunk"] == pytest.approx(1.0)
        assert max(r["summary"]["video_prompt_tokens"]) > 2048  # a video is longer than the larger budget
    assert "cpu-long-video-llava-onevision.json" in (REPO / "benchmarks" / "results" / "README.md").read_text()


# ----------------------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_bench_script_end_to_end(tiny_models, tmp_path):
    """One round, two tiny workloads: both servers start, every request is measured, the report is written."""
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "bench_v2drop.py"), "--model", str(tiny_models["llava-onevision"]),
           "--rounds", "1", "--stall-retries", "0", "--workload", "name=img,images=160x120,text=4,out=2,n=2,conc=2",
           "--workload", "name=vid,video=4x64x64,text=4,out=2,n=1", "--server-args", "--enforce-eager --dtype float32",
           "--out", str(out), "--log-dir", str(tmp_path / "logs")]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads(out.read_text())
    assert out.with_suffix(".png").exists()
    assert [e["workload"] for e in report["results"]] == ["img", "vid"]
    for e in report["results"]:
        assert e["flops"]["plan_matches_log"], e
        assert e["v2drop_rows"]["requests_logged"] == e["spec"]["n"]
    assert "FLOP-ideal" in proc.stdout


def test_stall_monitor_sees_a_stopped_machine():
    """The stall monitor reports a pause of its own process (what a machine-wide stall looks like to
    it) inside a run's window, and nothing outside it."""
    import os
    import signal
    import time

    monitor = bench_v2drop.StallMonitor(threshold=0.1)
    try:
        time.sleep(0.5)  # started and sleeping
        t0 = time.time()
        os.kill(monitor.proc.pid, signal.SIGSTOP)
        time.sleep(0.4)
        os.kill(monitor.proc.pid, signal.SIGCONT)
        time.sleep(0.1)
        t1 = time.time()
        assert 0.3 < monitor.stalled(t0, t1) <= t1 - t0
        monitor.gaps += [(100.0, 102.0), (105.0, 105.5)]  # a window sees only its part of each gap
        assert monitor.stalled(101.5, 104.0) == pytest.approx(0.5)
        assert monitor.stalled(102.0, 105.0) == 0.0
    finally:
        monitor.close()
