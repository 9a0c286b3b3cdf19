"""Plain-transformers reference implementation of V2Drop (the parity oracle).

This module is deliberately independent of the engine code: it imports neither
``vllm`` nor ``vllm_v2drop.core`` (counts, scores, top-k). Every rule of
``V2DROP_SPEC.md`` is written out here directly, per request and per item, with
plain Python loops, favouring obviousness over speed.

How one request is run
----------------------
1. The model's own processor turns ``(prompt, images, videos)`` into tensors
   (the prompt must already hold the model's placeholders; the processor
   expands each placeholder into the run of vision rows).
2. The model's own multimodal ``forward`` computes the vision features and
   merges them into ``inputs_embeds`` (and, for Qwen2-VL / Qwen2.5-VL, the 3-D
   M-RoPE ``position_ids`` via its ``get_rope_index``). A forward pre-hook on
   the language model captures exactly what the model would feed its decoder
   stack and stops there, so the reference starts from what the model computes.
3. The decoder stack is then run layer by layer here, with the model's own
   modules (decoder layers, rotary embedding, final norm, ``lm_head``), an
   explicit causal mask over the rows still present, and an explicit per-layer
   KV cache whose layers can hold different numbers of rows. Just before each
   stage layer the vision rows are scored and the laziest are dropped.
4. Greedy decoding for exactly ``max_new_tokens`` tokens (no EOS stop). Layer
   ``l`` attends to its own kept prompt rows plus every generated token.
   Generated tokens get the positions they would have had without dropping:
   ``T + t`` for LLaVA models, ``T + t + rope_delta`` on all three M-RoPE axes
   for Qwen models (``T`` = prompt length, ``t`` = 0-based index of the
   generated token, ``rope_delta`` = the model's own ``rope_deltas``).

Vision items
------------
A vision item is one image or one video: its rows are found as maximal
contiguous runs of the image-token id, or of the video-token id, in the
processed ``input_ids`` (an image run directly followed by a video run are two
runs). Two items of the same kind placed next to each other with no separating
token form ONE run (LLaVA-OneVision's chat template writes ``<image><image>``
for two images of one message); such a run is split back into items with each
item's own row count, obtained by running the processor on that item alone with
a bare placeholder. So items are exactly vLLM's per-item placeholder ranges.
Media are consumed in prompt order per kind (the i-th image run(s) belong to
the i-th image). The request's last prompt row is never a candidate: if the
prompt ends inside an item, that row is not part of it (``n0`` = rows - 1).

Per architecture (transformers 5.x processors):
- LLaVA-1.5: ``<image>`` expands to ``(image_size/patch)^2`` image-token rows.
- LLaVA-OneVision: an image run is ``<image>`` repeated over the base features,
  the any-res tiles AND the ``image_newline`` rows (the newline embeddings sit
  on image-token rows, so they are part of the item and are candidates). A
  video run is ``frames * pooled_rows`` video-token rows plus ONE trailing
  newline row, also a video-token row, all one item.
- Qwen2-VL / Qwen2.5-VL: ``<|vision_start|>`` + run of ``<|image_pad|>`` (or
  ``<|video_pad|>``, all frames of a video in one run) + ``<|vision_end|>``;
  start/end are text rows, never dropped.
- LLaVA-NeXT: like LLaVA-OneVision's images (base features, any-res tiles and
  ``image_newline`` rows all on image-token rows).
- Qwen3-VL (dense and MoE): images as Qwen2-VL. A video is, per temporal patch,
  the timestamp text ``<t seconds>`` + ``<|vision_start|>`` + a run of
  ``<|video_pad|>`` + ``<|vision_end|>``: one item spans several runs, and only
  its ``<|video_pad|>`` rows are candidates (vLLM's ``is_embed`` rows). DeepStack:
  the model adds visual features to the hidden states of the vision rows after
  each of the first decoder layers; here they are added to the rows still present.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "METRICS",
    "RefRequest",
    "RefResult",
    "RefSchedule",
    "V2DropReference",
    "find_vision_runs",
    "keep_count",
    "random_score",
]

METRICS = ("l2", "l1", "cosine", "random", "none")


# --------------------------------------------------------------------------- API types


@dataclass
class RefSchedule:
    layers: list[int]
    keep_ratios: list[float]
    min_keep: int = 1
    metric: str = "l2"
    seed: int = 0

    def validate(self, num_layers: int) -> None:
        if len(self.layers) != len(self.keep_ratios):
            raise ValueError("layers and keep_ratios must have the same length")
        bounds = [0, *self.layers, num_layers]
        if any(a >= b for a, b in zip(bounds, bounds[1:])):
            raise ValueError(f"schedule layers must satisfy 1 <= l_1 < l_2 < ... < {num_layers}: {self.layers}")
        for r in self.keep_ratios:
            if not (0.0 <= r <= 1.0):
                raise ValueError(f"keep ratios must be in [0, 1]: {self.keep_ratios}")
        if self.min_keep < 0:
            raise ValueError("min_keep must be >= 0")
        if self.metric not in METRICS:
            raise ValueError(f"unknown metric {self.metric!r}; expected one of {METRICS}")


@dataclass
class RefRequest:
    prompt: str
    images: list[Any] = field(default_factory=list)  # PIL images
    videos: list[np.ndarray] = field(default_factory=list)  # (frames, H, W, 3) uint8
    # Per video, transformers' VideoMetadata fields (fps, duration, total_num_frames,
    # frames_indices) for unsampled frames; Qwen2.5-VL's temporal positions depend on fps.
    video_metadata: list[dict] | None = None


@dataclass
class RefResult:
    prompt_token_ids: list[int]
    items: list[tuple[int, int]]  # per vision item: (first prompt position, n0)
    kept: list[list[list[int]]]  # kept[item][stage - 1]: sorted original positions kept at stage s
    kv_lengths: list[int]  # per decoder layer: prompt rows held in that layer's KV cache
    token_ids: list[int]  # greedy generated tokens


# --------------------------------------------------------------------------- spec pieces


def keep_count(n: int, ratio: float, min_keep: int) -> int:
    """``k_s = min(n_{s-1}, max(min_keep, floor(ratio_s * n_{s-1} + 1e-9)))``."""
    return min(n, max(min_keep, math.floor(ratio * n + 1e-9)))


def random_score(seed: int, stage: int, token_index: int) -> float:
    """Seeded hash score of the ``random`` baseline (stage is 1-based, token_index original)."""
    x = (seed * 0x9E3779B1 + stage * 0x85EBCA77 + token_index * 0xC2B2AE3D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x2C1B3C6D) & 0xFFFFFFFF
    x ^= x >> 12
    x = (x * 0x297A2D39) & 0xFFFFFFFF
    x ^= x >> 15
    h = x & 0xFFFFFF
    return h / 2**24


def find_vision_runs(input_ids: list[int], vision_token_ids: list[int]) -> list[tuple[int, int]]:
    """Maximal runs of one vision-token id: ``[(start, length), ...]`` in prompt order."""
    runs: list[tuple[int, int]] = []
    i, n = 0, len(input_ids)
    while i < n:
        tok = input_ids[i]
        if tok in vision_token_ids:
            j = i
            while j < n and input_ids[j] == tok:
                j += 1
            runs.append((i, j - i))
            i = j
        else:
            i += 1
    return runs


def _scores(
    metric: str, cur: torch.Tensor, prev: torch.Tensor, positions: list[int], stage: int, seed: int
) -> list[float]:
    """Scores of candidate rows (larger = more worth keeping). ``cur`` = x[layer_s], ``prev`` = x[layer_s - 1]."""
    if metric == "random":
        return [random_score(seed, stage, p) for p in positions]
    a = cur.float()
    b = prev.float()
    if metric == "l2":
        s = torch.linalg.vector_norm(a - b, ord=2, dim=-1)
    elif metric == "l1":
        s = (a - b).abs().sum(dim=-1)
    elif metric == "cosine":
        # keep the LOWEST cosine similarity -> score is its negation
        s = -torch.nn.functional.cosine_similarity(a, b, dim=-1)
    else:  # pragma: no cover
        raise ValueError(metric)
    return s.tolist()


def _top_k(positions: list[int], scores: list[float], k: int) -> list[int]:
    """The ``k`` positions with the largest score, ties to the lower original index, returned sorted."""
    order = sorted(range(len(positions)), key=lambda i: (-scores[i], positions[i]))
    return sorted(positions[i] for i in order[:k])


class _Captured(Exception):
    pass


class _PerLayerKV:
    """Minimal KV cache: one (key, value) pair per layer, each layer with its own length.

    Decoder attention modules only call ``update(key, value, layer_idx)``.
    """

    def __init__(self, num_layers: int):
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if self.keys[layer_idx] is None:
            self.keys[layer_idx] = key_states
            self.values[layer_idx] = value_states
        else:
            self.keys[layer_idx] = torch.cat([self.keys[layer_idx], key_states], dim=-2)
            self.values[layer_idx] = torch.cat([self.values[layer_idx], value_states], dim=-2)
        return self.keys[layer_idx], self.values[layer_idx]

    def length(self, layer_idx: int) -> int:
        k = self.keys[layer_idx]
        return 0 if k is None else int(k.shape[-2])


# --------------------------------------------------------------------------- the reference


class V2DropReference:
    """Greedy generation with V2Drop applied, using only transformers and the model's own modules."""

    def __init__(self, model_dir, dtype=torch.float32, device="cpu"):
        from transformers import AutoConfig, AutoProcessor
        import transformers

        classes = {
            name: getattr(transformers, name)
            for name in (
                "LlavaForConditionalGeneration",
                "LlavaNextForConditionalGeneration",
                "LlavaOnevisionForConditionalGeneration",
                "Qwen2VLForConditionalGeneration",
                "Qwen2_5_VLForConditionalGeneration",
                "Qwen3VLForConditionalGeneration",
                "Qwen3VLMoeForConditionalGeneration",
            )
        }
        self.model_dir = Path(model_dir)
        config = AutoConfig.from_pretrained(self.model_dir)
        arch = (config.architectures or [None])[0]
        if arch not in classes:
            raise ValueError(f"unsupported architecture {arch!r}; supported: {sorted(classes)}")
        self.arch = arch
        self.is_qwen = arch.startswith("Qwen")
        # Qwen3-VL: a video's rows are one run per temporal patch, with timestamp text between
        self.items_span_runs = arch.startswith("Qwen3")
        self.device = torch.device(device)
        self.dtype = dtype
        self.processor = AutoProcessor.from_pretrained(self.model_dir)
        self.model = classes[arch].from_pretrained(self.model_dir, dtype=dtype, attn_implementation="eager")
        self.model.to(self.device).eval()

        cfg = self.model.config
        self.image_token_id = getattr(cfg, "image_token_id", None)
        if self.image_token_id is None:
            self.image_token_id = getattr(cfg, "image_token_index", None)
        self.video_token_id = getattr(cfg, "video_token_id", None)
        if self.video_token_id is None:
            self.video_token_id = getattr(cfg, "video_token_index", None)
        self.vision_token_ids = [t for t in (self.image_token_id, self.video_token_id) if t is not None]

        self.lm = self.model.model.language_model  # LlamaModel / Qwen2Model-like decoder stack
        self.layers = list(self.lm.layers)
        self.num_layers = len(self.layers)

    # ------------------------------------------------------------------ inputs

    def _process(self, req: RefRequest) -> dict:
        kwargs: dict[str, Any] = {"text": [req.prompt], "return_tensors": "pt"}
        if req.images:
            kwargs["images"] = list(req.images)
        if req.videos:
            kwargs["videos"] = list(req.videos)
            kwargs.update(self._video_kwargs(req.video_metadata))
        return dict(self.processor(**kwargs))

    @staticmethod
    def _video_kwargs(metadata: list[dict] | None) -> dict[str, Any]:
        return {} if metadata is None else {"video_metadata": list(metadata), "do_sample_frames": False}

    def _rows_of_one(self, kind: str, media) -> int:
        """Rows the processor gives ONE image / video on its own (bare placeholder)."""
        if kind == "image":
            out = self.processor(text=[self.processor.image_token], images=[media], return_tensors="pt")
            tok = self.image_token_id
        else:
            media, meta = media
            out = self.processor(text=[self.processor.video_token], videos=[media], return_tensors="pt",
                                 **self._video_kwargs(None if meta is None else [meta]))
            tok = self.video_token_id
        return int((out["input_ids"][0] == tok).sum())

    def _items(self, ids: list[int], req: RefRequest) -> list[list[int]]:
        """Per vision item, in prompt order: the prompt positions of its vision rows."""
        queues = {
            self.image_token_id: [self._rows_of_one("image", m) for m in req.images],
            self.video_token_id: [
                self._rows_of_one("video", (m, None if req.video_metadata is None else req.video_metadata[i]))
                for i, m in enumerate(req.videos)
            ],
        }
        items: list[list[int]] = []
        open_kind, need = None, 0  # an item that continues in the next run (Qwen3-VL video)
        for start, length in find_vision_runs(ids, self.vision_token_ids):
            kind = ids[start]
            if need and kind != open_kind:
                raise ValueError(f"vision run at {start} interrupts an unfinished item")
            queue = queues[kind]
            pos, end = start, start + length
            while pos < end:  # a run may hold several adjacent items of the same kind
                if not need:
                    if not queue:
                        raise ValueError(f"vision run at {start} (length {length}) has more rows than its media")
                    need, open_kind = queue.pop(0), kind
                    items.append([])
                take = min(need, end - pos)
                if take < need and not self.items_span_runs:
                    raise ValueError(f"vision run at {start} (length {length}) does not split into whole items")
                items[-1].extend(range(pos, pos + take))
                pos, need = pos + take, need - take
        if need or any(queues.values()):
            raise ValueError("the prompt has fewer placeholders than images/videos")
        return items

    @torch.no_grad()
    def _embed(self, inputs: dict) -> tuple[torch.Tensor, torch.Tensor, int, list[torch.Tensor]]:
        """Run the model's own multimodal forward up to its language model.

        Returns (inputs_embeds (T, H), position_ids ((1, T) or (3, 1, T)), rope_delta,
        per DeepStack layer ``l`` the (T, H) rows added after layer ``l`` (Qwen3-VL; else none)).
        """
        captured: dict[str, Any] = {}

        def hook(module, args, kwargs):
            captured.update(kwargs)
            raise _Captured

        inputs = {k: (v.to(self.device) if torch.is_tensor(v) else v) for k, v in inputs.items()}
        for k in ("pixel_values", "pixel_values_videos"):
            if k in inputs and inputs[k].is_floating_point():
                inputs[k] = inputs[k].to(self.dtype)
        if self.is_qwen:
            self.model.model.rope_deltas = None
        handle = self.lm.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            self.model(**inputs, use_cache=False)
        except _Captured:
            pass
        finally:
            handle.remove()
        embeds = captured["inputs_embeds"][0]
        T = embeds.shape[0]
        adds = []
        mask = captured.get("visual_pos_masks")
        for feats in captured.get("deepstack_visual_embeds") or ():
            add = embeds.new_zeros(embeds.shape)
            add[mask.reshape(-1)] = feats.to(embeds.dtype)
            adds.append(add)
        pos = captured.get("position_ids")
        delta = 0
        if self.is_qwen:
            if pos is None:  # text-only prompt: plain 1-D positions on all three axes
                pos = torch.arange(T, device=self.device).view(1, 1, -1).expand(3, 1, -1)
            else:
                rope_deltas = self.model.model.rope_deltas
                delta = int(rope_deltas.view(-1)[0]) if rope_deltas is not None else 0
                assert delta == int(pos.max()) + 1 - T, "rope delta disagrees with position ids"
            pos = pos.reshape(3, 1, T)
        else:
            if pos is None:
                pos = torch.arange(T, device=self.device).view(1, -1)
            pos = pos.reshape(1, T)
        return embeds, pos, delta, adds

    # ------------------------------------------------------------------ decoder

    def _layer(self, idx: int, x: torch.Tensor, pos: torch.Tensor, cache: _PerLayerKV, causal: bool) -> torch.Tensor:
        """Run decoder layer ``idx`` on rows ``x`` (n, H) with position ids ``pos``."""
        h = x.unsqueeze(0)
        cos_sin = self.lm.rotary_emb(h, pos)
        n = x.shape[0]
        past = cache.length(idx)
        mask = None
        if causal and n > 1:
            # query i (new row past+i) sees every cached row and new rows 0..i
            m = torch.full((n, past + n), torch.finfo(h.dtype).min, dtype=h.dtype, device=h.device)
            allowed = torch.ones(n, past + n, dtype=torch.bool, device=h.device).tril(diagonal=past)
            m = m.masked_fill(allowed, 0.0)
            mask = m.view(1, 1, n, past + n)
        out = self.layers[idx](
            h,
            attention_mask=mask,
            position_embeddings=cos_sin,
            position_ids=None,
            past_key_values=cache,
            use_cache=True,
        )
        if isinstance(out, tuple):
            out = out[0]
        return out[0]

    def _logits(self, x_last: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(self.lm.norm(x_last.view(1, 1, -1)))[0, -1]

    @torch.no_grad()
    def _run_one(self, req: RefRequest, schedule: RefSchedule | None, max_new_tokens: int) -> RefResult:
        inputs = self._process(req)
        ids = inputs["input_ids"][0].tolist()
        T = len(ids)
        # the last prompt row is never a candidate
        spans = self._items(ids, req)
        item_rows = [[p for p in rows if p != T - 1] for rows in spans]
        items = [(span[0], len(rows)) for span, rows in zip(spans, item_rows)]

        embeds, pos, delta, deepstack = self._embed(inputs)
        assert embeds.shape[0] == T

        stages: dict[int, tuple[int, float]] = {}
        if schedule is not None:
            schedule.validate(self.num_layers)
        if schedule is not None and schedule.metric != "none":
            for s, (layer, ratio) in enumerate(zip(schedule.layers, schedule.keep_ratios), start=1):
                stages[layer] = (s, ratio)
        n_stages = len(schedule.layers) if schedule is not None else 0

        # per item: currently kept candidate positions, and the record of each stage
        current = [list(rows) for rows in item_rows]
        kept: list[list[list[int]]] = [[] for _ in items]

        present = list(range(T))  # original positions of the rows present at the current layer
        x = embeds  # x[l] over the present rows
        x_prev: torch.Tensor | None = None  # x[l-1] over the same rows
        cache = _PerLayerKV(self.num_layers)
        kv_lengths: list[int] = []

        for layer in range(self.num_layers):
            if layer in stages:
                s, ratio = stages[layer]
                row_of = {p: i for i, p in enumerate(present)}
                drop: set[int] = set()
                for it, cand in enumerate(current):
                    k = keep_count(len(cand), ratio, schedule.min_keep)
                    rows = torch.tensor([row_of[p] for p in cand], dtype=torch.long, device=x.device)
                    sc = _scores(schedule.metric, x[rows], x_prev[rows], cand, s, schedule.seed) if cand else []
                    keep = _top_k(cand, sc, k)
                    drop.update(set(cand) - set(keep))
                    current[it] = keep
                    kept[it].append(list(keep))
                if drop:
                    sel = [i for i, p in enumerate(present) if p not in drop]
                    present = [present[i] for i in sel]
                    x = x[torch.tensor(sel, dtype=torch.long, device=x.device)]
            rows_t = torch.tensor(present, dtype=torch.long, device=x.device)
            x_prev = x
            x = self._layer(layer, x, pos[..., rows_t], cache, causal=True)
            if layer < len(deepstack):  # DeepStack: the rows still present get their features
                x = x + deepstack[layer][rows_t]
            kv_lengths.append(len(present))
            assert cache.length(layer) == len(present)

        if schedule is None or schedule.metric == "none":
            kept = [[list(c) for _ in range(n_stages)] for c in current]

        # the last prompt row is always present: it gives the first generated token
        assert present[-1] == T - 1
        tokens: list[int] = []
        logits = self._logits(x[-1])
        for t in range(max_new_tokens):
            tok = int(torch.argmax(logits))
            tokens.append(tok)
            if t == max_new_tokens - 1:
                break
            h = self.model.get_input_embeddings()(torch.tensor([tok], device=self.device))
            p = T + t + delta  # the position it would have had without dropping
            gpos = torch.full((3, 1, 1) if self.is_qwen else (1, 1), p, dtype=torch.long, device=self.device)
            for layer in range(self.num_layers):
                h = self._layer(layer, h, gpos, cache, causal=False)
            logits = self._logits(h[-1])

        return RefResult(
            prompt_token_ids=ids,
            items=items,
            kept=kept,
            kv_lengths=kv_lengths,
            token_ids=tokens,
        )

    # ------------------------------------------------------------------ public

    def generate(
        self,
        requests: list[RefRequest],
        schedule: RefSchedule | None,
        max_new_tokens: int = 16,
    ) -> list[RefResult]:
        """Each request is handled on its own (no padding, no interaction between requests)."""
        return [self._run_one(req, schedule, max_new_tokens) for req in requests]

