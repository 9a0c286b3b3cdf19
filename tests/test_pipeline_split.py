"""Pipeline parallelism without an engine: the drop loop split over ranks equals it in one piece.

A toy decoder (per-row layers plus a causal running mean, so a wrong or misplaced row changes
every later row; positions added in) stands in for vLLM's. Each "rank" holds a slice of its
layers and its own ``V2DropRuntime`` planning the same step; a rank's ``IntermediateTensors``
are handed to the next as vLLM's point-to-point send would. Stages sit at, just after and away
from the rank boundaries, with CUDA-graph-style padding rows.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from vllm_v2drop.config import V2DropConfig
from vllm_v2drop.worker.runtime import ROWS_KEY, BatchView, RequestView, V2DropRuntime, VisionItem

DEPTH, HIDDEN, PAD = 8, 16, 3


class ToyLayer(torch.nn.Module):
    def __init__(self, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = torch.randn(HIDDEN, HIDDEN, generator=g) * 0.4

    def forward(self, positions, hidden, residual):
        x = hidden if residual is None else hidden + residual
        mean = torch.cumsum(x, 0) / torch.arange(1, x.shape[0] + 1)[:, None]  # rows see earlier rows
        return torch.tanh(x @ self.w) + 0.5 * mean + 0.01 * positions[:, None].float(), x


class ToyDecoder(torch.nn.Module):
    def __init__(self, layers, start: int, end: int):
        super().__init__()
        self.layers, self.start_layer, self.end_layer = layers, start, end

    def norm(self, hidden, residual):
        return hidden + residual, None


def schedule(layers):
    config = {"layers": list(layers), "keep_ratios": [0.5, 0.5, 0.25][: len(layers)], "trace": "unused"}
    return V2DropConfig.from_additional_config({"v2drop": config}).resolve(DEPTH, "Qwen2VLForConditionalGeneration")


def batch() -> BatchView:
    """An image request, a text-only one, a two-image one; whole prompts in one step."""
    views = {
        "a": RequestView("a", 30, [VisionItem("image", np.arange(3, 23))], False),
        "t": RequestView("t", 7, [], False),
        "b": RequestView("b", 40, [VisionItem("image", np.arange(2, 14)), VisionItem("image", np.arange(18, 36))],
                         False),
    }
    lens = np.asarray([v.num_prompt_tokens for v in views.values()])
    return BatchView(list(views), np.zeros(3, np.int64), lens, views.__getitem__)


def run(sched, splits, embeds, positions, layers):
    """Run the step over ranks holding layers ``[splits[i], splits[i+1])``; the last rank's output,
    and every stage's kept (segment, token_index) rows with its layer, in rank order."""
    view, out, kept = batch(), None, []
    for start, end in zip(splits, splits[1:]):
        rt = V2DropRuntime(sched, [f"layer{i}" for i in range(start, end)], first_layer=start)
        with rt.active(rt.plan_step(view), view, torch.device("cpu")):
            drop = rt.current(embeds.shape[0])
            assert drop is not None
            out = rt.forward(ToyDecoder(layers, start, end), drop, None, positions,
                             embeds if start == 0 else None, intermediate_tensors=out)
            kept += [(layer, seg.tolist(), tok.tolist()) for layer, (seg, tok) in zip(drop.kept_layers, drop.kept_log)]
            rt.schedule = dataclasses.replace(sched, trace=None)  # no trace files on exit
    return out, kept


@pytest.mark.parametrize("stages", [(1, 4, 6), (2, 3, 5), (4, 5)], ids=lambda s: "layers" + "-".join(map(str, s)))
@pytest.mark.parametrize("splits", [(0, 4, 8), (0, 5, 8), (0, 2, 6, 8), (0, 1, 4, 5, 6, 8)],
                         ids=lambda s: "ranks" + "-".join(map(str, s)))
def test_split_decoder_equals_whole(stages, splits):
    sched = schedule(stages)
    layers = torch.nn.ModuleList(ToyLayer(i) for i in range(DEPTH))
    rows = 30 + 7 + 40
    g = torch.Generator().manual_seed(0)
    embeds = torch.randn(rows + PAD, HIDDEN, generator=g)
    positions = torch.cat([torch.arange(30), torch.arange(7), torch.arange(40), torch.zeros(PAD, dtype=torch.long)])
    whole, whole_kept = run(sched, (0, DEPTH), embeds, positions, layers)
    split, split_kept = run(sched, splits, embeds, positions, layers)
    assert torch.equal(split, whole)
    assert split.shape == (rows + PAD, HIDDEN) and not split[rows:].any()
    assert split_kept == whole_kept and [k[0] for k in whole_kept] == list(stages)


def test_rank_hands_on_kept_rows_first():
    """What crosses a boundary: the step's full row count, the present rows first, then zeros."""
    sched = schedule((1, 4, 6))
    layers = torch.nn.ModuleList(ToyLayer(i) for i in range(DEPTH))
    view = batch()
    rt = V2DropRuntime(sched, [f"layer{i}" for i in range(4)])
    rt.schedule = dataclasses.replace(sched, trace=None)
    step = rt.plan_step(view)
    embeds = torch.randn(77 + PAD, HIDDEN)
    with rt.active(step, view, torch.device("cpu")):
        it = rt.forward(ToyDecoder(layers, 0, 4), rt.current(77 + PAD), None, torch.zeros(77 + PAD, dtype=torch.long),
                        embeds)
    n = step.num_rows(2)  # rank 0 cut stages 1 and 2 (layer 4 starts the next rank)
    assert n < step.num_rows(1) < 77
    assert {k: tuple(v.shape) for k, v in it.items()} == {
        "hidden_states": (77 + PAD, HIDDEN), "residual": (77 + PAD, HIDDEN), ROWS_KEY: (77 + PAD,)}
    rows = it[ROWS_KEY][:n]
    assert bool((rows[1:] > rows[:-1]).all()) and not it[ROWS_KEY][n:].any()
    assert not it["hidden_states"][n:].any() and it["hidden_states"][:n].abs().sum(-1).min() > 0


def test_compiled_segments_equal_the_eager_loop():
    """The drop loop's layers between drop points, compiled (traced by Dynamo; the Inductor backend
    on vLLM's own layers is the GPU smoke test's dry run, ``tests/test_gpu_run.py``), keep the same
    rows and give the eager loop's output, with per-row additions after layers (Qwen3-VL's
    DeepStack) and on a pipeline rank that ends at a drop layer."""
    backend = "eager"
    sched = dataclasses.replace(schedule((1, 4, 6)), trace=None)
    layers = torch.nn.ModuleList(ToyLayer(i) for i in range(DEPTH))
    rows = 77
    g = torch.Generator().manual_seed(1)
    embeds = torch.randn(rows + PAD, HIDDEN, generator=g)
    adds = {0: torch.randn(rows + PAD, HIDDEN, generator=g), 2: torch.randn(rows + PAD, HIDDEN, generator=g)}
    positions = torch.cat([torch.arange(30), torch.arange(7), torch.arange(40), torch.zeros(PAD, dtype=torch.long)])

    def forward(compile_backend, end):
        view = batch()
        rt = V2DropRuntime(sched, [f"layer{i}" for i in range(end)], compile_backend=compile_backend)
        rt.schedule = dataclasses.replace(sched, trace="unused")  # record the kept rows; off again before the step ends
        with rt.active(rt.plan_step(view), view, torch.device("cpu")):
            drop = rt.current(rows + PAD)
            out = rt.forward(ToyDecoder(layers, 0, end), drop, None, positions, embeds, adds_after=adds)
            kept = [(seg.tolist(), tok.tolist()) for seg, tok in drop.kept_log]
            rt.schedule = sched
        return out, kept, rt

    for end in (DEPTH, 4):  # the whole decoder; a first pipeline rank whose last layer precedes a drop
        eager, eager_kept, _ = forward(None, end)
        compiled, compiled_kept, rt = forward(backend, end)
        assert compiled_kept == eager_kept and len(eager_kept) == (3 if end == DEPTH else 2)
        if end == DEPTH:
            torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
        else:
            for k in ("hidden_states", "residual", ROWS_KEY):
                torch.testing.assert_close(compiled[k], eager[k], rtol=1e-5, atol=1e-5)
        # one graph per segment between drop points and additions: [0,1) [1,3) [3,4) [4,6) [6,8)
        assert sorted(k[1:3] for k in rt.segments._compiled) == (
            [(0, 1), (1, 3), (3, 4), (4, 6), (6, 8)] if end == DEPTH else [(0, 1), (1, 3), (3, 4)])
