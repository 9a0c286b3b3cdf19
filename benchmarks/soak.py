"""Soak: under real load a V2Drop server must never die, answer a client mistake with a 5xx, or change an answer.

    python benchmarks/soak.py --arch llava-onevision --kv-mode shared -n 1000 -c 24 --out soak.json

Builds the tiny random model of ``--arch`` (into ``build/test-models``, like the tests), starts
``vllm serve MODEL --model-impl v2drop`` with a small KV pool (``--kv-blocks``, so that requests get
preempted) and sends ``-n`` requests, ``-c`` at a time, drawn (``--seed``) from these categories:

  plain            greedy (temperature 0, seed) chat with one or two images of different sizes
  text             greedy text-only chat (a short and a long prompt)
  video            greedy chat with a 4- or an 8-frame mp4 video
  stream           a greedy request, streamed
  logprobs         a greedy request with logprobs and top_logprobs
  prompt_logprobs  vLLM's ``prompt_logprobs: 1`` (V2Drop does not prune these requests)
  stop             a greedy request with a stop string taken from its own answer
  n2               ``n=2`` sampling (temperature 1)
  burst            three ``n=4`` requests with two 448x336 images each, sent at once
  chat             greedy multi-turn chats that re-send their image and the history (system prompt, an
                   image, a question, the assistant's answer, a second question): with ``--block-size 32``
                   and ``kv_mode: per_stage`` they reuse the pruned KV of the turn before (prefix caching
                   Level 2) while the pool evicts and preempts
  abort            a client that cancels a stream after two chunks, or gives up after 0.3 s
  malformed        a client mistake (bad base64, not an image, too many images, negative max_tokens, ...)

Checks: ``/health`` answers 200 at the end and the engine never died; every malformed request got a
4xx and no request a 5xx; no valid request failed; every greedy answer equals the same request sent
alone, sequentially, before the load (and those references are unchanged after it); ``n2`` / ``burst``
answers have ``n`` full choices; no request hung (``--timeout``); vLLM's ``/metrics`` go back to idle
(running and waiting requests 0, ``vllm:kv_cache_usage_perc`` 0); no traceback through ``vllm_v2drop``
in the server log. Preemptions (``vllm:num_preemptions``) are counted. Prints the result, writes it as
JSON (``--out``), exits 1 when a check fails.

Not sent, because stock vLLM 0.32 fails on them without V2Drop: an image URL to a closed port and a
``file://`` URL without ``--allowed-local-media-path`` (HTTP 500 from vLLM's frontend); and, on the
CPU backend, seeded sampling (``temperature > 0`` with ``seed``) in a batch where its prefill is chunked
kills the engine ("CPU Generator does not use offset"), so ``n2`` / ``burst`` carry no seed and are
not compared unless ``--seeded-sampling`` (for GPUs).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import random
import re
import sys
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from vllm_v2drop.dev.demo import image_data_url, image_part, read_log, video_data_url, video_part  # noqa: E402

ARCHS = ("llava-onevision", "qwen2-vl")
KV_MODES = ("shared", "per_stage")
LIMITS = {"image": 2, "video": 1}
BLOCK_BYTES = 128 * 8 * 2 * 2 * 32 * 4  # tiny models: 128-token block x 8 layers x (K, V) x 2 heads x 32 dims, fp32
MAX_TOKENS = 128
WEIGHTS = {"plain": 18, "text": 7, "video": 8, "stream": 9, "logprobs": 6, "prompt_logprobs": 5, "stop": 5,
           "n2": 6, "burst": 4, "abort": 8, "chat": 12, "malformed": 20}  # about one request in six is malformed
IMAGES = ("img0", "img1", "img2", "img3", "img4", "two")
CHATS = ("chat0", "chat1", "chat2")
VARIANTS = {"plain": {}, "stop": {}, "plogp": {"extra_body": {"prompt_logprobs": 1, "ignore_eos": True}},
            "n2": {"n": 2, "temperature": 1.0}, "n4": {"n": 4, "temperature": 1.0}}


def contents() -> dict[str, list[dict]]:
    """Request contents: images of five sizes, two images, two texts, 4- and 8-frame videos."""
    def txt(t):
        return {"type": "text", "text": t}

    img = {f"img{i}": [image_part(image_data_url(s, seed=i)), txt(f"Describe image {i}.")]
           for i, s in enumerate([(112, 112), (160, 120), (224, 168), (448, 336), (96, 160)])}
    return {**img,
            "two": [image_part(image_data_url((112, 112), seed=7)), image_part(image_data_url((224, 168), seed=8)),
                    txt("Compare the two images.")],
            "big2": [image_part(image_data_url((448, 336), seed=9)), image_part(image_data_url((448, 336), seed=10)),
                     txt("What changed between these two pictures?")],
            "text0": [txt("Tell me about the sky.")],
            "text1": [txt("Write a long story about a lighthouse keeper. " * 12)],
            "vid4": [video_part(video_data_url(4, (64, 64), seed=11)), txt("What happens in this video?")],
            "vid8": [video_part(video_data_url(8, (96, 64), seed=12)), txt("Describe the motion.")],
            **chats()}


def chats() -> dict[str, dict]:
    """Chats that re-send their image and history: a second turn, its first turn, and a long question."""
    system = {"role": "system", "content": "You are a careful assistant describing photos for an archive."}
    small = image_part(image_data_url((112, 112), seed=21, fmt="JPEG"))
    big = image_part(image_data_url((448, 336), seed=22, fmt="JPEG"))
    first = {"role": "user", "content": [small, {"type": "text", "text": "What is in this photo?"}]}
    return {"chat0": {"messages": [system, first, {"role": "assistant", "content": "A gradient with a few blocks."},
                                   {"role": "user", "content": "Which colour dominates, and where?"}]},
            "chat1": {"messages": [system, first]},
            "chat2": {"messages": [system, {"role": "user", "content": [big, {
                "type": "text", "text": "Describe this image in detail: colours, shapes and where each one sits."}]}]}}


def malformed_bodies(model: str, c: dict) -> dict[str, dict | bytes]:
    """Client mistakes (raw request bodies); a healthy server answers each with a 4xx."""
    png = image_data_url((64, 64), seed=1).split(",", 1)[1]
    q = c["text0"][0]

    def chat(content, **kw):
        return {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 8, **kw}

    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode()

    return {
        "bad_base64": chat([image_part("data:image/png;base64,@@not-base64@@"), q]),
        "not_an_image": chat([image_part("data:image/png;base64," + b64(b"not an image" * 9)), q]),
        "truncated_png": chat([image_part("data:image/png;base64," + png[:120]), q]),
        "bad_video": chat([video_part("data:video/mp4;base64," + b64(b"\0" * 64)), q]),
        "too_many_images": chat(c["two"][:2] + c["img0"]),
        "too_many_videos": chat(c["vid4"][:1] + c["vid8"]),
        "negative_max_tokens": chat(c["img0"], max_tokens=-5),
        "temperature_string": chat(c["img0"], temperature="hot"),
        "messages_not_a_list": {"model": model, "messages": "hello", "max_tokens": 8},
        "image_url_not_an_object": chat([{"type": "image_url", "image_url": 5}, q]),
        "unknown_part_type": chat([{"type": "hologram", "hologram": "x"}, q]),
        "n_zero": chat(c["img0"], n=0),
        "greedy_n4": chat(c["img0"], n=4, temperature=0.0),
        "top_p_too_big": chat(c["img0"], top_p=2.0),
        "unknown_model": {**chat(c["img0"]), "model": "no-such-model"},
        "over_long_prompt": chat([{"type": "text", "text": "look " * 5000}]),
        "invalid_json": b'{"model": "' + model.encode() + b'", "messages": [',
    }


def record(cat: str, status, key=None, got=None, detail: str = "") -> dict:
    """One request's outcome: status is the HTTP code, 'aborted', 'hang' or 'error' (no answer)."""
    return {"category": cat, "status": status, "key": key, "got": got, "detail": detail}


class Soak:
    def __init__(self, url: str, model: str, args):
        import httpx
        import openai

        self.url, self.model, self.args = url, model, args
        # No keep-alive: a pooled connection the server closes as it is reused would look like a server fault.
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
        self.client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="EMPTY", max_retries=0, timeout=args.timeout,
                                         http_client=openai.DefaultAsyncHttpxClient(limits=limits))
        self.http = httpx.AsyncClient(timeout=args.timeout, limits=limits)
        self.c = contents()
        self.bad = malformed_bodies(model, self.c)
        self.refs: dict[tuple, list] = {}
        self.stops: dict[str, str] = {}

    # ------------------------------------------------------------------------------------ requests

    def kwargs(self, name: str, variant: str = "plain") -> dict:
        content = self.c[name]
        messages = content["messages"] if isinstance(content, dict) else [{"role": "user", "content": content}]
        kw = {"model": self.model, "messages": messages, "max_tokens": MAX_TOKENS,
              "temperature": 0.0, "seed": self.args.seed, "extra_body": {"ignore_eos": True}, **VARIANTS[variant]}
        if variant == "stop":
            kw["stop"] = [self.stops[name]]
        if variant in ("n2", "n4") and not self.args.seeded_sampling:
            del kw["seed"]
        return kw

    def compares(self, variant: str) -> bool:
        return variant not in ("n2", "n4") or self.args.seeded_sampling

    async def send(self, name: str, variant: str = "plain", **extra) -> tuple[list, object]:
        """One chat request: ([(text, finish_reason) per choice], response)."""
        r = await self.client.chat.completions.create(**self.kwargs(name, variant), **extra)
        return [(ch.message.content, ch.finish_reason) for ch in sorted(r.choices, key=lambda ch: ch.index)], r

    async def reference(self, phase: str) -> list[str]:
        """Each compared request alone, in turn: 'before' records the answers, 'after' checks them again."""
        keys = [(n, "plain") for n in self.c if n != "big2"] + [(n, "plogp") for n in ("img2", "vid4")] + \
               [(n, "stop") for n in ("img3", "text0", "two")] + [(n, "n2") for n in ("img1", "text0")] + \
               [("big2", "n4")]
        bad = []
        for key in filter(lambda k: self.compares(k[1]), keys):
            if key[1] == "stop" and key[0] not in self.stops:  # two characters its plain answer contains
                text = self.refs[(key[0], "plain")][0][0]
                self.stops[key[0]] = next((text[i:i + 2] for i in range(4, len(text) - 2) if text[i:i + 2].strip()),
                                          text[-2:])
            try:
                got, _ = await self.send(*key)
            except Exception as e:  # noqa: BLE001
                if phase == "before":
                    raise
                got = f"{type(e).__name__}: {e}"[:200]
            if phase == "before":
                self.refs[key] = got
            elif got != self.refs[key]:
                bad.append(f"alone after the load {key}: {got} != {self.refs[key]}")
        return bad

    async def answer(self, cat: str, name: str, variant: str = "plain", **extra) -> dict:
        got, r = await self.send(name, variant, **extra)
        n = VARIANTS[variant].get("n", 1)
        detail = ""
        if len(got) != n or (r.usage.completion_tokens != n * MAX_TOKENS and variant != "stop"):
            detail = f"{len(got)} choices, {r.usage.completion_tokens} tokens"
        if cat == "logprobs" and any(len(ch.logprobs.content) != MAX_TOKENS for ch in r.choices):
            detail = "wrong number of logprobs"
        if cat == "prompt_logprobs" and len(r.model_extra.get("prompt_logprobs") or []) != r.usage.prompt_tokens:
            detail = "wrong number of prompt logprobs"
        return record(cat, 200, (name, variant) if self.compares(variant) else None, got, detail)

    async def stream(self, name: str) -> dict:
        stream = await self.client.chat.completions.create(**self.kwargs(name), stream=True)
        text, finish = [], None
        async for chunk in stream:
            if chunk.choices:
                text.append(chunk.choices[0].delta.content or "")
                finish = chunk.choices[0].finish_reason or finish
        return record("stream", 200, (name, "plain"), [("".join(text), finish)])

    async def abort(self, name: str, by_timeout: bool) -> dict:
        import openai

        kw = {**self.kwargs(name), "max_tokens": 400}
        if by_timeout:  # the client gives up; the server must abort the request
            try:
                await self.client.with_options(timeout=0.3).chat.completions.create(**kw)
                return record("abort", 200, detail="finished before the client timeout")
            except openai.APITimeoutError:
                return record("abort", "aborted", detail="client timeout")
        stream = await self.client.chat.completions.create(**kw, stream=True)
        chunks = 0
        async for _ in stream:
            chunks += 1
            if chunks == 2:
                break
        await stream.close()  # the connection goes away mid-stream
        return record("abort", "aborted", detail="cancelled mid-stream")

    async def malformed(self, which: str) -> dict:
        body = self.bad[which]
        kw = {"json": body} if isinstance(body, dict) else {"content": body,
                                                              "headers": {"content-type": "application/json"}}
        try:
            r = await self.http.post(f"{self.url}/v1/chat/completions", **kw)
        except Exception as e:  # noqa: BLE001  (no answer)
            return record("malformed", "error", detail=f"{which}: {type(e).__name__} {e}")
        return record("malformed", r.status_code, detail=f"{which}: {r.text[:200]}")

    def request(self, cat: str, rng: random.Random):
        """The coroutine of one request of ``cat`` (``rng`` picks its content)."""
        if cat in ("plain", "logprobs"):
            extra = {"logprobs": True, "top_logprobs": 2} if cat == "logprobs" else {}
            return self.answer(cat, rng.choice(IMAGES), **extra)
        return {"text": lambda: self.answer(cat, rng.choice(("text0", "text1"))),
                "video": lambda: self.answer(cat, rng.choice(("vid4", "vid8"))),
                "stream": lambda: self.stream(rng.choice(IMAGES + CHATS + ("vid8", "text1"))),
                "chat": lambda: self.answer(cat, rng.choice(CHATS)),
                "prompt_logprobs": lambda: self.answer(cat, rng.choice(("img2", "vid4")), "plogp"),
                "stop": lambda: self.answer(cat, rng.choice(("img3", "text0", "two")), "stop"),
                "n2": lambda: self.answer(cat, rng.choice(("img1", "text0", "chat0")), "n2"),
                "burst": lambda: self.answer(cat, "big2", "n4"),
                "abort": lambda: self.abort(rng.choice(IMAGES + CHATS + ("vid8",)), by_timeout=rng.random() < 0.5),
                "malformed": lambda: self.malformed(rng.choice(sorted(self.bad)))}[cat]()

    async def safe(self, cat: str, rng: random.Random) -> dict:
        import openai

        try:
            return await self.request(cat, rng)
        except openai.APIStatusError as e:
            return record(cat, e.status_code, detail=str(e)[:300])
        except Exception as e:  # noqa: BLE001  (no answer: connection refused or reset)
            cause = f" ({type(e.__cause__).__name__}: {e.__cause__})" if e.__cause__ else ""
            return record(cat, "error", detail=f"{type(e).__name__}: {e}{cause}"[:300])

    async def job(self, cat: str, rng: random.Random, sem: asyncio.Semaphore) -> list[dict]:
        """One job under the concurrency limit; a burst is three requests sent at once."""
        k = 3 if cat == "burst" else 1
        async with sem:
            try:
                return await asyncio.wait_for(asyncio.gather(*(self.safe(cat, rng) for _ in range(k))),
                                              self.args.timeout)
            except asyncio.TimeoutError:
                return [record(cat, "hang")] * k

    # ------------------------------------------------------------------------------------- metrics

    async def metrics(self) -> dict[str, float]:
        """``/metrics`` as {name: value}, summed over label sets ({} when the server does not answer)."""
        import httpx

        out: dict[str, float] = {}
        try:
            text = (await self.http.get(f"{self.url}/metrics", timeout=10)).text
        except httpx.HTTPError:
            return out
        for m in re.finditer(r"^(vllm:\w+)(?:\{[^}]*\})? ([-+\d.eE]+|nan)$", text, re.M):
            out[m[1]] = out.get(m[1], 0.0) + float(m[2])
        return out

    async def gauges(self) -> dict[str, float]:
        m = await self.metrics()
        keys = ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "num_preemptions_total")
        if self.args.probe_rate is not None:  # the probe's shadows run after their requests
            keys += ("v2drop_probe_watched", "v2drop_probe_in_flight")
        return {k: m.get(f"vllm:{k}", -1.0) for k in keys}

    async def sample(self, peak: dict, stop: asyncio.Event):
        while not stop.is_set():
            for k, v in (await self.gauges()).items():
                peak[k] = max(peak.get(k, 0.0), v)
            await asyncio.sleep(0.5)

    async def idle(self, wait: float = 60.0) -> dict:
        """The gauges once nothing runs, waits or holds KV blocks (or after ``wait`` s; -1: no answer)."""
        deadline = time.monotonic() + wait
        while True:
            g = await self.gauges()
            g.pop("num_preemptions_total")
            if not any(g.values()) or -1.0 in g.values() or time.monotonic() > deadline:
                return g
            await asyncio.sleep(0.5)

    # ------------------------------------------------------------------------------------- the run

    async def run(self, n: int) -> dict:
        rng = random.Random(self.args.seed)
        jobs, count = [], 0
        while count < n:  # categories drawn up front; a burst counts three requests
            cat = rng.choices(list(WEIGHTS), list(WEIGHTS.values()))[0]
            jobs.append((cat, random.Random(rng.random())))
            count += 3 if cat == "burst" else 1
        m0 = await self.metrics()
        t = time.monotonic()
        await self.reference("before")
        ref_s = time.monotonic() - t
        peak, stop = {}, asyncio.Event()
        sampler = asyncio.create_task(self.sample(peak, stop))
        sem = asyncio.Semaphore(self.args.concurrency)
        t = time.monotonic()
        records = [r for rs in await asyncio.gather(*(self.job(c, r, sem) for c, r in jobs)) for r in rs]
        load_s = time.monotonic() - t
        stop.set()
        await sampler
        final = await self.idle()
        after = await self.reference("after")
        m1 = await self.metrics()
        key = "vllm:num_preemptions_total"
        preempt = max(m1.get(key, 0.0), peak.pop("num_preemptions_total", 0.0)) - m0.get(key, 0.0)
        cache = {k: int(m1.get(f"vllm:prefix_cache_{k}_total", 0.0) - m0.get(f"vllm:prefix_cache_{k}_total", 0.0))
                 for k in ("queries", "hits")}
        probe = await self.probe_counts() if self.args.probe_rate is not None else None
        return {"records": records, "refs": self.refs, "after": after, "peak": peak, "final": final,
                "preemptions": int(preempt), "prefix_cache": cache, "probe": probe, "reference_s": round(ref_s, 1),
                "load_s": round(load_s, 1)}

    async def probe_counts(self) -> dict:
        """The quality probe's totals: requests probed, skipped by reason, mean agreement."""
        text = (await self.http.get(f"{self.url}/metrics", timeout=10)).text

        def total(name: str) -> float:
            return sum(float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))

        skipped = {m[1]: int(float(m[2])) for m in re.finditer(
            r'^vllm:v2drop_probe_skipped_total\{[^}]*reason="(\w+)"[^}]*\} (\S+)$', text, re.M)}
        n = total("vllm:v2drop_probe_agreement_count")
        return {"requests": int(total("vllm:v2drop_probe_requests_total")), "skipped": skipped,
                "mean_agreement": total("vllm:v2drop_probe_agreement_sum") / n if n else None}


def scan_log(text: str) -> dict:
    """Tracebacks in the server log (all, and those through ``vllm_v2drop``); a dead engine."""
    lines = [re.sub(r"^\(\w+ pid=\d+\) (?:\w+ [\d-]+ [\d:]+ \[[^\]]+\] )?", "", line) for line in text.splitlines()]
    blocks, cur = [], None
    for line in lines:
        if line.startswith("Traceback (most recent call last)"):
            blocks.append(cur := [line])
        elif cur is not None:
            cur.append(line)
            if line and not line[0].isspace():  # the exception line ends the block
                cur = None
    v2 = ["\n".join(b[-6:]) for b in blocks if any("vllm_v2drop" in line for line in b)]
    return {"tracebacks": len(blocks), "v2drop_tracebacks": len(v2), "v2drop_traceback_tails": v2[:3],
            "engine_dead": bool(re.search(r"EngineDeadError|EngineCore encountered a fatal error", text))}


def summarize(out: dict, log_text: str, alive: bool) -> dict:
    recs, refs = out.pop("records"), out.pop("refs")
    by_cat: dict[str, Counter] = {}
    for r in recs:
        by_cat.setdefault(r["category"], Counter())[f"{r['status'] // 100}xx" if isinstance(r["status"], int)
                                                    else r["status"]] += 1
    totals = sum(by_cat.values(), Counter())
    answered = [r for r in recs if r["status"] == 200 and r["got"] is not None]
    wrong = [r for r in answered if r["key"] and r["got"] != refs[r["key"]] or r["detail"]]
    malformed = [r for r in recs if r["category"] == "malformed"]
    not_4xx = [f"{r['status']} {r['detail']}" for r in malformed
               if not (isinstance(r["status"], int) and 400 <= r["status"] < 500)]
    failed = [f"{r['category']}: {r['status']} {r['detail']}" for r in recs
              if r["category"] != "malformed" and r["status"] not in (200, "aborted")]
    log = scan_log(log_text)
    res = {
        "requests": len(recs), "requests_by_category": {k: sum(v.values()) for k, v in sorted(by_cat.items())},
        "status": dict(sorted(totals.items())), "status_by_category": {k: dict(v) for k, v in sorted(by_cat.items())},
        "malformed_4xx": len(malformed) - len(not_4xx), "malformed_not_4xx": not_4xx[:10],
        "malformed_kinds": dict(sorted(Counter(r["detail"].split(":")[0] for r in malformed).items())),
        "compared": sum(1 for r in answered if r["key"]), "mismatches": len(wrong) + len(out["after"]),
        "mismatch_examples": [f"{r['category']} {r['key']}: {r['got']} != {refs.get(r['key'])} {r['detail']}"
                              for r in wrong[:5]] + out["after"][:5],
        "valid_failed": len(failed), "valid_failed_examples": failed[:10], "hangs": totals.get("hang", 0),
        "preemptions": out["preemptions"], "prefix_cache": out["prefix_cache"], "peak": out["peak"], "final": out["final"], "alive": alive, **log,
        "probe": out["probe"],
        "reference_s": out["reference_s"], "load_s": out["load_s"],
    }
    res["checks"] = {
        "alive": alive and not log["engine_dead"],
        "no_5xx": totals.get("5xx", 0) == 0,
        "malformed_all_4xx": not not_4xx,
        "valid_requests_ok": not failed,
        "no_mismatch": res["mismatches"] == 0,
        "no_hang": res["hangs"] == 0,
        "idle_after": not any(out["final"].values()),
        "no_v2drop_traceback": log["v2drop_tracebacks"] == 0,
    }
    if out["probe"] is not None:  # the probe ran, and no shadow failed
        probe = out["probe"]
        res["checks"]["probe_ran_without_error"] = probe["requests"] > 0 and not probe["skipped"].get("error")
    res["ok"] = all(res["checks"].values())
    return res


def v2drop_config(args) -> dict:
    cfg = {"kv_mode": args.kv_mode}
    if args.chunked_items:
        cfg["chunked_items"] = True
    if args.probe_rate is not None:
        cfg["quality_probe"] = {"rate": args.probe_rate}
    return cfg


def server_args(args) -> list[str]:
    out = ["--model-impl", "v2drop", "--enforce-eager", "--dtype", "float32", "--max-model-len", str(args.max_model_len),
           "--seed", "0", "--kv-cache-memory-bytes", str(args.kv_blocks * BLOCK_BYTES),
           "--limit-mm-per-prompt", json.dumps(LIMITS),
           "--additional-config", json.dumps({"v2drop": v2drop_config(args)})]
    if args.block_size:
        out += ["--block-size", str(args.block_size)]
    if args.max_num_batched_tokens:
        out += ["--max-num-batched-tokens", str(args.max_num_batched_tokens)]
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", choices=ARCHS, default="llava-onevision")
    p.add_argument("--kv-mode", choices=KV_MODES, default="shared")
    p.add_argument("-n", "--num-requests", type=int, default=1000)
    p.add_argument("-c", "--concurrency", type=int, default=24)
    p.add_argument("--seed", type=int, default=0, help="draws the requests; also the seed of every request")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds after which a request counts as hung")
    p.add_argument("--kv-blocks", type=int, default=36, help="KV pool in 128-token units (33 hold 4096 tokens)")
    p.add_argument("--block-size", type=int, default=None,
                   help="KV block size (the CPU backend's default is 128; 32 makes prefix caching hit more)")
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--chunked-items", action="store_true",
                   help="V2Drop chunked_items: with a small --max-num-batched-tokens, vision items are split across steps")
    p.add_argument("--seeded-sampling", action="store_true",
                   help="seed the n2 / burst requests and compare them too (kills vLLM 0.32's CPU engine)")
    p.add_argument("--probe-rate", type=float, default=None,
                   help="turn V2Drop's quality probe on at this rate (default: off)")
    p.add_argument("--log", default=None, help="server log (default build/soak-logs/soak-ARCH-KVMODE.log)")
    p.add_argument("--out", default=None, help="write the result here (JSON)")
    return p.parse_args(argv)


def run_soak(argv: list[str] | None = None) -> dict:
    """Run the whole soak for ``argv`` (the CLI's arguments); return the result (also written to ``--out``)."""
    import httpx

    from vllm_v2drop.dev.server import serve

    args = parse_args(argv)
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import ensure_model  # the tests' tiny models, built once

    model = str(ensure_model(args.arch))
    log = Path(args.log or REPO / "build" / "soak-logs" / f"soak-{args.arch}-{args.kv_mode}.log")
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    # the KV audit checks every prefix-cache reuse of a per_stage block (vllm_v2drop.worker.audit)
    with serve(model, server_args(args), log_path=log, env={"VLLM_CPU_KVCACHE_SPACE": None, "V2DROP_AUDIT_KV": "1"}) as url:
        startup = time.monotonic() - t0
        print(f"soak {args.arch} {args.kv_mode}: server up in {startup:.0f} s; {args.num_requests} requests, "
              f"concurrency {args.concurrency}; log {log}", flush=True)

        async def go():
            soak = Soak(url, model, args)
            try:
                return await soak.run(args.num_requests)
            finally:
                await soak.http.aclose()
                await soak.client.close()

        out = asyncio.run(go())
        try:
            alive = httpx.get(f"{url}/health", timeout=10).status_code == 200
        except httpx.HTTPError:
            alive = False
        log_text = read_log(log)  # before the server stops (its shutdown logs an EngineDeadError)
    res = {"arch": args.arch, "kv_mode": args.kv_mode, "num_requests": args.num_requests, "probe_rate": args.probe_rate,
           "concurrency": args.concurrency, "seed": args.seed, "kv_blocks": args.kv_blocks,
           "block_size": args.block_size, "kv_audit": True,
           "seeded_sampling": args.seeded_sampling, "server_args": server_args(args), "server_log": str(log),
           **summarize(out, log_text, alive),
           "startup_s": round(startup, 1), "wall_s": round(time.monotonic() - t0, 1)}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    return res


def main(argv: list[str] | None = None) -> int:
    res = run_soak(argv)
    print(json.dumps({k: v for k, v in res.items() if k not in ("server_args", "status_by_category")}, indent=1))
    print("soak:", "OK" if res["ok"] else "FAILED: " + ", ".join(k for k, v in res["checks"].items() if not v))
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
