"""V2Drop's prefill on one GPU at a real 7B shape, with plain torch and transformers (no vLLM).

    python benchmarks/gpu_prefill.py --out DIR            # the GPU run (Qwen2-VL-7B's decoder)
    python benchmarks/gpu_prefill.py --dry-run --out DIR  # tiny shapes on the CPU, seconds
    python benchmarks/gpu_prefill.py --plot-from FILE.json  # the PNG of a result file

The decoder is Qwen2-VL-7B's language model (hidden 3584, 28 layers, 28 heads, 4 KV heads,
intermediate 18944, vocab 152064, M-RoPE with rope theta 1e6 and sections 16/24/24), built from
transformers' own Qwen2-VL text classes with random bf16 weights and ``sdpa`` attention. Its
decoder layers are called the way vLLM calls them (``layer(positions, hidden, residual)``,
returning ``(hidden, residual)``), so the project's own drop loop,
:meth:`vllm_v2drop.worker.runtime.V2DropRuntime.forward`, runs them unchanged: the runtime plans the
batch (:class:`~vllm_v2drop.core.batch_planner.BatchPlanner`), and at each stage scores the rows, runs the
segmented top-k and gathers the kept rows (:mod:`vllm_v2drop.core.selection`). Every request in a
batch has the same shape (64 text rows, 32 before and 32 after one vision item), so the packed
rows of a batch are ``[batch, rows, hidden]`` at every layer and ``sdpa`` runs causal attention
over each request's rows present in that layer. Each layer's keys and values are kept until the
prefill ends, as a KV cache would hold them. Positions are the item's 3-D M-RoPE positions
(a ``t x h x w`` grid: 576 = 1x24x24, 2880 = 1x48x60, 6272 = 16x14x28); kept rows keep theirs.

Measured:

* ``prefill``: time from the batch's planning to the logits of each request's last row
  (CUDA events, warm-up excluded, median of the repeats) without dropping and with each
  schedule, resolved for 28 layers by :class:`vllm_v2drop.config.V2DropConfig`; the rows each
  layer saw (checked against the plan); peak GPU memory of one prefill; the FLOP-ideal speed-up
  of the same requests (``benchmarks/flops.py``).
* ``selection``: what the drop loop adds per stage (the two residual-stream sums, the scores,
  the segmented top-k with the kept-row indices, the gathers of the rows' state), for 1 to 64
  items of each size, in microseconds: eager (as the drop loop runs it), its three parts, and
  replayed from a CUDA graph (device time without launch gaps); beside one decoder layer's time
  on the same rows and on the undropped rows.
* ``sync_check``: ``torch.cuda.set_sync_debug_mode("error")`` around each whole drop prefill
  (planning, the runtime's host-to-device copies, the drop loop, the logits): any host sync
  raises; where one does, the place is recorded.
* ``identity_check``: keep ratios 1.0 through the drop loop give the same logits as the plain
  loop.
* ``eager_floor``: one 65-row request through every layer, the fixed cost of an eager prefill.

Needs torch, transformers and the project's own dependencies (numpy, pydantic). vLLM is never
imported: ``main`` blocks the package.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import shlex
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for p in (str(HERE), str(REPO)):
    if p not in sys.path:
        sys.path.insert(0, p)

import numpy as np  # noqa: E402
import torch  # noqa: E402

TEXT_ROWS = 64  # 32 text rows before the vision item, 32 after (the last prompt row is text)
ARCH = "Qwen2VLForConditionalGeneration"

QWEN2_VL_7B = dict(  # Qwen2-VL-7B-Instruct's text_config
    hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
    num_key_value_heads=4, vocab_size=152064, rms_norm_eps=1e-6, max_position_embeddings=32768,
    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
)
TINY = dict(  # the same depth (so the same schedules), tiny widths
    hidden_size=64, intermediate_size=128, num_hidden_layers=28, num_attention_heads=4,
    num_key_value_heads=2, vocab_size=256, rms_norm_eps=1e-6, max_position_embeddings=32768,
    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
)
GRIDS = {576: (1, 24, 24), 2880: (1, 48, 60), 6272: (16, 14, 28)}  # (t, h, w) after the 2x2 merge
SCHEDULES = ("qwen2-vl", "video-25")


# ------------------------------------------------------------------------------------- the model
class KVStore:
    """Each layer's keys and values, kept until the prefill ends (the attention modules call ``update``)."""

    def __init__(self) -> None:
        self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self.kv[layer_idx] = (key_states, value_states)
        return key_states, value_states


class FusedLayer:
    """One transformers Qwen2-VL decoder layer, called as vLLM calls its layers.

    ``(positions [3, N], hidden [N, H], residual [N, H] | None) -> (hidden, residual)``, where the
    residual stream entering the next layer is ``hidden + residual``. The ``N`` packed rows are
    ``decoder.batch`` requests of equal length, so attention runs on ``[batch, N / batch, H]``.
    """

    def __init__(self, layer, decoder: Decoder) -> None:
        self.layer, self.decoder = layer, decoder

    def __call__(self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None):
        d, layer = self.decoder, self.layer
        n = hidden.shape[0]
        b = d.batch
        if n % b:
            raise ValueError(f"{n} rows do not split into {b} requests of equal length")
        t = n // b
        residual = hidden if residual is None else hidden + residual
        h = layer.input_layernorm(residual).view(b, t, -1)
        cos_sin = d.cos_sin(h, positions, b, t)
        a, _ = layer.self_attn(hidden_states=h, attention_mask=None, position_embeddings=cos_sin,
                               past_key_values=d.kv)
        residual = a.reshape(n, -1) + residual
        hidden = layer.mlp(layer.post_attention_layernorm(residual))
        d.rows_seen.append(n)  # a shape: known on the host, no sync
        return hidden, residual


class Decoder:
    """What :meth:`V2DropRuntime.forward` needs of a language model: ``layers``, ``norm``,
    ``start_layer`` / ``end_layer``; plus the LM head and the per-prefill state."""

    def __init__(self, text_model, lm_head, batch: int = 1) -> None:
        self.text_model, self.lm_head, self.batch = text_model, lm_head, batch
        self.rotary = text_model.rotary_emb
        self.layers = [FusedLayer(layer, self) for layer in text_model.layers]
        self.start_layer, self.end_layer = 0, len(self.layers)
        self.kv: KVStore | None = None
        self.rows_seen: list[int] = []
        self._rope: tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]] | None = None

    def reset(self, batch: int, kv: KVStore | None) -> None:
        """Per-prefill state: the batch, a fresh KV store, the row log, no cached rotary tables."""
        self.batch, self.kv, self.rows_seen, self._rope = batch, kv, [], None

    def cos_sin(self, h: torch.Tensor, positions: torch.Tensor, b: int, t: int):
        """M-RoPE cos / sin of ``positions``, computed once per positions tensor: once per prefill
        without dropping, once per stage with V2Drop (the drop loop gathers new positions only at
        a stage), as transformers' own model computes them once per forward."""
        if self._rope is None or self._rope[0] is not positions:
            self._rope = (positions, self.rotary(h, positions.reshape(3, b, t)))
        return self._rope[1]

    def norm(self, hidden, residual):
        x = hidden if residual is None else hidden + residual
        return self.text_model.norm(x), x


def build_decoder(cfg: dict, device: torch.device, dtype: torch.dtype, seed: int = 0) -> Decoder:
    """Qwen2-VL's text model with random weights (transformers' own init, ``initializer_range`` 0.02)."""
    from transformers import Qwen2VLTextConfig, Qwen2VLTextModel

    config = Qwen2VLTextConfig(**cfg)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            text_model = Qwen2VLTextModel(config).eval()
            lm_head = torch.nn.Linear(config.hidden_size, config.vocab_size, bias=False)
            torch.nn.init.normal_(lm_head.weight, std=config.initializer_range)
    finally:
        torch.set_default_dtype(old)
    text_model.requires_grad_(False)
    lm_head.requires_grad_(False)
    if text_model.config._attn_implementation != "sdpa":
        raise RuntimeError(f"attention is {text_model.config._attn_implementation}, not sdpa")
    return Decoder(text_model, lm_head)


def grid_of(n0: int) -> tuple[int, int, int]:
    return GRIDS.get(n0, (1, 1, n0))


def request_positions(n0: int) -> torch.Tensor:
    """``[3, 64 + n0]`` M-RoPE positions of one request: 32 text rows, the item's grid, 32 text rows
    (Qwen2-VL's ``get_rope_index``: text rows count on all three axes, an item's rows are its grid
    offset by the position after the text before it)."""
    before = TEXT_ROWS // 2
    t, h, w = grid_of(n0)
    assert t * h * w == n0
    text0 = torch.arange(before).expand(3, -1)
    grid = torch.stack([
        torch.arange(t).repeat_interleave(h * w),
        torch.arange(h).repeat_interleave(w).repeat(t),
        torch.arange(w).repeat(t * h),
    ]) + before
    start = before + max(t, h, w)
    text1 = (torch.arange(TEXT_ROWS - before) + start).expand(3, -1)
    return torch.cat([text0, grid, text1], dim=1).to(torch.int64)


class Workload:
    """``batch`` requests of 64 text rows plus one vision item of ``n0`` rows, packed."""

    def __init__(self, n0: int, batch: int, hidden: int, device, dtype, seed: int = 0) -> None:
        self.n0, self.batch = n0, batch
        self.rows = TEXT_ROWS + n0
        self.positions = request_positions(n0).repeat(1, batch).to(device)
        self.last_rows = (torch.arange(batch) * self.rows + self.rows - 1).to(device)
        self.embeds = None
        if hidden:  # else: plans and positions only
            g = torch.Generator(device=device).manual_seed(seed * 1000 + n0 * 10 + batch)
            self.embeds = torch.randn(batch * self.rows, hidden, generator=g, device=device, dtype=dtype)
        self.item_positions = np.arange(TEXT_ROWS // 2, TEXT_ROWS // 2 + n0, dtype=np.int64)
        self.modality = "video" if grid_of(n0)[0] > 1 else "image"
        self._calls = 0

    def batch_view(self):
        """A fresh :class:`BatchView` (new request ids: each prefill plans its requests anew)."""
        from vllm_v2drop.worker.runtime import BatchView, RequestView, VisionItem

        self._calls += 1
        ids = [f"p{self._calls}-r{b}" for b in range(self.batch)]
        views = {rid: RequestView(rid, self.rows, [VisionItem(self.modality, self.item_positions)], False)
                 for rid in ids}
        return BatchView(ids, np.zeros(self.batch, np.int64), np.full(self.batch, self.rows, np.int64),
                         views.__getitem__)

    def requests(self):
        from flops import Request

        return [Request(self.rows, (self.n0,))] * self.batch


def resolve_schedule(v2drop: dict, num_layers: int):
    """The :class:`ResolvedSchedule` V2Drop runs with ``--additional-config '{"v2drop": v2drop}'``."""
    from vllm_v2drop.config import V2DropConfig

    return V2DropConfig.from_additional_config({"v2drop": dict(v2drop)}).resolve(num_layers, ARCH)


def make_runtime(schedule, num_layers: int):
    from vllm_v2drop.worker.runtime import V2DropRuntime

    return V2DropRuntime(schedule, [f"model.layers.{i}.self_attn.attn" for i in range(num_layers)])


# ------------------------------------------------------------------------------------ prefills
@torch.no_grad()
def stock_prefill(dec: Decoder, wl: Workload) -> torch.Tensor:
    """Every layer on every row (what the engine runs without V2Drop): logits ``[batch, vocab]``."""
    dec.reset(wl.batch, KVStore())
    hidden, residual = wl.embeds, None
    for layer in dec.layers:
        hidden, residual = layer(wl.positions, hidden, residual)
    hidden, _ = dec.norm(hidden, residual)
    logits = dec.lm_head(hidden[wl.last_rows])
    dec.kv = None
    return logits


@torch.no_grad()
def v2drop_prefill(dec: Decoder, wl: Workload, runtime, device) -> torch.Tensor:
    """The runtime plans the batch and runs its drop loop (:meth:`V2DropRuntime.forward`)."""
    dec.reset(wl.batch, KVStore())
    batch = wl.batch_view()
    step = runtime.plan_step(batch)
    with runtime.active(step, batch, torch.device(device)):
        drop = runtime.current(wl.embeds.shape[0])
        if drop is None:
            raise RuntimeError("the runtime planned no drop for a batch with vision items")
        out = runtime.forward(dec, drop, None, wl.positions, wl.embeds)
    logits = dec.lm_head(out[wl.last_rows])
    dec.kv = None
    return logits


def expected_rows_per_layer(wl: Workload, schedule) -> list[int]:
    """Rows each decoder layer sees, from the FLOP model's plan (per request, times the batch)."""
    from flops import rows_in_layers

    req = wl.requests()[0]
    return [wl.batch * r for r in rows_in_layers(req, schedule.layers, schedule.keep_ratios,
                                                 schedule.num_layers, schedule.min_keep)]


# ------------------------------------------------------------------------------------- timing
def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_ms(fn, device, warmup: int, repeats: int) -> dict:
    """Median (and min, max, all) milliseconds of ``fn()``: CUDA events on a GPU, the host clock on CPU."""
    cuda = torch.device(device).type == "cuda"
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times), "all_ms": times}


def graph_ms(fn, warmup: int, repeats: int) -> float:
    """Median milliseconds of one replay of ``fn`` captured in a CUDA graph (no launch gaps)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    try:
        return time_ms(g.replay, "cuda", warmup, repeats)["median_ms"]
    finally:
        del g


def peak_memory(fn, device) -> dict | None:
    """Peak bytes allocated during one ``fn()``: in total, and above what was allocated before it."""
    if torch.device(device).type != "cuda":
        return None
    _sync(device)
    gc.collect()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    _sync(device)
    peak = torch.cuda.max_memory_allocated()
    return {"peak_bytes": peak, "base_bytes": base, "peak_above_base_bytes": peak - base}


def sync_check(fn, device) -> dict:
    """Run ``fn`` under ``torch.cuda.set_sync_debug_mode("error")``: a host sync raises there."""
    if torch.device(device).type != "cuda":
        return {"checked": False, "why": "no CUDA device: set_sync_debug_mode checks CUDA syncs only"}
    _sync(device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
        torch.cuda.set_sync_debug_mode(0)
        _sync(device)
        return {"checked": True, "mode": "error", "host_syncs": 0}
    except RuntimeError as err:
        torch.cuda.set_sync_debug_mode(0)
        frames = [f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in traceback.extract_tb(err.__traceback__)]
        result = {"checked": True, "mode": "error", "host_syncs": ">= 1", "error": str(err).splitlines()[0],
                  "first_sync_at": frames[-8:]}
        # every sync place, from "warn" mode
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                fn()
            _sync(device)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        result["warn_mode_syncs"] = len([w for w in caught if "synchroniz" in str(w.message).lower()])
        return result
    finally:
        torch.cuda.set_sync_debug_mode(0)


# ----------------------------------------------------------------------------- the sections
def probe_sdpa(device, dtype, cfg) -> dict:
    """Whether PyTorch's flash SDPA kernel takes this model's grouped-query causal attention."""
    if torch.device(device).type != "cuda":
        return {"flash_gqa": None, "why": "CPU"}
    from torch.nn.attention import SDPBackend, sdpa_kernel

    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg["hidden_size"] // heads
    q = torch.randn(1, heads, 256, hd, device=device, dtype=dtype)
    k = torch.randn(1, kv_heads, 256, hd, device=device, dtype=dtype)
    try:
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            torch.nn.functional.scaled_dot_product_attention(q, k, k, is_causal=True, enable_gqa=True)
        return {"flash_gqa": True}
    except RuntimeError as err:
        return {"flash_gqa": False, "error": str(err).splitlines()[0]}


def run_prefill_section(dec, cfg, sizes, batches, schedules, device, dtype, warmup, repeats, log) -> list[dict]:
    from flops import ideal_speedup, lm_shape

    shape = lm_shape(cfg)
    rows = []
    for n0 in sizes:
        for b in batches:
            wl = Workload(n0, b, cfg["hidden_size"], device, dtype)
            expected_stock = [b * wl.rows] * shape.num_layers
            stock_t = time_ms(lambda: stock_prefill(dec, wl), device, warmup, repeats)
            seen = list(dec.rows_seen)
            stock_mem = peak_memory(lambda: stock_prefill(dec, wl), device)
            stock_row = {"size": n0, "batch": b, "prompt_rows": wl.rows, "schedule": "none", **stock_t,
                         "peak_memory": stock_mem, "rows_per_layer": seen,
                         "rows_per_layer_expected": expected_stock, "rows_match": seen == expected_stock}
            rows.append(stock_row)
            log(f"prefill size {n0} batch {b} none: {stock_t['median_ms']:.2f} ms")
            for name, sched in schedules.items():
                runtime = make_runtime(sched, shape.num_layers)
                t = time_ms(lambda: v2drop_prefill(dec, wl, runtime, device), device, warmup, repeats)
                seen = list(dec.rows_seen)
                expected = expected_rows_per_layer(wl, sched)
                mem = peak_memory(lambda: v2drop_prefill(dec, wl, runtime, device), device)
                ideal = ideal_speedup(shape, wl.requests(), sched)
                speedup = stock_t["median_ms"] / t["median_ms"]
                row = {"size": n0, "batch": b, "prompt_rows": wl.rows, "schedule": name, **t,
                       "peak_memory": mem, "rows_per_layer": seen, "rows_per_layer_expected": expected,
                       "rows_match": seen == expected,
                       "kept_per_item_by_stage": [int(wl.n0), *_keep_counts(wl.n0, sched)],
                       "speedup": speedup, "flop_ideal_speedup": ideal["ideal_prefill_speedup"],
                       "fraction_of_ideal": speedup / ideal["ideal_prefill_speedup"],
                       "stock_gflop": ideal["stock_gflop"], "v2drop_gflop": ideal["v2drop_gflop"]}
                if mem and stock_mem:
                    row["peak_memory_saving_pct"] = 100 * (1 - mem["peak_bytes"] / stock_mem["peak_bytes"])
                    row["activation_memory_saving_pct"] = 100 * (
                        1 - mem["peak_above_base_bytes"] / stock_mem["peak_above_base_bytes"])
                rows.append(row)
                log(f"prefill size {n0} batch {b} {name}: {t['median_ms']:.2f} ms, speed-up {speedup:.2f} "
                    f"(FLOP-ideal {ideal['ideal_prefill_speedup']:.2f}), rows match {row['rows_match']}")
            del wl
            _free(device)
    return rows


def _keep_counts(n0: int, sched) -> list[int]:
    from vllm_v2drop.core.counts import keep_counts

    return [int(k) for k in keep_counts(n0, sched.keep_ratios, sched.min_keep)]


def _free(device) -> None:
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def run_sync_section(dec, cfg, sizes, batches, schedules, device, dtype) -> dict:
    out: dict = {}
    n_layers = cfg["num_hidden_layers"]
    for n0 in sizes:
        for b in batches:
            wl = Workload(n0, b, cfg["hidden_size"], device, dtype)
            key = f"size {n0} batch {b}"
            out[key] = {"none": sync_check(lambda: stock_prefill(dec, wl), device)}
            for name, sched in schedules.items():
                runtime = make_runtime(sched, n_layers)
                v2drop_prefill(dec, wl, runtime, device)  # warm (allocator, plans of this shape)
                out[key][name] = sync_check(lambda: v2drop_prefill(dec, wl, runtime, device), device)
            del wl
            _free(device)
    return out


def run_identity_check(dec, cfg, n0, batch, device, dtype) -> dict:
    """Keep ratios 1.0 at the qwen2-vl layers: the drop loop keeps every row and must give the
    plain loop's logits exactly (same operations on the same rows)."""
    sched = resolve_schedule({"layers": [3, 16, 22], "keep_ratios": [1.0, 1.0, 1.0]}, cfg["num_hidden_layers"])
    wl = Workload(n0, batch, cfg["hidden_size"], device, dtype, seed=1)
    ref = stock_prefill(dec, wl)
    got = v2drop_prefill(dec, wl, make_runtime(sched, cfg["num_hidden_layers"]), device)
    diff = (got.float() - ref.float()).abs().max().item()
    return {"size": n0, "batch": batch, "schedule": sched.description, "max_abs_logit_diff": diff,
            "equal": bool(torch.equal(got, ref)), "rows_per_layer": list(dec.rows_seen)}


def selection_ops(sched, metric_state: dict, stage: int, num_kept: int):
    """The drop loop's own work at one stage, as :meth:`V2DropRuntime.forward` does it
    (``x_prev`` one layer before the stage, then its ``cut``), on ``metric_state``'s tensors."""
    from vllm_v2drop.worker.runtime import same_on_every_rank
    from vllm_v2drop.core.scorers import stage_scores
    from vllm_v2drop.core.selection import kept_rows, segmented_topk_keep

    st = metric_state

    def scores():
        x_prev = st["prev_hidden"] + st["prev_residual"]
        x_cur = st["hidden"] + st["residual"]
        return stage_scores(sched.metric, x_cur, x_prev, seed=sched.seed, stage=stage, token_index=st["token_index"])

    def topk(sc):
        keep = segmented_topk_keep(sc, st["segment"], st["keep"], st["sizes"])
        return same_on_every_rank(kept_rows(keep, num_kept))

    def gather(idx):
        return (st["hidden"][idx], st["residual"][idx], st["rows"][idx], st["positions"][..., idx],
                st["segment"][idx], st["token_index"][idx])

    def whole():
        return gather(topk(scores()))

    return scores, topk, gather, whole


def run_selection_section(dec, cfg, sched, sizes, counts, device, dtype, warmup, repeats, log,
                          use_graphs: bool = True) -> list[dict]:
    """Per size, item count and stage: the drop loop's own work, and one layer on the same rows."""
    rows_out: list[dict] = []
    for n0 in sizes:
        for g in counts:
            try:
                _selection_point(dec, cfg, sched, n0, g, device, dtype, warmup, repeats, log, use_graphs, rows_out)
            except torch.cuda.OutOfMemoryError as err:  # recorded, not hidden; the other points still run
                rows_out.append({"size": n0, "items": g, "error": "out of memory: " + str(err).splitlines()[0]})
                log(f"selection size {n0} items {g}: out of memory")
            _free(device)
    return rows_out


@torch.no_grad()
def _selection_point(dec, cfg, sched, n0, g, device, dtype, warmup, repeats, log, use_graphs, rows_out) -> None:
    cuda = torch.device(device).type == "cuda"
    hidden_size, n_layers = cfg["hidden_size"], cfg["num_hidden_layers"]
    wl_rows = TEXT_ROWS + n0
    gen = torch.Generator(device=device).manual_seed(n0 + g)

    def rnd(n):
        return torch.randn(n, hidden_size, generator=gen, device=device, dtype=dtype)

    wl = Workload(n0, g, 0, device, dtype)  # plans and positions only: the rows are drawn per stage
    runtime = make_runtime(sched, n_layers)
    batch = wl.batch_view()
    step = runtime.plan_step(batch)
    n = g * wl_rows
    with runtime.active(step, batch, torch.device(device)):
        drop = runtime.current(n)
    st = {"positions": wl.positions,
          "segment": drop.segment, "token_index": drop.token_index,
          "rows": torch.arange(n, device=device)}
    for s in range(1, len(sched.layers) + 1):
        n_in, n_kept = drop.plan.num_rows(s - 1), drop.plan.num_rows(s)
        # fresh random rows for this stage (their scores have no ties)
        st.update(hidden=rnd(n_in), residual=rnd(n_in), prev_hidden=rnd(n_in), prev_residual=rnd(n_in),
                  keep=drop.keep[s - 1], sizes=drop.sizes[s - 1])
        scores, topk, gather, whole = selection_ops(sched, st, s, n_kept)
        sc = scores()
        idx = topk(sc)
        parts = {
            "scores_us": 1e3 * time_ms(scores, device, warmup, repeats)["median_ms"],
            "topk_us": 1e3 * time_ms(lambda: topk(sc), device, warmup, repeats)["median_ms"],
            "gather_us": 1e3 * time_ms(lambda: gather(idx), device, warmup, repeats)["median_ms"],
        }
        total = 1e3 * time_ms(whole, device, warmup, repeats)["median_ms"]
        graph = None
        if cuda and use_graphs:
            try:
                graph = 1e3 * graph_ms(whole, warmup, repeats)
            except RuntimeError as err:  # a sync or another op that cannot be captured
                graph = f"capture failed: {str(err).splitlines()[0]}"
            _free(device)
        # one decoder layer on the rows entering the stage (the layer the stage's drop shortens)
        dec.reset(g, None)
        pos_in = st["positions"]
        h_in, r_in = st["hidden"], st["residual"]
        layer = dec.layers[sched.layers[s - 1]]
        lt = 1e3 * time_ms(lambda: layer(pos_in, h_in, r_in), device, max(1, warmup // 2),
                           max(3, repeats // 4))["median_ms"]
        _free(device)
        if s == 1:
            full = lt  # the layer on every row: stage 1's input
        row = {"size": n0, "items": g, "stage": s, "layer": sched.layers[s - 1], "rows_in": n_in,
               "rows_out": n_kept, "eager_us": total, **parts, "graph_us": graph,
               "layer_us_same_rows": lt, "layer_us_undropped_rows": full,
               "pct_of_layer_same_rows": 100 * total / lt, "pct_of_layer_undropped_rows": 100 * total / full}
        if isinstance(graph, float):
            row["graph_pct_of_layer_same_rows"] = 100 * graph / lt
        rows_out.append(row)
        log(f"selection size {n0} items {g} stage {s}: {total:.0f} us eager"
            + (f", {graph:.0f} us graph" if isinstance(graph, float) else "")
            + f"; layer on same rows {lt:.0f} us ({row['pct_of_layer_same_rows']:.2f}%)")
        # the next stage's inputs: the kept rows
        _h, _r, st["rows"], st["positions"], st["segment"], st["token_index"] = gather(idx)
        del sc, idx, _h, _r, scores, topk, gather, whole
    del st, drop, step, runtime


# ------------------------------------------------------------------------------------- output
def environment(device) -> dict:
    import transformers

    env = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "numpy": np.__version__, "platform": platform.platform(), "cpu_count": os.cpu_count()}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    try:
        import pydantic

        env["pydantic"] = pydantic.VERSION
    except ImportError:
        pass
    if torch.device(device).type == "cuda":
        p = torch.cuda.get_device_properties(torch.device(device))
        env.update(gpu=p.name, gpu_memory_bytes=p.total_memory, compute_capability=f"{p.major}.{p.minor}",
                   cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
        with contextlib.suppress(Exception):
            import subprocess

            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=20).stdout.strip()
    return env


def summary_table(result: dict) -> str:
    """A markdown table of the prefill section: speed-up beside FLOP-ideal, memory saving."""
    lines = ["| vision rows | batch | schedule | no drop (ms) | V2Drop (ms) | speed-up | FLOP-ideal | of ideal "
             "| peak memory no drop / V2Drop (GiB) | saving |", "|---|---|---|---|---|---|---|---|---|---|"]
    stock = {(r["size"], r["batch"]): r for r in result["prefill"] if r["schedule"] == "none"}
    for r in result["prefill"]:
        if r["schedule"] == "none":
            continue
        s = stock[(r["size"], r["batch"])]
        mem = "-"
        saving = "-"
        if r.get("peak_memory") and s.get("peak_memory"):
            mem = f"{s['peak_memory']['peak_bytes'] / 2**30:.2f} / {r['peak_memory']['peak_bytes'] / 2**30:.2f}"
            saving = f"{r['peak_memory_saving_pct']:.1f}%"
        lines.append(f"| {r['size']} | {r['batch']} | `{r['schedule']}` | {s['median_ms']:.2f} | {r['median_ms']:.2f} "
                     f"| {r['speedup']:.2f}x | {r['flop_ideal_speedup']:.2f}x | {r['fraction_of_ideal']:.2f} "
                     f"| {mem} | {saving} |")
    return "\n".join(lines)


def selection_table(result: dict) -> str:
    lines = ["| vision rows | items | stage (layer) | rows in -> out | eager (us) | graph (us) | one layer, same rows (us) "
             "| % of it | one layer, undropped rows (us) | % of it |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["selection"]:
        if "error" in r:
            lines.append(f"| {r['size']} | {r['items']} | {r['error']} |")
            continue
        g = f"{r['graph_us']:.0f}" if isinstance(r["graph_us"], float) else "-"
        lines.append(f"| {r['size']} | {r['items']} | {r['stage']} ({r['layer']}) | {r['rows_in']} -> {r['rows_out']} "
                     f"| {r['eager_us']:.0f} | {g} | {r['layer_us_same_rows']:.0f} | {r['pct_of_layer_same_rows']:.2f}% "
                     f"| {r['layer_us_undropped_rows']:.0f} | {r['pct_of_layer_undropped_rows']:.2f}% |")
    return "\n".join(lines)


def plot(result: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 5))
    # 1: measured speed-up beside the FLOP-ideal one
    ax = axes[0]
    rows = [r for r in result["prefill"] if r["schedule"] != "none"]
    labels = [f"{r['size']} b{r['batch']} {r['schedule']}" for r in rows]
    x = np.arange(len(rows))
    ax.bar(x - 0.2, [r["flop_ideal_speedup"] for r in rows], 0.4, label="FLOP-ideal", color="#bbbbbb")
    ax.bar(x + 0.2, [r["speedup"] for r in rows], 0.4, label="measured", color="#1f77b4")
    ax.axhline(1.0, color="k", lw=0.6)
    ax.set_xticks(x, labels, fontsize=7, rotation=60, ha="right")
    ax.set_ylabel("prefill speed-up over no dropping")
    ax.set_title("Prefill speed-up (vision rows / batch / schedule)")
    ax.legend()
    # 2: selection cost against one layer, stage 1, per size
    ax = axes[1]
    for n0 in sorted({r["size"] for r in result["selection"]}):
        for s, style in ((1, "-o"), (2, "--s")):
            pts = [r for r in result["selection"] if r["size"] == n0 and r.get("stage") == s]
            if pts:
                ax.plot([r["items"] for r in pts], [r["pct_of_layer_same_rows"] for r in pts], style,
                        label=f"{n0} rows, stage {s}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("vision items in the batch")
    ax.set_ylabel("selection (eager) as % of one layer on the same rows")
    ax.set_title("Selection cost per drop layer")
    ax.legend(fontsize=7)
    # 3: peak memory
    ax = axes[2]
    mem_rows = [r for r in result["prefill"] if r.get("peak_memory")]
    if mem_rows:
        keys = sorted({(r["size"], r["batch"]) for r in mem_rows})
        names = ["none", *[s for s in result["schedules"]]]
        w = 0.8 / len(names)
        for i, name in enumerate(names):
            vals = []
            for k in keys:
                r = next((m for m in mem_rows if (m["size"], m["batch"]) == k and m["schedule"] == name), None)
                vals.append(r["peak_memory"]["peak_above_base_bytes"] / 2**30 if r else 0)
            ax.bar(np.arange(len(keys)) + (i - (len(names) - 1) / 2) * w, vals, w, label=name)
        ax.set_xticks(np.arange(len(keys)), [f"{k[0]}\nb{k[1]}" for k in keys], fontsize=7)
        ax.set_ylabel("peak GiB above weights and inputs (activations + KV)")
        ax.set_title("Peak GPU memory of one prefill")
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no GPU memory figures (CPU run)", ha="center", va="center")
        ax.set_axis_off()
    env = result["environment"]
    fig.suptitle(f"V2Drop prefill, Qwen2-VL-7B decoder shape, random {result['model']['dtype']} weights: {env.get('gpu', 'CPU')}, "
                 f"torch {env['torch']}, transformers {env['transformers']}" + (" (DRY RUN)" if result["dry_run"] else ""),
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------- main
def block_vllm() -> None:
    """Make every ``import vllm`` fail at once: this benchmark must run where vLLM is not installed
    (the runtime's optional vLLM look-ups, tensor-parallel rank and logging rank, then take their
    no-vLLM branch)."""
    if "vllm" not in sys.modules:
        sys.modules["vllm"] = None  # type: ignore[assignment]


def load_runtime() -> list[str]:
    """Import :mod:`vllm_v2drop.worker.runtime` with vLLM absent; returns the workarounds that took.

    ``vllm_v2drop.overrides`` derives its request error from ``vllm.exceptions.VLLMValidationError``
    and ``ValueError``; its fallback without vLLM (``Exception``) cannot be combined with
    ``ValueError`` (``TypeError``: no consistent method resolution order). Where that happens, a
    stand-in ``vllm.exceptions`` holding a ``ValueError`` subclass is put in place for that one
    import and removed again (nothing of vLLM is imported; the runtime's other vLLM look-ups still
    fail and take their no-vLLM branch)."""
    import types

    try:
        import vllm_v2drop.worker.runtime  # noqa: F401

        return []
    except TypeError as err:
        if "(MRO)" not in str(err):
            raise
    saved = {k: sys.modules.get(k) for k in ("vllm", "vllm.exceptions")}
    stub = types.ModuleType("vllm")
    stub.__path__ = []  # a package with nothing in it: every other vllm.* import fails
    exc = types.ModuleType("vllm.exceptions")
    exc.VLLMValidationError = type("VLLMValidationError", (ValueError,), {})
    sys.modules["vllm"], sys.modules["vllm.exceptions"] = stub, exc
    try:
        import vllm_v2drop.worker.runtime  # noqa: F401, F811
    finally:
        for k, v in saved.items():
            if v is None and k != "vllm":
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    return ["vllm_v2drop.overrides cannot be imported without vLLM (its fallback base class Exception "
            "conflicts with ValueError); it was imported with a stand-in vllm.exceptions "
            "(VLLMValidationError = a ValueError subclass), removed again right after"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--dry-run", action="store_true", help="tiny shapes (hidden 64) in float32, on the CPU unless --device")
    p.add_argument("--out", default=".", help="directory for gpu-prefill-<name>.json and .png")
    p.add_argument("--name", default=None, help="result name (default: h200 on an H200, dry on --dry-run, else the GPU)")
    p.add_argument("--sizes", type=int, nargs="*", default=None, help="vision rows per item (default 576 2880 6272)")
    p.add_argument("--batches", type=int, nargs="*", default=None, help="requests per batch (default 1 8)")
    p.add_argument("--items", type=int, nargs="*", default=None, help="selection: items (default 1 2 4 8 16 32 64)")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--skip", nargs="*", default=[], choices=["prefill", "selection", "sync", "identity"])
    p.add_argument("--plot-from", default=None, help="only draw the PNG of this result file (beside it, or in --out)")
    args = p.parse_args(argv)

    if args.plot_from:
        src = Path(args.plot_from)
        result = json.loads(src.read_text())
        png = (Path(args.out) if args.out != "." else src.parent) / (src.stem + ".png")
        plot(result, png)
        print(f"wrote {png}")
        return 0

    block_vllm()
    workarounds = load_runtime()
    device = args.device or ("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu")
    cuda = torch.device(device).type == "cuda"
    if not cuda:
        torch.set_num_threads(1)  # tiny shapes: threads only add contention
    if args.dry_run:
        cfg, dtype = TINY, torch.float32
        sizes, batches, items = args.sizes or [24, 60], args.batches or [1, 2], args.items or [1, 2]
        warmup, repeats = args.warmup if args.warmup is not None else 1, args.repeats or 2
    else:
        cfg, dtype = QWEN2_VL_7B, torch.bfloat16
        sizes, batches = args.sizes or [576, 2880, 6272], args.batches or [1, 8]
        items = args.items or [1, 2, 4, 8, 16, 32, 64]
        warmup, repeats = args.warmup if args.warmup is not None else 2, args.repeats or 7
    name = args.name
    if name is None:
        gpu = torch.cuda.get_device_name(torch.device(device)) if cuda else ""
        name = "dry" if args.dry_run else ("h200" if "H200" in gpu else
                                            "".join(c if c.isalnum() else "-" for c in (gpu or "cpu").lower()))
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    out_json, out_png = out_dir / f"gpu-prefill-{name}.json", out_dir / f"gpu-prefill-{name}.png"
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:7.1f} s] {msg}", flush=True)

    env = environment(device)
    log(f"device {device}: {env.get('gpu', platform.processor() or 'cpu')}; torch {env['torch']}, "
        f"transformers {env['transformers']}")
    num_layers = cfg["num_hidden_layers"]
    schedules = {name_: resolve_schedule({"preset": name_}, num_layers) for name_ in SCHEDULES}
    result: dict = {
        "benchmark": "gpu_prefill",
        "command": "python " + " ".join(shlex.quote(a) for a in [f"benchmarks/{Path(__file__).name}", *(argv if argv is not None else sys.argv[1:])]),
        "dry_run": args.dry_run,
        "environment": env,
        "vllm_imported": False,
        "workarounds": workarounds,
        "model": {"config": cfg, "built_from": "transformers Qwen2VLTextModel decoder layers + a Linear LM head",
                  "rope": f"M-RoPE (3-D positions, mrope_section {cfg['rope_parameters']['mrope_section']})",
                  "attention": "sdpa (torch.nn.functional.scaled_dot_product_attention, causal, GQA)",
                  "dtype": str(dtype).removeprefix("torch."), "weights": "random, transformers' init (normal, std 0.02)",
                  "kv": "each layer's keys and values kept until the prefill ends"},
        "workload": {"text_rows": TEXT_ROWS, "layout": "32 text rows, one vision item, 32 text rows",
                     "grids": {str(k): v for k, v in GRIDS.items() if k in sizes}, "sizes": sizes, "batches": batches},
        "timing": {"method": "CUDA events" if cuda else "host clock", "warmup": warmup, "repeats": repeats,
                   "statistic": "median"},
        "schedules": {k: {"layers": list(s.layers), "keep_ratios": list(s.keep_ratios), "min_keep": s.min_keep,
                          "metric": s.metric, "description": s.description} for k, s in schedules.items()},
    }

    def save() -> None:
        result["wall_s"] = time.perf_counter() - t_start
        result["vllm_imported"] = sys.modules.get("vllm") is not None
        out_json.write_text(json.dumps(result, indent=1, default=str) + "\n")

    t0 = time.perf_counter()
    dec = build_decoder(cfg, torch.device(device), dtype)
    _sync(device)
    result["model"]["build_s"] = time.perf_counter() - t0
    result["model"]["parameters"] = sum(p.numel() for p in dec.text_model.parameters()) + dec.lm_head.weight.numel()
    if cuda:
        result["model"]["weights_bytes_on_gpu"] = torch.cuda.memory_allocated()
    result["sdpa_probe"] = probe_sdpa(device, dtype, cfg)
    log(f"decoder built in {result['model']['build_s']:.1f} s, {result['model']['parameters'] / 1e9:.2f} B parameters; "
        f"sdpa {result['sdpa_probe']}")
    save()

    if "identity" not in args.skip:
        result["identity_check"] = run_identity_check(dec, cfg, sizes[0], max(batches), device, dtype)
        log(f"identity check (ratios 1.0): max |logit diff| {result['identity_check']['max_abs_logit_diff']}, "
            f"equal {result['identity_check']['equal']}")
        save()
    if "prefill" not in args.skip:
        floor = Workload(1, 1, cfg["hidden_size"], device, dtype)
        result["eager_floor"] = {
            "what": "one request of 65 rows (64 text + 1 vision row) through all layers without dropping: "
                    "the fixed cost of an eager prefill, set by the host launching its kernels",
            **time_ms(lambda: stock_prefill(dec, floor), device, warmup, repeats)}
        log(f"eager floor (65-row prefill): {result['eager_floor']['median_ms']:.2f} ms")
        del floor
        result["prefill"] = run_prefill_section(dec, cfg, sizes, batches, schedules, device, dtype, warmup, repeats, log)
        save()
        print(summary_table(result), flush=True)
    if "sync" not in args.skip:
        result["sync_check"] = run_sync_section(dec, cfg, sizes, batches, schedules, device, dtype)
        syncs = [v for per in result["sync_check"].values() for v in per.values()]
        log("sync check: " + ("not applicable on CPU" if not cuda else
                              ("no host sync in any prefill" if all(v.get("host_syncs") == 0 for v in syncs)
                               else "SYNCS FOUND: " + json.dumps(result["sync_check"])[:2000])))
        save()
    if "selection" not in args.skip:
        checks = [v for per in result.get("sync_check", {}).values() for v in per.values()]
        no_sync = all(v.get("host_syncs", 0) == 0 for v in checks)  # a graph cannot capture a sync
        result["selection"] = run_selection_section(dec, cfg, schedules["qwen2-vl"], sizes, items, device, dtype,
                                                    max(2, warmup), max(10, repeats * 2), log, use_graphs=no_sync)
        save()
        print(selection_table(result), flush=True)
    save()
    try:
        plot(result, out_png)
        log(f"wrote {out_json} and {out_png}")
    except ImportError as err:
        log(f"wrote {out_json}; no PNG here ({err}): run --plot-from {out_json.name} where matplotlib is")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
