"""FLOP model of the language model's prefill, with and without V2Drop (the model: ``vllm_v2drop/core/flops.py``).

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

    python benchmarks/flops.py --model build/demo-model --prompt-tokens 700 --items 664
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path

from vllm_v2drop.core.flops import (  # noqa: F401  (the model lives in the core; re-exported for the benchmarks)
    LMShape,
    Request,
    ideal_speedup,
    lm_shape,
    prefill_flops,
    rows_in_layers,
    workload_flops,
)

__all__ = ["LMShape", "Request", "ideal_speedup", "lm_shape", "prefill_flops", "schedule_for", "workload_flops"]


def schedule_for(model: str | Path | Mapping, v2drop_config: Mapping | None = None):
    """The :class:`~vllm_v2drop.config.ResolvedSchedule` V2Drop runs on ``model`` with ``v2drop_config``."""
    from vllm_v2drop.config import V2DropConfig

    cfg = model if isinstance(model, Mapping) else json.loads((Path(model) / "config.json").read_text())
    arch = (cfg.get("architectures") or ["?"])[0]
    return V2DropConfig.from_additional_config({"v2drop": dict(v2drop_config or {})}).resolve(
        lm_shape(cfg).num_layers, arch)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model directory (its config.json)")
    p.add_argument("--v2drop-config", default="{}", help="V2Drop settings (JSON), as in --additional-config")
    p.add_argument("--prompt-tokens", type=int, required=True)
    p.add_argument("--items", type=int, nargs="*", default=[], help="candidate vision rows per item")
    args = p.parse_args(argv)
    shape = lm_shape(args.model)
    sched = schedule_for(args.model, json.loads(args.v2drop_config))
    out = {"lm": asdict(shape), "schedule": sched.description,
           **ideal_speedup(shape, [Request(args.prompt_tokens, tuple(args.items))], sched)}
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
