"""The drop loop under vLLM's in-place fused add + RMSNorm (its CUDA kernel), without a GPU.

On CUDA, vLLM's ``fused_add_rms_norm`` (the ``vllm_c`` kernel, used in eager mode) writes the sum
into the residual and the normalised rows into the input, in place; on CPU the same op is out of
place. A decoder layer that gets ``residual=None`` (the first layer) makes its input the residual,
so the kernel overwrites the layer's input. The drop loop must not hold on to any tensor a layer
may write: the score of a stage at layer 1 compares the stream after layer 0 with the input of
layer 0.

A toy decoder with the residual handling of vLLM's Llama / Qwen2 decoder layers runs the same step
with both norm flavours: the kept rows and the output must not depend on the flavour.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from test_pipeline_split import batch  # an image request, a text-only one, a two-image one
from vllm_v2drop.config import V2DropConfig
from vllm_v2drop.worker.runtime import V2DropRuntime

DEPTH, HIDDEN, PAD, EPS = 8, 16, 3, 1e-6


def _rms(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * weight


class Norm(torch.nn.Module):
    """vLLM's ``RMSNorm``: ``norm(x)``, or ``norm(x, residual) -> (norm(x + residual), x + residual)``.

    ``inplace`` behaves as vLLM's CUDA kernel: the sum goes into ``residual`` and the normalised
    rows into ``x``, and both are returned."""

    def __init__(self, seed: int, inplace: bool):
        super().__init__()
        self.weight = 1 + 0.1 * torch.randn(HIDDEN, generator=torch.Generator().manual_seed(seed))
        self.inplace = inplace

    def forward(self, x, residual=None):
        if residual is None:
            return _rms(x, self.weight)
        if self.inplace:
            residual.add_(x)
            x.copy_(_rms(residual, self.weight))
            return x, residual
        s = x + residual
        return _rms(s, self.weight), s


class DecoderLayer(torch.nn.Module):
    """The residual handling of vLLM's ``Qwen2DecoderLayer`` / ``LlamaDecoderLayer``; a causal
    running mean stands in for attention, so every row depends on the rows before it."""

    def __init__(self, seed: int, inplace: bool):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w_attn = torch.randn(HIDDEN, HIDDEN, generator=g) * 0.5
        self.w_mlp = torch.randn(HIDDEN, HIDDEN, generator=g) * 0.5
        self.input_layernorm = Norm(2 * seed, inplace)
        self.post_attention_layernorm = Norm(2 * seed + 1, inplace)

    def forward(self, positions, hidden_states, residual):
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        mixed = torch.cumsum(hidden_states, 0) / torch.arange(1, hidden_states.shape[0] + 1)[:, None]
        hidden_states = torch.tanh(mixed @ self.w_attn) + 0.01 * positions[:, None].float()
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return torch.tanh(hidden_states @ self.w_mlp), residual


class Decoder(torch.nn.Module):
    def __init__(self, inplace: bool):
        super().__init__()
        self.layers = torch.nn.ModuleList(DecoderLayer(i, inplace) for i in range(DEPTH))
        self.start_layer, self.end_layer = 0, DEPTH
        self.norm = Norm(99, inplace)


def _run(layers, metric: str, inplace: bool):
    """The step's output, each stage's kept (segment, token_index) rows, and the embeddings after."""
    config = {"layers": list(layers), "keep_ratios": [0.5, 0.5, 0.25][: len(layers)], "metric": metric,
              "trace": "unused"}
    sched = V2DropConfig.from_additional_config({"v2drop": config}).resolve(DEPTH, "Qwen2VLForConditionalGeneration")
    rows = 30 + 7 + 40
    embeds = torch.randn(rows + PAD, HIDDEN, generator=torch.Generator().manual_seed(0))
    positions = torch.cat([torch.arange(30), torch.arange(7), torch.arange(40), torch.zeros(PAD, dtype=torch.long)])
    view = batch()
    rt = V2DropRuntime(sched, [f"layer{i}" for i in range(DEPTH)])
    with rt.active(rt.plan_step(view), view, torch.device("cpu")):
        drop = rt.current(rows + PAD)
        assert drop is not None
        out = rt.forward(Decoder(inplace), drop, None, positions, embeds)
        kept = [(layer, seg.tolist(), tok.tolist()) for layer, (seg, tok) in zip(drop.kept_layers, drop.kept_log)]
        rt.schedule = dataclasses.replace(sched, trace=None)  # no trace files on exit
    return out, kept


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("layers", [(1, 4, 6), (1, 2), (2, 5)], ids=lambda s: "layers" + "-".join(map(str, s)))
def test_inplace_norm_keeps_the_same_rows(layers, metric):
    out, kept = _run(layers, metric, inplace=False)
    out_inplace, kept_inplace = _run(layers, metric, inplace=True)
    assert [k[0] for k in kept] == list(layers)
    for (layer, seg, tok), (_, seg_i, tok_i) in zip(kept, kept_inplace):
        assert (seg_i, tok_i) == (seg, tok), f"stage at layer {layer} kept other rows with the in-place norm"
    assert torch.allclose(out_inplace, out, atol=1e-6)


def test_no_layer_input_is_held_as_a_score_input():
    """What the drop loop keeps for a stage's score is never a tensor a layer received."""
    sched = V2DropConfig.from_additional_config(
        {"v2drop": {"layers": [1, 4], "keep_ratios": [0.5, 0.5], "trace": "unused"}}
    ).resolve(DEPTH, "Qwen2VLForConditionalGeneration")
    seen: list[torch.Tensor] = []
    model = Decoder(inplace=False)
    for layer in model.layers:
        layer.register_forward_pre_hook(lambda _m, args: seen.extend(a for a in args[1:] if a is not None))
    held: list[torch.Tensor] = []
    import vllm_v2drop.worker.runtime as runtime

    original = runtime.stage_scores

    def recording(metric, x_cur, x_prev, **kw):
        held.extend([x_cur, x_prev])
        return original(metric, x_cur, x_prev, **kw)

    view = batch()
    rt = V2DropRuntime(sched, [f"layer{i}" for i in range(DEPTH)])
    embeds = torch.randn(77 + PAD, HIDDEN)
    mp = pytest.MonkeyPatch()
    mp.setattr(runtime, "stage_scores", recording)
    try:
        with rt.active(rt.plan_step(view), view, torch.device("cpu")):
            rt.forward(model, rt.current(77 + PAD), None, torch.zeros(77 + PAD, dtype=torch.long), embeds)
            rt.schedule = dataclasses.replace(sched, trace=None)
    finally:
        mp.undo()
    assert len(held) == 4
    storages = {t.untyped_storage().data_ptr() for t in seen}
    shared = [i for i, t in enumerate(held) if t.untyped_storage().data_ptr() in storages]
    assert not shared, f"score inputs {shared} (x_cur, x_prev per stage) share memory with a layer's input"
