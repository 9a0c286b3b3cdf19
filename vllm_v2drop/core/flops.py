"""FLOP model of the language model's prefill, with and without V2Drop.

The ideal prefill speed-up of a V2Drop schedule on a workload: the FLOPs stock vLLM spends in
the decoder layers during prefill, divided by the FLOPs with V2Drop's rows per layer.

Per decoder layer with ``t`` rows (prompt tokens present in that layer):

* linear layers (q, k, v, o projections and the gated MLP): ``2 * t * P`` with
  ``P = h * (nh*hd) + 2 * h * (nkv*hd) + (nh*hd) * h + 3 * h * I`` weights;
* attention (scores and weighted sum, causal): ``2 * 2 * nh * hd * t * (t + 1) / 2``
  (row ``i`` attends to the ``i + 1`` rows present before it, in that layer's compacted KV).

Stock vLLM has ``t = prompt_tokens`` in every layer. With V2Drop, layer ``l`` holds the text
rows plus the vision rows present there: :func:`vllm_v2drop.core.counts.rows_per_layer` per vision
item. What this leaves out, on purpose: the vision tower and projector (same work in both),
the LM head (one row per request in prefill), norms / RoPE / activations (a few FLOPs per
element), and V2Drop's own scoring and top-k (``O(rows * h)`` per stage).

Pure (no vLLM, no torch): ``benchmarks/flops.py`` (its command line), the benchmarks and
``vllm-v2drop agreement`` (the prefill FLOP saving of each budget) use it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from vllm_v2drop.core.counts import rows_per_layer

__all__ = ["LMShape", "Request", "ideal_speedup", "lm_shape", "prefill_flops", "prefill_flops_of_rows",
           "rows_in_layers", "workload_flops"]


@dataclass(frozen=True)
class LMShape:
    """The decoder dimensions the FLOP model needs (from the model's ``config.json``)."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def linear_weights_per_layer(self) -> int:
        h, q, kv = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return h * q + 2 * h * kv + q * h + 3 * h * self.intermediate_size

    def layer_flops(self, rows: int) -> float:
        """Prefill FLOPs of one decoder layer over ``rows`` rows (causal attention among them)."""
        linear = 2.0 * rows * self.linear_weights_per_layer
        attention = 4.0 * self.num_heads * self.head_dim * rows * (rows + 1) / 2
        return linear + attention


def _text_config(cfg: Mapping) -> Mapping:
    return cfg.get("text_config") or cfg


def lm_shape(model: str | Path | Mapping) -> LMShape:
    """The language model's shape from a model directory (``config.json``) or a config dict."""
    cfg = model if isinstance(model, Mapping) else json.loads((Path(model) / "config.json").read_text())
    t = _text_config(cfg)
    heads = int(t["num_attention_heads"])
    return LMShape(
        hidden_size=int(t["hidden_size"]),
        intermediate_size=int(t["intermediate_size"]),
        num_layers=int(t["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(t.get("num_key_value_heads") or heads),
        head_dim=int(t.get("head_dim") or int(t["hidden_size"]) // heads),
    )


@dataclass(frozen=True)
class Request:
    """One prefill: its prompt length and the candidate vision rows of each of its vision items."""

    prompt_tokens: int
    items: tuple[int, ...] = ()

    @property
    def text_rows(self) -> int:
        return self.prompt_tokens - sum(self.items)


def rows_in_layers(req: Request, layers: Sequence[int], keep_ratios: Sequence[float], num_layers: int,
                   min_keep: int = 1) -> list[int]:
    """Prompt rows present in each decoder layer: the text rows plus every item's rows per the plan."""
    vision = [0] * num_layers
    if layers:
        for n0 in req.items:
            for layer, r in enumerate(rows_per_layer(n0, layers, keep_ratios, num_layers, min_keep)):
                vision[layer] += r
    else:
        vision = [sum(req.items)] * num_layers
    return [req.text_rows + v for v in vision]


def prefill_flops(shape: LMShape, req: Request, schedule=None) -> float:
    """Decoder-layer FLOPs of ``req``'s prefill: stock (``schedule=None``) or with V2Drop's schedule."""
    if schedule is None or not schedule.layers:
        return shape.num_layers * shape.layer_flops(req.prompt_tokens)
    rows = rows_in_layers(req, schedule.layers, schedule.keep_ratios, shape.num_layers, schedule.min_keep)
    return sum(shape.layer_flops(t) for t in rows)


def workload_flops(shape: LMShape, requests: Iterable[Request], schedule=None) -> float:
    return sum(prefill_flops(shape, r, schedule) for r in requests)


def ideal_speedup(shape: LMShape, requests: Sequence[Request], schedule) -> dict:
    """Stock / V2Drop prefill FLOPs of a workload, plus the per-layer row counts of its first request."""
    stock = workload_flops(shape, requests)
    v2 = workload_flops(shape, requests, schedule)
    first = requests[0] if requests else Request(0)
    return {
        "stock_gflop": stock / 1e9,
        "v2drop_gflop": v2 / 1e9,
        "ideal_prefill_speedup": stock / v2 if v2 else float("nan"),
        "flop_ratio": v2 / stock if stock else float("nan"),
        "rows_per_layer_first_request": rows_in_layers(first, schedule.layers, schedule.keep_ratios,
                                                       shape.num_layers, schedule.min_keep),
    }


def prefill_flops_of_rows(shape: LMShape, prompt_tokens: int, vision_rows: int,
                          vision_rows_per_layer: Sequence[int] | None = None) -> float:
    """Decoder-layer FLOPs of a prefill of ``prompt_tokens`` tokens, ``vision_rows`` of them vision
    rows, with ``vision_rows_per_layer`` of those present in each layer (None: stock, all of them)."""
    if vision_rows_per_layer is None:
        return shape.num_layers * shape.layer_flops(prompt_tokens)
    text = prompt_tokens - vision_rows
    return sum(shape.layer_flops(text + int(v)) for v in vision_rows_per_layer)
