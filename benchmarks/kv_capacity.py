"""KV capacity: KV pages per request and max concurrency, stock vLLM vs V2Drop, on one fixed KV pool.

    python benchmarks/kv_capacity.py --arch qwen2-vl --pool-blocks 65 --media image:448x448
    python benchmarks/kv_capacity.py --model DIR --pool-blocks N [--v2drop-config JSON] ...
    python benchmarks/kv_capacity.py --markdown RESULT.json        # the README table of a result file

Runs the same ``--requests`` identical image (or video) requests on three engines, one at a time,
in this process: stock vLLM, V2Drop ``kv_mode: shared`` and V2Drop ``kv_mode: per_stage`` (same
engine settings; prefix caching off in all three, so identical prompts share no blocks; the
model's default V2Drop schedule unless ``--v2drop-config``). The KV cache is sized to hold
``--pool-blocks`` stock blocks of ``--block-size`` tokens (one of them is vLLM's null block).
All requests are added at once and the engine is stepped by hand (``llm_engine.step()``); after
every step vLLM's own metrics are recorded: ``kv_cache_usage_perc``, running and waiting
requests, preemptions.

A stock block holds every decoder layer (one "page" per layer); with ``per_stage`` a block
holds the layers of one KV-cache group. So memory is counted in one-layer pages: pages in use =
usage x usable blocks x layers per block. Reported per mode: pages per running request when
the engine first runs the most requests (every admitted prompt prefilled in one step), the
plan's prediction (``vllm_v2drop.core.request_plan``: per KV-cache group, ``ceil(compact_len(stage,
prompt) / block_size)`` blocks, as ``tests/test_kv_memory.py`` computes it), the most requests
running at once, preemptions, and the ratios against stock. Writes a JSON file and a PNG beside
it and prints a markdown table. Needs ``VLLM_CPU_KVCACHE_SPACE`` unset on CPU (it overrides the
pool size; this script unsets it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]
os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)  # would override kv_cache_memory_bytes on CPU
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # kv_groups probe via collective_rpc
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# tests/conftest.py: test inputs and engine set-up; tests/test_kv_memory.py: blocks per request, vLLM metrics
from bench_v2drop import REPO, build_model
from conftest import llm_engine, make_image, make_video, mm_request
from test_kv_memory import _blocks_per_request, _metrics

MODES = {"stock": None, "shared": "shared", "per_stage": "per_stage"}  # mode -> kv_mode
ARCH_NAMES = {"LlavaForConditionalGeneration": "llava", "LlavaOnevisionForConditionalGeneration": "llava-onevision",
              "Qwen2VLForConditionalGeneration": "qwen2-vl", "Qwen2_5_VLForConditionalGeneration": "qwen2.5-vl"}


def page_bytes(model_dir: Path, block_size: int, dtype_bytes: int = 4) -> int:
    """Bytes of one layer's K and V for one block."""
    cfg = json.loads((model_dir / "config.json").read_text())
    text = cfg.get("text_config", cfg)
    head_dim = text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]
    return 2 * text["num_key_value_heads"] * head_dim * dtype_bytes * block_size


def make_request(arch: str, model_dir: Path, media: str, text: str) -> dict:
    kind, _, spec = media.partition(":")
    dims = [int(x) for x in spec.split("x")]
    if kind == "image":
        return mm_request(arch, model_dir, images=[make_image(tuple(dims), seed=1)], text=text)
    if kind == "video":
        frames, w, h = dims
        return mm_request(arch, model_dir, video=make_video(frames, h, w, seed=1), text=text)
    raise SystemExit(f"--media {media!r}: image:WxH or video:FRAMESxWxH")


def run_mode(mode: str, args, model_dir: Path, request: dict, v2cfg: dict) -> dict:
    from vllm import SamplingParams

    from vllm_v2drop.config import V2DropConfig
    from vllm_v2drop.core.architectures import base_architecture
    from vllm_v2drop.dev.kv_probe import kv_groups
    from vllm_v2drop.requests import plan_for, request_view

    kv_mode = MODES[mode]
    extra = {} if kv_mode is None else {
        "model_impl": "v2drop", "additional_config": {"v2drop": {**v2cfg, "kv_mode": kv_mode}}}
    more = json.loads(args.engine_args)
    dtype_bytes = 4 if more.get("dtype", "float32") in ("float32", "float") else 2  # the tests' default: float32
    engine_kw = dict(block_size=args.block_size, max_model_len=args.max_model_len, enable_prefix_caching=False,
                     disable_log_stats=False, max_num_batched_tokens=args.max_num_batched_tokens,
                     max_num_seqs=args.max_num_seqs, **more,
                     kv_cache_memory_bytes=args.pool_blocks * args.num_layers
                     * page_bytes(model_dir, args.block_size, dtype_bytes))
    print(f"\n[{mode}] starting the engine ...", flush=True)
    t0 = time.monotonic()
    with llm_engine(model_dir, **engine_kw, **extra) as llm:
        engine = llm.llm_engine
        groups = llm.collective_rpc(kv_groups)[0]
        layers_per_block = max(len(g["layers"]) for g in groups)
        usable = groups[0]["num_blocks"] - 1  # block 0 is vLLM's null block
        model_config = engine.vllm_config.model_config
        schedule = V2DropConfig.from_additional_config({"v2drop": v2cfg}).resolve(
            model_config.hf_text_config.num_hidden_layers, base_architecture(model_config.architecture))
        params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
        print(f"[{mode}] up after {time.monotonic() - t0:.0f} s: {len(groups)} KV-cache group(s) of "
              f"{layers_per_block} layer(s) per block, {usable} usable blocks = {usable * layers_per_block} pages; "
              f"adding {args.requests} requests", flush=True)
        # Processed here, so the plan comes from the very request the scheduler gets; then added in one go
        # (the engine core may still start on the first ones before the rest arrive).
        core_reqs = [engine.input_processor.process_inputs(f"r{i}", request, params,
                                                           supported_tasks=engine.get_supported_tasks())
                     for i in range(args.requests)]
        prompt_len = len(core_reqs[0].prompt_token_ids)
        plan = plan_for(schedule, request_view("r0", prompt_len, core_reqs[0].mm_features, params))
        for i, core_req in enumerate(core_reqs):
            engine.add_request(f"r{i}", core_req, params)
        start_preemptions = _metrics(llm).get("preemptions", 0.0)
        steps, tokens, t1 = [], {}, time.monotonic()
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    tokens[out.request_id] = list(out.outputs[0].token_ids)
            m = _metrics(llm)
            m["preemptions"] -= start_preemptions
            m["pages"] = round(m["usage"] * usable * layers_per_block)
            m["finished"] = len(tokens)
            steps.append(m)
            if sys.stdout.isatty() or len(steps) % 10 == 1 or not engine.has_unfinished_requests():
                print(f"{chr(13) if sys.stdout.isatty() else ''}[{mode}] step {len(steps)}: running "
                      f"{m['running']:.0f}, waiting {m['waiting']:.0f}, finished {len(tokens)}/{args.requests}, "
                      f"KV {100 * m['usage']:.1f}%, preemptions {m['preemptions']:.0f}   ",
                      end="" if sys.stdout.isatty() and engine.has_unfinished_requests() else "\n", flush=True)
        wall = time.monotonic() - t1
    peak = max(s["running"] for s in steps)
    at_peak = next(s for s in steps if s["running"] == peak)
    predicted = _blocks_per_request(groups, plan, prompt_len) * layers_per_block
    return {
        "kv_mode": kv_mode,
        "engine_args": {**engine_kw, **extra},
        "kv_groups": [{"stage": g["stage"], "layers": len(g["layers"])} for g in groups],
        "layers_per_block": layers_per_block,
        "usable_blocks": usable,
        "usable_pages": usable * layers_per_block,
        "prompt_tokens": prompt_len,
        "vision_rows_per_stage": plan.counts.sum(axis=0).tolist() if kv_mode else None,
        "schedule": schedule.description if kv_mode else None,
        "pages_per_request": at_peak["pages"] / at_peak["running"],
        "pages_per_request_plan": predicted,
        "max_running": int(peak),
        "max_running_plan": (usable * layers_per_block) // predicted,
        "preemptions": int(steps[-1]["preemptions"]),
        "steps": len(steps),
        "wall_s": wall,
        "finished": len(tokens),
        "distinct_outputs": len({tuple(t) for t in tokens.values()}),
        "tokens_r0": tokens.get("r0"),
        "timeline": steps,
    }


def add_ratios(modes: dict) -> None:
    stock = modes["stock"]
    for res in modes.values():
        res["vs_stock"] = {k: res[k] / stock[k] for k in ("pages_per_request", "pages_per_request_plan",
                                                          "max_running", "max_running_plan", "steps")}


def markdown_table(report: dict) -> str:
    rows = [("| mode | KV pages / request (plan) | vs stock | max running requests (plan) | vs stock | "
             "preemptions | engine steps to finish (vs stock) |"), "|---|---|---|---|---|---|---|"]
    for mode, r in report["modes"].items():
        rows.append(f"| {mode} | {r['pages_per_request']:.1f} ({r['pages_per_request_plan']}) | "
                    f"{r['vs_stock']['pages_per_request']:.3f} | {r['max_running']} ({r['max_running_plan']}) | "
                    f"{r['vs_stock']['max_running']:.2f}x | {r['preemptions']} | {r['steps']} ({r['vs_stock']['steps']:.2f}x) |")
    return "\n".join(rows)


def plot(report: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n if n == "stock" else f"V2Drop\n{n}" for n in report["modes"]]
    modes = list(report["modes"].values())
    fig, axes = plt.subplots(1, 3, figsize=(12, 4))
    for ax, key, title in ((axes[0], "pages_per_request", "KV pages (one layer x one block) per request"),
                           (axes[1], "max_running", "max concurrent running requests"),
                           (axes[2], "steps", "engine steps to finish all requests")):
        bars = ax.bar(names, [m[key] for m in modes], color=["#888888", "#6fa8dc", "#e69138"][:len(modes)])
        if key + "_plan" in modes[0]:
            ax.scatter(names, [m[key + "_plan"] for m in modes], marker="_", s=900, color="black", zorder=3,
                       label="plan's prediction")
            ax.legend(fontsize=7, loc="upper right", markerscale=0.3)
        for b, m in zip(bars, modes):
            ax.annotate(f"{m[key]:.4g}\n({m[key] / modes[0][key]:.2f}x stock)",
                        (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom", fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.set_ylim(0, max(max(m[key], m.get(key + "_plan", 0)) for m in modes) * 1.4)
    s = modes[0]
    rows = next((" -> ".join(map(str, m["vision_rows_per_stage"])) for m in modes if m["vision_rows_per_stage"]), "")
    fig.suptitle(f"{report['label']}: {report['requests']} x {report['media']} ({s['prompt_tokens']} prompt tokens; "
                 f"vision rows per stage {rows}), {report['max_tokens']} tokens out; pool {s['usable_pages']} pages "
                 f"= {report['pool_blocks'] - 1} stock blocks of {report['block_size']}; vLLM "
                 f"{report['machine']['vllm']}", fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--markdown"]:
        print(markdown_table(json.loads(Path(argv[1]).read_text())))
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="model directory")
    src.add_argument("--arch", choices=("llava", "llava-onevision", "qwen2-vl", "qwen2.5-vl"),
                     help="build a random-weight model of this architecture (with --size)")
    p.add_argument("--size", choices=("tiny", "mid"), default="tiny")
    p.add_argument("--models-dir", default=str(REPO / "build" / "bench-models"))
    p.add_argument("--media", default="image:448x448", help="per request: image:WxH or video:FRAMESxWxH")
    p.add_argument("--text", default="Describe this picture in detail.", help="prompt text after the media")
    p.add_argument("--requests", type=int, default=32, help="identical requests, all added at once")
    p.add_argument("--max-tokens", type=int, default=32, help="generated tokens per request (ignore_eos)")
    p.add_argument("--pool-blocks", type=int, default=65, help="KV pool size in stock blocks (one is vLLM's null block)")
    p.add_argument("--block-size", type=int, default=32, help="a multiple of 32 on CPU")
    p.add_argument("--max-model-len", type=int, default=1024, help="the pool must hold one request of this length")
    p.add_argument("--max-num-batched-tokens", type=int, default=16384,
                   help="large enough to prefill every admitted request in one step")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--v2drop-config", default="{}", help="V2Drop settings (JSON); kv_mode is set per mode")
    p.add_argument("--engine-args", default="{}", help="more vllm.LLM arguments (JSON), given to all three")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of " + ",".join(MODES))
    p.add_argument("--out", default=None, help="JSON result file (a .png is written beside it)")
    p.add_argument("--label", default=None)
    args = p.parse_args(argv)

    model_dir = Path(build_model(args.arch, args.size, Path(args.models_dir)) if args.arch else args.model)
    cfg = json.loads((model_dir / "config.json").read_text())
    arch = args.arch or ARCH_NAMES.get(cfg["architectures"][0], cfg["architectures"][0])
    args.num_layers = cfg.get("text_config", cfg)["num_hidden_layers"]
    v2cfg = json.loads(args.v2drop_config)
    label = args.label or f"kv-capacity-{model_dir.name}"
    out = Path(args.out or REPO / "benchmarks" / "results" / f"{label}.json")
    request = make_request(arch, model_dir, args.media, args.text)
    modes = [m.strip() for m in args.modes.split(",")]
    if "stock" not in modes or any(m not in MODES for m in modes):
        raise SystemExit(f"--modes: a subset of {','.join(MODES)} that includes stock")
    print(f"model {model_dir} ({arch}, {args.num_layers} layers); {args.requests} x {args.media}, "
          f"{args.max_tokens} tokens out; pool {args.pool_blocks} stock blocks of {args.block_size}", flush=True)

    import vllm

    results = {m: run_mode(m, args, model_dir, request, v2cfg) for m in modes}
    add_ratios(results)
    report = {
        "label": label,
        "command": "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, REPO), *argv]),
        "model": str(model_dir), "arch": arch, "media": args.media, "text": args.text, "requests": args.requests,
        "max_tokens": args.max_tokens, "pool_blocks": args.pool_blocks, "block_size": args.block_size,
        "v2drop_config": v2cfg,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "vllm": vllm.__version__},
        "modes": results,
    }
    if "shared" in results and "per_stage" in results:
        report["per_stage_tokens_equal_shared"] = results["per_stage"]["tokens_r0"] == results["shared"]["tokens_r0"]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    plot(report, out.with_suffix(".png"))
    print("\n" + markdown_table(report))
    print(f"\nwrote {out} and {out.with_suffix('.png')}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
