"""Time to first token of a three-turn image chat: V2Drop with prefix caching, without it, and stock.

    python benchmarks/prefix_cache.py --arch qwen2-vl --chats 8 --out benchmarks/results

Every turn re-sends the image and the whole history (as chat clients do) behind a shared
system prompt. Per engine (stock vLLM with prefix caching; V2Drop ``kv_mode: shared`` with it,
Level 1; V2Drop ``kv_mode: per_stage`` with it, Level 2; V2Drop without it; one after the other
in this process, same settings otherwise) it runs ``--chats`` chats with different images, turn
by turn, each turn alone with ``max_tokens=1``: the wall time of that call is the turn's time to
first token. vLLM's encoder cache is emptied before every turn, so an image is encoded again
unless a prefix hit covers it; the V2Drop engines count the encoder's runs (``trace``
directory). Prints and writes the median per turn and engine, the ratios to V2Drop without
prefix caching, vLLM's prefix-cache hit rate and the images encoded per turn.

What prefix caching gives (README, "Prefix caching"): Level 1 hits the system prompt's blocks in
every turn, but a pruned request never hits a block holding its image, so turns 2 and 3 run the
vision encoder and the prefill from the image on. Level 2 reuses every stage's pruned KV: turns 2
and 3 hit through the image and the history (the first question is long enough, two blocks
after the image, for every stage's blocks past the image to be cached by turn 1). Stock vLLM
reuses the image and the history.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

SYSTEM = "You are a careful assistant for a photo archive. Answer precisely and cite what you see. " * 8
TURNS = [("What is in this photo? Describe every object, its colour, its shape and where it sits in the frame, "
          "then say what the photo was most likely taken for.", "A gradient with a few coloured blocks."),
         ("Which colour dominates?", "Mostly blue, with some red."),
         ("Describe the top left corner.", None)]
ENGINES = {
    "stock+cache": dict(enable_prefix_caching=True),
    "v2drop+cache": dict(enable_prefix_caching=True, model_impl="v2drop"),
    "v2drop-per_stage+cache": dict(enable_prefix_caching=True, model_impl="v2drop", kv_mode="per_stage"),
    "v2drop-nocache": dict(enable_prefix_caching=False, model_impl="v2drop"),
}


def turn_request(model_dir: str, turn: int, seed: int, size: str) -> dict:
    from conftest import _tokenizer, make_image

    messages = [{"role": "system", "content": SYSTEM}]
    for i, (user, answer) in enumerate(TURNS[: turn + 1]):
        content = ([{"type": "image"}] if i == 0 else []) + [{"type": "text", "text": user}]
        messages.append({"role": "user", "content": content})
        if i < turn:
            messages.append({"role": "assistant", "content": answer})
    text = _tokenizer(model_dir).apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return {"prompt": text, "multi_modal_data": {"image": make_image(size, seed)}}


def run_engine(name: str, model_dir: str, chats: int, size: str) -> dict:
    import tempfile

    from conftest import llm_engine
    from vllm import SamplingParams

    from vllm_v2drop.worker.runtime import encoder_runs

    kw = dict(ENGINES[name])
    trace = tempfile.mkdtemp(prefix="v2drop-bench-")
    if kw.get("model_impl") == "v2drop":
        kw["additional_config"] = {"v2drop": {"kv_mode": kw.pop("kv_mode", "shared"), "trace": trace}}

    def encoded() -> int:
        return encoder_runs(trace)

    params = SamplingParams(temperature=0.0, max_tokens=1)
    ttft: list[list[float]] = [[] for _ in TURNS]
    runs: list[int] = [0 for _ in TURNS]
    with llm_engine(model_dir, block_size=32, max_model_len=4096, disable_log_stats=False, **kw) as llm:
        llm.generate([turn_request(model_dir, 0, 10_000, size)], params, use_tqdm=False)  # warm-up
        llm.reset_prefix_cache()
        for chat in range(chats):
            for turn in range(len(TURNS)):
                req = turn_request(model_dir, turn, chat, size)
                llm.llm_engine.reset_encoder_cache()
                before = encoded()
                t = time.perf_counter()
                llm.generate([req], params, use_tqdm=False)
                ttft[turn].append(time.perf_counter() - t)
                runs[turn] += encoded() - before
        metrics = {m.name: m.value for m in llm.get_metrics()
                   if m.name in ("vllm:prefix_cache_queries", "vllm:prefix_cache_hits")}
    queries = metrics.get("vllm:prefix_cache_queries", 0)
    row = {
        "engine": name,
        "ttft_ms_median": [round(1e3 * statistics.median(t), 2) for t in ttft],
        "prefix_cache_hit_rate": round(metrics.get("vllm:prefix_cache_hits", 0) / queries, 3) if queries else 0.0,
    }
    if kw.get("model_impl") == "v2drop":
        row["images_encoded_per_turn"] = runs
    return row


def main() -> None:
    from conftest import ensure_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="qwen2-vl")
    ap.add_argument("--model", help="model directory (default: the tiny model of --arch, built if missing)")
    ap.add_argument("--chats", type=int, default=8)
    ap.add_argument("--image-size", default="large", help="conftest.IMAGE_SIZES key")
    ap.add_argument("--engines", default=",".join(ENGINES))
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = ap.parse_args()
    model = args.model or str(ensure_model(args.arch))
    rows = [run_engine(name, model, args.chats, args.image_size) for name in args.engines.split(",")]
    base = {r["engine"]: r for r in rows}.get("v2drop-nocache")
    for r in rows:
        if base:
            r["ttft_vs_v2drop_nocache"] = [round(a / b, 3) for a, b in zip(r["ttft_ms_median"], base["ttft_ms_median"])]
        print(json.dumps(r), flush=True)
    result = {"arch": args.arch, "model": model, "chats": args.chats, "image_size": args.image_size,
              "turns": [t[0] for t in TURNS], "cpus": os.cpu_count(), "rows": rows}
    out = Path(args.out) / f"cpu-prefix-cache-{args.arch}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
