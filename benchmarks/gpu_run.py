"""The first GPU smoke test of V2Drop inside vLLM, in one command (a CUDA machine with vLLM 0.32.0
and this package installed; no network needed):

    python benchmarks/gpu_run.py                 # on the GPU machine: results in benchmarks/results
    python benchmarks/gpu_run.py --dry-run       # anywhere: the same steps at tiny shapes (CPU)

It builds a random-weight LLaVA-OneVision locally (``vllm_v2drop.dev.make_model``: the published 7B
shapes, bfloat16) and runs vLLM's production path: vLLM's default compilation (torch.compile,
CUDA graphs FULL_AND_PIECEWISE: full graphs for steps V2Drop plans nothing in, piecewise ones for
the others, the drop loop's segments compiled), no ``--enforce-eager``, FlashAttention,
``VLLM_GPU_SYNC_CHECK=warn``. Engines, one process each, one after the other, each with its log:

* ``stock``: vLLM without V2Drop, with its defaults (on a GPU: Model Runner V2, full CUDA graphs
  for decode);
* ``shared`` and ``per_stage``: V2Drop in each KV mode, compiled;
* ``shared-eager`` and ``per_stage-eager``: the same, ``enforce_eager`` (vLLM's in-place CUDA
  norm kernels run inside the drop loop).

Every V2Drop engine runs one schedule whose first drop is at layer 1 (the layer-1 schedule: its
score reads the input of layer 0, which an in-place norm would overwrite in eager mode).

Each engine generates every request alone, then runs the concurrency scenarios: a few requests
already decoding, then 1, 3, 17 and one more than the largest CUDA-graph capture size image
requests added at once (a step that drops rows beside other requests' decodes); the KV rows each
new request holds per layer are read back from the cache right after its prefill. Then timings:
the drop step (image requests prefilled alone: wall time, peak GPU memory) and decode
inter-token latency. The checks (``docs/testing.md`` lists them) compare engines and logs; greedy
tokens are compared with a tolerance for bfloat16 (see ``agreement``). Results:
``benchmarks/results/gpu-smoke-<gpu>.json``; exit status 1 when a check fails.

``--dry-run``: tiny model, float32 (CPU kernels), three engines (``stock-eager``, ``shared-eager``,
``per_stage`` compiled: compiled against eager is then checked across the KV modes), scenario
sizes 1, 3 and 5 (capture size 4), exact token equality. The test suite runs it
(``tests/test_gpu_run.py``) so that this script cannot rot.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ARCH = "llava-onevision"
HF_ARCH = "LlavaOnevisionForConditionalGeneration"

# What each run uses. ``tie_tol``: see ``agreement``. ``capture``: vLLM's largest CUDA-graph capture
# size (``max_cudagraph_capture_size``), set low so that one more concurrent request than it is a
# cheap scenario; 17 and ``capture + 1`` are the large scenario sizes.
SHAPES = {
    "gpu": dict(size="7b", dtype="bfloat16", image=(384, 384), tokens=16, decoders=(2, 2), capture=64,
                prefill_batch=8, prefill_reps=3, itl_batch=16, itl_steps=64, tie_tol=0.1,
                schedule={"layers": [1, 16, 22], "keep_ratios": [0.274, 0.274, 0.0]},
                engine=dict(max_model_len=8192, max_num_seqs=128), timeout=3600),
    "dry": dict(size="tiny", dtype="float32", image=(64, 64), tokens=4, decoders=(1, 1), capture=4,
                prefill_batch=2, prefill_reps=1, itl_batch=2, itl_steps=3, tie_tol=0.0,
                schedule={},  # the tiny depth's default: layers 1, 5, 6
                engine=dict(max_model_len=4096, kv_cache_memory_bytes=256 << 20), timeout=900),
}
LOGPROBS = 5  # top logprobs kept per generated token, for the tolerance
V1_RUNNER = "vllm.v1.worker.gpu_model_runner.GPUModelRunner"  # what V2Drop runs on (and the KV probe reads)


def engines(dry: bool) -> list[dict]:
    """The engines of a run: name, ``impl`` (stock / v2drop), ``kv_mode``, ``eager``."""
    if dry:  # one engine per KV mode and stock (CI time): per_stage compiled, the others eager
        return [dict(name="stock-eager", impl="stock", kv_mode=None, eager=True),
                dict(name="shared-eager", impl="v2drop", kv_mode="shared", eager=True),
                dict(name="per_stage", impl="v2drop", kv_mode="per_stage", eager=False)]
    return [dict(name="stock", impl="stock", kv_mode=None, eager=False),
            *(dict(name=f"{kv}{'-eager' if eager else ''}", impl="v2drop", kv_mode=kv, eager=eager)
              for eager in (False, True) for kv in ("shared", "per_stage"))]


def scenario_sizes(capture: int) -> list[int]:
    return sorted({n for n in (1, 3, 17) if n <= capture} | {capture + 1})


# ================================================================================ one engine (child)


def _image(size: tuple[int, int], seed: int):
    import numpy as np
    from PIL import Image

    w, h = size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx * 255 / max(w - 1, 1), yy * 255 / max(h - 1, 1), (xx + yy) * 127 / (w + h)], -1)
    img = img + rng.normal(0, 30, (h, w, 3))
    for _ in range(4):
        x0, y0 = rng.integers(0, w // 2), rng.integers(0, h // 2)
        img[y0:y0 + h // 4, x0:x0 + w // 4] = rng.integers(0, 256, 3)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


class Requests:
    """Every request of a run, by name: ``img<i>`` (image, seed i), ``dec-img<j>`` / ``dec-text<j>``
    (the requests already decoding when a scenario's images arrive)."""

    def __init__(self, model: str, shape: dict):
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(model)
        self.size = shape["image"]

    def _prompt(self, image: bool, text: str) -> str:
        content = ([{"type": "image"}] if image else []) + [{"type": "text", "text": text}]
        return self.tok.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                            add_generation_prompt=True)

    def get(self, name: str) -> dict:
        kind, i = re.fullmatch(r"(img|dec-img|dec-text|t-img)(\d+)", name).groups()
        i = int(i)
        if kind == "dec-text":
            return {"prompt": self._prompt(False, f"Tell me a long story about lighthouse number {i}.")}
        seed = {"img": 0, "dec-img": 1000, "t-img": 2000}[kind] + i
        return {"prompt": self._prompt(True, f"Describe picture {i}."),
                "multi_modal_data": {"image": _image(self.size, seed)}}


def _tokens_and_logprobs(out, n: int) -> dict:
    comp = out.outputs[0]
    lps = [{str(t): lp.logprob for t, lp in d.items()} for d in (comp.logprobs or [])][:n]
    return {"tokens": list(comp.token_ids)[:n], "logprobs": lps, "prompt_token_ids": list(out.prompt_token_ids)}


def engine_facts(worker) -> dict:
    """What the engine runs, read in the worker: runner class, graph mode, attention backends."""
    import torch

    runner, cc = worker.model_runner, worker.vllm_config.compilation_config
    backends, fa = set(), set()
    for layer in cc.static_forward_context.values():
        backend = getattr(layer, "attn_backend", None)
        if backend is not None and getattr(layer, "kv_cache", None) is not None:
            backends.add(backend.get_name())
            fa.add(getattr(getattr(layer, "impl", None), "vllm_flash_attn_version", None))
    return {"runner_mro": [f"{c.__module__}.{c.__qualname__}" for c in type(runner).__mro__],
            "cudagraph_mode": getattr(cc.cudagraph_mode, "name", str(cc.cudagraph_mode)),
            "compilation_mode": getattr(cc.mode, "name", str(cc.mode)),
            "max_capture_size": cc.max_cudagraph_capture_size,
            "attention_backends": sorted(backends), "flash_attn_versions": sorted(v for v in fa if v is not None),
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}


def reset_peak_memory(worker) -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peak_memory(worker) -> dict | None:
    import torch

    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    free, total = torch.cuda.mem_get_info()
    return {"peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
            "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
            "device_used_gib": (total - free) / 2**30, "device_total_gib": total / 2**30}


def _params(max_tokens: int, **extra):
    from vllm import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, logprobs=LOGPROBS,
                          extra_args=extra or None)


class Driver:
    """Requests added to a running ``LLMEngine`` and stepped one engine step at a time."""

    def __init__(self, llm):
        self.engine, self.names, self.latest = llm.llm_engine, [], {}

    def add(self, reqs: dict[str, tuple]) -> None:
        """``reqs``: name -> (request, sampling params); the name is the request id."""
        for name, (req, params) in reqs.items():
            self.engine.add_request(name, req, params)
            self.names.append(name)

    def name_of(self, request_id: str) -> str:  # vLLM may add a suffix to the id
        return next(n for n in self.names if request_id == n or request_id.startswith(n + "-"))

    def run(self, until, on_first=None) -> dict:
        """Step until ``until(self)``; ``on_first(name)`` once a request has its first token (it returns
        False when it must be asked again after the next step: the engine core steps on its own, so a
        request may sit out the step the call lands after). Then abort what still runs; return the last
        output of every request."""
        pending: list[str] = []
        while not until(self) or pending:
            if not self.engine.has_unfinished_requests():
                raise RuntimeError(f"requests finished before the condition held (outputs of {sorted(self.latest)})")
            for out in self.engine.step():
                if not (out.outputs and out.outputs[0].token_ids):
                    continue
                name = self.name_of(out.request_id)
                if name not in self.latest and on_first:
                    pending.append(name)
                self.latest[name] = out
            pending = [name for name in pending if not on_first(name)]
        self.engine.abort_request(self.names)
        while self.engine.has_unfinished_requests():
            self.engine.step()
        return self.latest

    def counts(self) -> list[int]:
        return [len(o.outputs[0].token_ids) for o in self.latest.values()]


def run_engine(spec: dict, model: str, shape: dict, sizes: list[int], out_path: Path) -> None:
    """Start one engine, run the whole workload on it, write the raw results (the parent judges)."""
    from vllm import LLM

    from vllm_v2drop.dev.kv_probe import scheduled_request_kv_rows, zero_kv_cache

    kw = dict(dtype=shape["dtype"], seed=0, limit_mm_per_prompt={"image": 1}, enforce_eager=spec["eager"],
              compilation_config={"max_cudagraph_capture_size": shape["capture"]}, **shape["engine"])
    if spec["impl"] == "v2drop":
        kw.update(model_impl="v2drop",
                  additional_config={"v2drop": {**shape["schedule"], "kv_mode": spec["kv_mode"]}})
    t0 = time.perf_counter()
    llm = LLM(model, **kw)
    res: dict = {"start_s": time.perf_counter() - t0, "settings": {k: v for k, v in kw.items()}}
    res["facts"] = llm.collective_rpc(engine_facts)[0]
    # stock on a GPU runs vLLM's default Model Runner V2, whose KV cache the probe cannot read
    probe = V1_RUNNER in res["facts"]["runner_mro"]
    requests, m = Requests(model, shape), shape["tokens"]
    n_img, n_txt = shape["decoders"]
    decoders = [f"dec-img{j}" for j in range(n_img)] + [f"dec-text{j}" for j in range(n_txt)]
    names = [f"img{i}" for i in range(max(sizes))] + decoders

    # 1. every request alone (and, on V2Drop engines, the first three images and the decoders with v2drop_off)
    res["alone"] = {n: _tokens_and_logprobs(llm.generate([requests.get(n)], _params(m), use_tqdm=False)[0], m)
                    for n in names}
    if spec["impl"] == "v2drop":
        off = [f"img{i}" for i in range(min(3, max(sizes)))] + decoders
        llm.reset_prefix_cache()  # their prompts ran above: each computes its whole prompt again
        res["off"] = {n: _tokens_and_logprobs(llm.generate([requests.get(n)], _params(m, v2drop_off=True),
                                                           use_tqdm=False)[0], m) for n in off}

    # 2. scenarios: decoders running, then n image requests at once; KV rows read after each prefill
    res["scenarios"] = {}
    for n in sizes:
        llm.reset_prefix_cache()  # the alone runs cached these prompts: a hit would skip the drop step
        if probe:  # nothing runs: every block a request gets stays zero until written
            llm.collective_rpc(zero_kv_cache)
        long = m + 2 * n + 16  # no request finishes (frees blocks) before the last one's KV rows are read
        drv, kv = Driver(llm), {}
        drv.add({d: (requests.get(d), _params(long)) for d in decoders})
        images = {f"img{i}": (requests.get(f"img{i}"), _params(long)) for i in range(n)}

        def until(d, n=n, images=images):
            if len(d.latest) == len(decoders) and images:  # every decoder is decoding: the images arrive
                d.add(images)
                images.clear()
            return not images and len(d.latest) == len(decoders) + n and min(d.counts()) >= m

        def on_first(name, drv=drv, kv=kv) -> bool:
            if probe and name.startswith("img"):
                rows = llm.collective_rpc(scheduled_request_kv_rows, args=(name,))[0]
                if rows is None:
                    return False
                kv[name] = rows
            return True

        latest = drv.run(until, on_first)
        res["scenarios"][str(n)] = {"outputs": {k: _tokens_and_logprobs(v, m) for k, v in latest.items()},
                                    "kv_rows": kv}

    # 3. timings: the drop step alone (wall time, peak memory), decode inter-token latency
    times, peaks = [], []
    for rep in range(shape["prefill_reps"]):
        names = [f"t-img{rep * 100 + i}" for i in range(shape["prefill_batch"])]
        llm.reset_prefix_cache()
        llm.collective_rpc(reset_peak_memory)
        drv = Driver(llm)
        t0 = time.perf_counter()
        drv.add({x: (requests.get(x), _params(1)) for x in names})
        drv.run(lambda d, k=len(names): len(d.latest) == k)
        times.append(time.perf_counter() - t0)
        peaks.append(llm.collective_rpc(peak_memory)[0])
    res["prefill"] = {"batch": shape["prefill_batch"], "seconds": times, "peak_memory": peaks}
    llm.reset_prefix_cache()
    steps, k = shape["itl_steps"], shape["itl_batch"]
    drv, marks = Driver(llm), {}
    drv.add({f"t-img{900 + i}": (requests.get(f"t-img{900 + i}"), _params(steps + 1)) for i in range(k)})

    def itl_until(d):
        if "t0" not in marks and len(d.latest) == k:
            marks["t0"] = time.perf_counter()  # every request has its first token: decode only from here
        return len(d.latest) == k and min(d.counts()) >= steps + 1

    drv.run(itl_until)
    res["decode"] = {"batch": k, "steps": steps, "itl_ms": (time.perf_counter() - marks["t0"]) * 1000 / steps}
    out_path.write_text(json.dumps(res))


# ====================================================================================== judging (parent)


def agreement(a: dict, b: dict, tol: float) -> dict:
    """Greedy tokens of two runs of one request. Equal, or they part at a near-tie: at the first
    position where they differ, each run's logprob of the other run's token is within ``tol`` of
    its own choice (both tokens are among the top ``LOGPROBS`` of both runs). bfloat16 rounding
    moves logits by a few hundredths, so such a tie may go either way; after it the sequences
    are not compared. ``tol`` 0 (float32, the dry run) asks for equal tokens, exact ties aside."""
    for i, (x, y) in enumerate(zip(a["tokens"], b["tokens"])):
        if x != y:
            gap = max(math.inf if str(own) not in lp or str(other) not in lp else lp[str(own)] - lp[str(other)]
                      for lp, own, other in ((a["logprobs"][i], x, y), (b["logprobs"][i], y, x)))
            return {"equal": False, "at": i, "gap": None if math.isinf(gap) else round(gap, 4), "ok": gap <= tol}
    if len(a["tokens"]) != len(b["tokens"]) or not a["tokens"]:  # one run stopped early, or neither generated
        return {"equal": False, "at": min(len(a["tokens"]), len(b["tokens"])), "gap": None, "ok": False}
    return {"equal": True, "ok": True}


def summarize(pairs: dict[str, dict]) -> dict:
    """Several ``agreement`` results: all ok?, how many equal, and the ones that differ."""
    return {"ok": all(p["ok"] for p in pairs.values()), "requests": len(pairs),
            "equal": sum(p["equal"] for p in pairs.values()),
            "differ": {k: p for k, p in pairs.items() if not p["equal"]}}


def expected_kv_rows(prompt_ids: list[int], image_token: int, schedule, depth: int) -> list[int]:
    """Prompt rows the KV cache of each layer holds after the prefill, from V2Drop's pure plan
    (``schedule`` None: nothing dropped)."""
    import numpy as np

    from vllm_v2drop.core.counts import stage_of_layer
    from vllm_v2drop.core.request_plan import plan_request

    n = len(prompt_ids)
    if schedule is None or not schedule.layers:
        return [n] * depth
    pos = np.flatnonzero(np.asarray(prompt_ids) == image_token)
    items = np.split(pos, np.flatnonzero(np.diff(pos) > 1) + 1) if len(pos) else []
    plan = plan_request(items, n, schedule.keep_ratios, schedule.min_keep)
    return [plan.compact_len(int(s), n) for s in stage_of_layer(schedule.layers, depth)]


def kv_check(rows: dict[str, int], expected: list[int]) -> dict:
    """Rows per layer (read at the request's first token, decode rows included) against the plan."""
    names = sorted(rows, key=lambda k: int(k.split(".layers.")[1].split(".")[0]))
    decoded = rows[names[0]] - expected[0]  # rows decode steps wrote (the same in every layer)
    got = [rows[k] - decoded for k in names]
    return {"ok": len(names) == len(expected) and decoded >= 0 and got == expected,
            **({} if got == expected else {"got": got, "expected": expected, "decoded": decoded})}


SYNC_RE = re.compile(r"called a synchronizing CUDA operation|Implicit GPU<->CPU sync detected")
SITE_RE = re.compile(r"(\S+\.py:\d+): \w*Warning: ")  # Python's warning line: file:line: category: message


def read_log(text: str) -> dict:
    """What an engine's log says: runner, attention backend and FlashAttention version, graph mode,
    V2Drop's forced settings, sync warnings (count and call sites), tracebacks."""
    def last(pattern):
        hits = re.findall(pattern, text)
        return hits[-1] if hits else None

    syncs = [line for line in text.splitlines() if SYNC_RE.search(line)]
    sites: dict[str, int] = {}
    for line in syncs:
        site = m[1] if (m := SITE_RE.search(line)) else SYNC_RE.search(line)[0]
        sites[site] = sites.get(site, 0) + 1
    return {"v2_runner_line": "Using V2 Model Runner" in text,
            "attention_backend": last(r"Using (\w+) attention backend"),
            "flash_attn_version": (int(v) if (v := last(r"Using FlashAttention version (\d+)")) else None),
            "cudagraph_mode": last(r"'cudagraph_mode': <CUDAGraphMode\.(\w+)"),
            "v2drop_forces": last(r"V2Drop forces: (.*)"),
            # the CUDA graph modes steps ran with, by whether V2Drop planned them (per-stage metadata)
            "graph_modes": {kind: sorted(set(re.findall(rf"V2Drop: the first step {kind} per-stage attention "
                                                        r"metadata ran with CUDA graph mode (\w+)", text)))
                            for kind in ("with", "without")},
            "sync_warnings": len(syncs), "sync_sites": sites,
            "tracebacks": text.count("Traceback (most recent call last)")}


def judge(run: dict, results: dict, logs: dict, shape: dict, model_info: dict, cuda: bool) -> list[dict]:
    """Every check of the smoke test: ``{"check", "engine", "ok", ...}``."""
    from vllm_v2drop.config import V2DropConfig

    schedule = V2DropConfig.from_additional_config({"v2drop": shape["schedule"]}).resolve(model_info["depth"], HF_ARCH)
    tol, checks = shape["tie_tol"], []

    def add(check, engine, ok, **detail):
        checks.append({"check": check, "engine": engine, "ok": bool(ok), **detail})

    specs = {e["name"]: e for e in run["engines"]}
    stock = next(n for n, e in specs.items() if e["impl"] == "stock")
    for name, spec in specs.items():
        log, facts, v2 = logs[name], results[name]["facts"], spec["impl"] == "v2drop"
        # the engine: V1 runner, attention backend, graph mode, V2Drop's forced-settings line
        if v2:  # stock runs vLLM's default runner (Model Runner V2 on a GPU)
            add("V1 model runner", name, V1_RUNNER in facts["runner_mro"] and not log["v2_runner_line"],
                runner=facts["runner_mro"][0])
        if cuda and shape["dtype"] != "float32":  # FlashAttention takes half precision only
            add("FLASH_ATTN, FlashAttention 3", name, log["attention_backend"] == "FLASH_ATTN"
                and log["flash_attn_version"] == 3 and facts["flash_attn_versions"] == [3],
                log_backend=log["attention_backend"], log_version=log["flash_attn_version"],
                layers=facts["flash_attn_versions"])
        want = "NONE" if spec["eager"] or not cuda else "FULL_AND_PIECEWISE" if v2 else None
        if want:
            add(f"CUDA graph mode {want}", name, log["cudagraph_mode"] == want == facts["cudagraph_mode"],
                log=log["cudagraph_mode"], engine_config=facts["cudagraph_mode"])
        if v2:  # steps V2Drop planned never under a full graph; compiled on a GPU: the others under one
            graphs = cuda and not spec["eager"]
            modes = log["graph_modes"]
            add("CUDA graphs by step: planned piecewise, unplanned full" if graphs else "CUDA graphs by step: none",
                name, modes["with"] == (["PIECEWISE"] if graphs else ["NONE"])
                and (("FULL" in modes["without"]) if graphs else modes["without"] == ["NONE"]), **modes)
        forces = log["v2drop_forces"]
        if v2:
            need = ["disable_chunked_mm_input"] + (["V1 model runner"] if cuda and not spec["eager"] else [])
            add("V2Drop forced-settings line", name, forces is not None and all(x in forces for x in need),
                line=forces, needs=need)
        else:
            add("no V2Drop line on stock", name, forces is None, line=forces)
        add("no traceback in the log", name, log["tracebacks"] == 0, tracebacks=log["tracebacks"])
        if v2:  # a sync in V2Drop's own code (a site in vllm_v2drop/); the sites stock has not, listed
            own = sorted(k for k in log["sync_sites"] if "vllm_v2drop" in k)
            add("no sync warning in V2Drop's code", name, not own, sites=own,
                not_in_stock=sorted(set(log["sync_sites"]) - set(logs[stock]["sync_sites"])))

        res = results[name]
        if v2 and "off" in res:
            add("v2drop_off equals stock", name, **summarize(
                {k: agreement(res["off"][k], results[stock]["alone"][k], tol) for k in res["off"]}))
        for n, sc in res["scenarios"].items():
            batched = {k: agreement(sc["outputs"][k], res["alone"][k], tol) for k in sc["outputs"]}
            add(f"batched equals alone ({n} image requests + decodes)", name, **summarize(batched))
            plan = {k: kv_check(rows, expected_kv_rows(res["alone"][k]["prompt_token_ids"],
                                                        model_info["image_token"], schedule if v2 else None,
                                                        model_info["depth"]))
                    for k, rows in sc["kv_rows"].items()}
            bad = {k: v for k, v in plan.items() if not v["ok"]}
            if v2 or plan:
                add(f"KV rows per layer equal the plan ({n} image requests + decodes)", name,
                    len(plan) == int(n) and not bad, requests=len(plan), wrong=bad)

    # compiled against eager: the same KV mode where both ran, else (dry run) across the KV modes
    eager = [n for n, e in specs.items() if e["impl"] == "v2drop" and e["eager"]]
    for name, spec in specs.items():
        if spec["impl"] != "v2drop" or spec["eager"]:
            continue
        other = next((n for n in eager if specs[n]["kv_mode"] == spec["kv_mode"]), eager[0] if eager else None)
        if other:
            a, b = results[name]["alone"], results[other]["alone"]
            add(f"compiled equals eager ({other})", name, **summarize({k: agreement(a[k], b[k], tol) for k in a}))
    for name in eager:  # the layer-1 schedule ran eagerly and dropped there as planned
        layer1 = schedule.layers[0] == 1
        kv_ok = all(c["ok"] for c in checks if c["engine"] == name and c["check"].startswith("KV rows"))
        add("layer-1 schedule in eager mode (drop at layer 1, KV rows as planned)", name, layer1 and kv_ok,
            layers=list(schedule.layers))
    return checks


def measurements(run: dict, results: dict, logs: dict) -> dict:
    specs = {e["name"]: e for e in run["engines"]}
    stock = next(n for n, e in specs.items() if e["impl"] == "stock")
    out = {}
    for name, res in results.items():
        prefill = statistics.median(res["prefill"]["seconds"])
        peaks = [p["peak_allocated_gib"] for p in res["prefill"]["peak_memory"] if p]
        out[name] = {
            "start_s": round(res["start_s"], 1),
            "sync_warnings": logs[name]["sync_warnings"], "sync_sites": logs[name]["sync_sites"],
            "peak_gib_after_drop_step": round(max(peaks), 3) if peaks else None,
            "drop_step_prefill_s": round(prefill, 4),
            "drop_step_prefill_vs_stock": round(prefill / statistics.median(results[stock]["prefill"]["seconds"]), 3),
            "decode_itl_ms": round(res["decode"]["itl_ms"], 3),
            "decode_itl_vs_stock": round(res["decode"]["itl_ms"] / results[stock]["decode"]["itl_ms"], 3),
        }
    return out


# ================================================================================================ main


def _model(dry: bool, size: str) -> Path:
    """The tiny test model (``build/test-models``, as the suite builds it) or the 7B shapes."""
    from vllm_v2drop.dev.make_model import BUILDER_VERSION, make_model

    root = (Path(os.environ.get("V2DROP_TEST_MODELS", REPO / "build" / "test-models")) if dry
            else REPO / "build" / "bench-models")
    out = root / (ARCH if dry else f"{ARCH}-{size}")
    marker = out / "v2drop_model.json"
    if not (marker.exists() and json.loads(marker.read_text()).get("builder_version") == BUILDER_VERSION):
        print(f"building {ARCH} ({size}) into {out} ...", flush=True)
        tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        make_model(ARCH, tmp, size=size)
        if out.exists():
            shutil.rmtree(out)
        tmp.replace(out)
    return out


def _slug(device: str) -> str:
    m = re.search(r"\b([A-Z]\d{2,3}\w*)\b", device)
    return (m[1] if m else re.sub(r"\W+", "-", device)).lower()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes, float32, into a scratch folder (CPU is fine)")
    ap.add_argument("--out", default=None, help="results folder (default: benchmarks/results; scratch with --dry-run)")
    ap.add_argument("--logs", default=None, help="folder for the engines' logs and raw results (default: a temporary one)")
    ap.add_argument("--only", default=None, help="comma-separated engine names (default: all; stock always runs)")
    ap.add_argument("--tie-tol", type=float, default=None, help="token agreement tolerance (see agreement)")
    ap.add_argument("--engine", help=argparse.SUPPRESS)  # child: JSON of (spec, model, shape, sizes, out)
    args = ap.parse_args(argv)
    if args.engine:
        job = json.loads(args.engine)
        run_engine(job["spec"], job["model"], job["shape"], job["sizes"], Path(job["out"]))
        return 0

    dry = args.dry_run
    out = Path(args.out or (tempfile.mkdtemp(prefix="v2drop-gpu-dry-") if dry else REPO / "benchmarks" / "results"))
    out.mkdir(parents=True, exist_ok=True)
    import torch

    cuda = torch.cuda.is_available()
    if not dry and not cuda:
        sys.exit("gpu_run.py needs a CUDA GPU (use --dry-run to run its steps at tiny shapes elsewhere)")
    shape = SHAPES["dry" if dry else "gpu"]
    model = _model(dry, shape["size"])
    cfg = json.loads((model / "config.json").read_text())
    model_info = {"path": str(model), "arch": ARCH, "size": shape["size"], "dtype": shape["dtype"],
                  "depth": cfg["text_config"]["num_hidden_layers"], "image_token": cfg["image_token_index"]}
    sizes = scenario_sizes(shape["capture"])
    only = set(args.only.split(",")) if args.only else None  # stock always runs: the checks compare with it
    run = {"engines": [e for e in engines(dry) if not only or e["name"] in only or e["impl"] == "stock"]}
    device = torch.cuda.get_device_name() if cuda else "cpu"
    if args.tie_tol is not None:
        shape = {**shape, "tie_tol": args.tie_tol}
    work = Path(args.logs or tempfile.mkdtemp(prefix="v2drop-gpu-run-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "VLLM_GPU_SYNC_CHECK": "warn", "VLLM_ALLOW_INSECURE_SERIALIZATION": "1",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    results, logs, failed_engines = {}, {}, []
    for spec in run["engines"]:
        name, log_path, res_path = spec["name"], work / f"{spec['name']}.log", work / f"{spec['name']}.json"
        job = {"spec": spec, "model": str(model), "shape": shape, "sizes": sizes, "out": str(res_path)}
        print(f"engine {name}: log {log_path}", flush=True)
        t0 = time.perf_counter()
        with open(log_path, "w") as f:  # own session: on a timeout the engine's processes go with it
            proc = subprocess.Popen([sys.executable, __file__, "--engine", json.dumps(job)], cwd=REPO, env=env,
                                    stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                rc = proc.wait(timeout=shape["timeout"])
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                rc = f"timeout ({shape['timeout']} s)"
                proc.wait()
        text = log_path.read_text(errors="replace")
        print(f"engine {name}: exit {rc} after {time.perf_counter() - t0:.0f} s", flush=True)
        if rc or not res_path.exists():
            failed_engines.append(name)
            print(text[-3000:], flush=True)
            continue
        results[name], logs[name] = json.loads(res_path.read_text()), read_log(text)
    report = {"device": device, "dry_run": dry, "model": model_info, "schedule": shape["schedule"] or "default",
              "scenario_sizes": sizes, "tie_tolerance": shape["tie_tol"], "logs": str(work),
              "engines": {e["name"]: {**e, **({k: results[e["name"]][k] for k in ("settings", "facts")}
                                             if e["name"] in results else {"failed": True}),
                                      "log": logs.get(e["name"])} for e in run["engines"]}}
    try:
        import vllm

        report["vllm"] = vllm.__version__
    except Exception:  # noqa: BLE001
        report["vllm"] = None
    checks = [{"check": "engine ran its workload", "engine": n, "ok": False} for n in failed_engines]
    if not failed_engines:
        checks += judge(run, results, logs, shape, model_info, cuda)
        report["measurements"] = measurements(run, results, logs)
    report["checks"], report["passed"] = checks, all(c["ok"] for c in checks)
    path = out / f"gpu-smoke-{_slug(device) if cuda else 'cpu-dry' if dry else 'cpu'}.json"
    path.write_text(json.dumps(report, indent=1) + "\n")
    for c in checks:
        print(f"{'ok  ' if c['ok'] else 'FAIL'} {c['engine']:<16} {c['check']}")
    for name, m in report.get("measurements", {}).items():
        print(f"{name:<16} prefill {m['drop_step_prefill_s']:.3f} s (x{m['drop_step_prefill_vs_stock']} stock), "
              f"ITL {m['decode_itl_ms']:.2f} ms (x{m['decode_itl_vs_stock']}), peak {m['peak_gib_after_drop_step']} GiB, "
              f"sync warnings {m['sync_warnings']}")
    print(f"{'passed' if report['passed'] else 'FAILED'}: {path}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
