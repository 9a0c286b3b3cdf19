"""The worker-side V2Drop runtime: plans each step, then runs the decoder with drops.

Runner-agnostic. The runner seam (``vllm_v2drop.seams.runner``) feeds it a
:class:`BatchView` of the step and installs the per-stage attention metadata it
asks for; the model's forward then calls :meth:`V2DropRuntime.forward` when the
step drops rows, and vLLM's own (compiled) language model otherwise.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from vllm_v2drop.config import ResolvedSchedule
from vllm_v2drop.seams.parallel import intermediate_tensors, logs_requests, same_on_every_rank  # noqa: F401
from vllm_v2drop.requests import (  # noqa: F401  (the worker's names for them)
    BatchView,
    RequestView,
    VisionItem,
    item_positions,
    plan_for,
    request_override,
    request_view,
)
from vllm_v2drop.core.batch_planner import BatchPlanner
from vllm_v2drop.core.counts import stage_of_layer
from vllm_v2drop.core.request_plan import RequestPlan
from vllm_v2drop.core.scorers import stage_scores
from vllm_v2drop.core.selection import kept_rows, segmented_topk_keep
from vllm_v2drop.core.step_plan import StepPlan
from vllm_v2drop.seams.staging import StepStaging, worst_case_bytes
from vllm_v2drop.worker.segments import Segments
from vllm_v2drop.worker.stash import ChunkStep, Stash

logger = logging.getLogger("vllm.v2drop")

#: The extra ``IntermediateTensors`` key that tells a pipeline rank which step rows it received.
ROWS_KEY = "v2drop_rows"


@dataclass
class DropStep:
    """Device-side inputs of a step that drops rows (sizes come from the host plan)."""

    plan: StepPlan
    segment: torch.Tensor
    token_index: torch.Tensor
    keep: list[torch.Tensor]  # per stage s>=1: rows to keep per segment
    sizes: list[torch.Tensor]  # per stage s>=1: rows per segment before the stage
    batch: BatchView | None = None
    kept_log: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    kept_layers: list[int] = field(default_factory=list)  # the stage layer of each kept_log entry
    rows_run: list[int] = field(default_factory=list)  # rows each stage this rank cut went on with
    chunk: ChunkStep | None = None  # rows to and from the stash at the first drop layer (chunked items)


class V2DropRuntime:
    """Owns the schedule, the per-request plans, and the decoder loop with drops."""

    def __init__(self, schedule: ResolvedSchedule, layer_names: Sequence[str], first_layer: int = 0,
                 compile_backend: str | None = None):
        """``layer_names``: the attention layers of decoder layers ``first_layer ..`` on this rank
        (a pipeline-parallel rank holds a slice of the decoder). ``compile_backend``: the
        ``torch.compile`` backend the drop loop's segments are compiled with (None: eagerly)."""
        self.schedule = schedule
        self.segments = Segments(compile_backend)
        self.layer_names = list(layer_names)
        stages = stage_of_layer(schedule.layers, max(schedule.num_layers, first_layer + len(layer_names)))
        self.stage_of_layer = stages[first_layer : first_layer + len(layer_names)]
        self.planner = BatchPlanner(len(schedule.layers), self._plan_of, chunked=schedule.chunked_items)
        self.stash = Stash()  # rows of unfinished vision items (chunked_items)
        self._describe: Callable[[str], RequestView] | None = None
        self._pending_trace: dict[str, dict[int, dict]] = {}
        self._seen_by_trace: set[str] = set()
        self._local = threading.local()
        self._staging: dict[torch.device, StepStaging] = {}  # for callers without the runner's (tests, benchmarks)
        self.profiled: list[int] | None = None  # rows per stage of the memory-profiling drop step, once run

    # ---- planning ------------------------------------------------------------------------------
    def stage_layer_names(self, stage: int) -> list[str]:
        return [n for n, s in zip(self.layer_names, self.stage_of_layer) if s == stage]

    def _plan_of(self, req_id: str) -> RequestPlan:
        return plan_for(self.schedule, self._describe(req_id))

    def plan_step(self, batch: BatchView) -> StepPlan | None:
        """The step's plan, or None when V2Drop changes nothing in it.

        Requests are planned once, when the planner first sees them in the batch; a step
        costs array work over the batch plus exact planning of the requests that compute
        vision rows in it (:class:`~vllm_v2drop.core.batch_planner.BatchPlanner`).
        """
        if not self.schedule.layers or not len(batch.req_ids):
            return None
        self._describe = batch.describe
        self.planner.sync(batch.req_ids)
        if self.schedule.trace:
            self._trace_cached(batch)
        step = self.planner.plan(batch.num_computed, batch.num_scheduled)
        if step is not None and step.has_candidates and logs_requests():
            self._log_requests(batch, step)
        return step

    # ---- the forward ---------------------------------------------------------------------------
    @contextmanager
    def active(self, step: StepPlan | None, batch: BatchView | None, device: torch.device,
               staging: StepStaging | None = None) -> Iterator[None]:
        """Make ``step`` the drop step seen by :meth:`current` during the model's forward.

        Its arrays reach ``device`` through ``staging``, the step's buffer the runner adapter has
        begun (:mod:`vllm_v2drop.seams.staging`); without one, through the runtime's own.
        """
        drop = None
        if step is not None and step.runs_drop_loop:
            if staging is None:
                staging = self._staging.get(device)
                if staging is None:
                    staging = self._staging[device] = StepStaging(device, worst_case_bytes(len(step.segment), 1, 1))
                staging.begin()
            counts_t = step.seg_counts.T  # [S+1, G]: one row per stage
            staged = [staging.put(step.segment), staging.put(step.token_index), staging.put(counts_t)]
            chunk = None
            if step.uses_stash:
                chunk = self.stash.begin(step, batch.req_ids)
                staged += [staging.put(step.stash_index), staging.put(step.merge),
                           staging.put(step.merged_segment), staging.put(step.merged_token_index)]
            staging.flush()
            segment, token_index, counts, *chunked = (staging.on_device(x) for x in staged)
            if chunk is not None:
                chunk.stash_index, chunk.merge, chunk.segment, chunk.token_index = chunked
            drop = DropStep(
                plan=step,
                segment=segment,
                token_index=token_index,
                keep=[counts[s] for s in range(1, counts.shape[0])],
                sizes=[counts[s - 1] for s in range(1, counts.shape[0])],
                batch=batch,
                chunk=chunk,
            )
        self._local.drop = drop
        try:
            yield
        finally:
            self._local.drop = None
        if drop is not None and self.schedule.trace:
            self._write_trace(drop)

    @contextmanager
    def profiling(self, num_tokens: int, device: torch.device) -> Iterator[None]:
        """Make the forward of vLLM's memory-profiling run a drop step of ``num_tokens`` rows.

        vLLM sizes the KV cache from the peak memory of a forward at ``max_num_batched_tokens``;
        its own runs the compiled model, never the eager drop loop, whose layers, scores and row
        gathers hold temporaries of their own. This step is the worst the engine can plan: every
        row a vision candidate of one item, and every stage keeping all its rows (a request may
        ask for keep ratios of 1.0), so that every gather copies every row. Its arrays are made on
        the device (nothing to copy); the rows each stage kept go to :attr:`profiled`.
        """
        num_stages = len(self.schedule.layers)
        full = np.full((num_stages + 1, 1), num_tokens, dtype=np.int64)
        plan = StepPlan(query_lens=full, seq_lens=full, kv_starts=np.zeros_like(full),
                        segment=np.zeros(num_tokens, np.int64), token_index=np.arange(num_tokens, dtype=np.int64),
                        seg_counts=full.T.copy(), seg_request=np.zeros(1, np.int64), seg_item=np.zeros(1, np.int64))
        counts = torch.full((num_stages + 1, 1), num_tokens, dtype=torch.int64, device=device)
        drop = DropStep(plan=plan, segment=torch.zeros(num_tokens, dtype=torch.int64, device=device),
                        token_index=torch.arange(num_tokens, device=device),
                        keep=list(counts[1:]), sizes=list(counts[:-1]))
        self._local.drop = drop
        try:
            yield
        finally:
            self._local.drop = None
        if drop.rows_run:
            self.profiled = [num_tokens, *drop.rows_run]
            logger.info("V2Drop: the memory profiling run went through the drop loop (rows per stage %s)",
                        self.profiled)

    def current(self, num_tokens: int) -> DropStep | None:
        """The drop step of the running forward (``num_tokens`` may include CUDA-graph padding)."""
        drop = getattr(self._local, "drop", None)
        if drop is None or drop.segment.shape[0] > num_tokens:
            return None
        return drop

    def forward(self, lm: torch.nn.Module, drop: DropStep, input_ids, positions, inputs_embeds,
                adds_after: Mapping[int, torch.Tensor] | None = None, intermediate_tensors=None):
        """Run vLLM's decoder layers eagerly, cutting each item's vision rows at each stage.

        ``lm`` is the VLM's inner ``LlamaModel`` / ``Qwen2Model``. The residual
        stream entering layer ``l`` is ``hidden + residual`` (vLLM fuses the add
        into the next norm). Rows keep their original positions (``positions[..., rows]``
        also covers M-RoPE's 3 x T positions). Each stage's layers find their own
        attention metadata and slot mapping in the forward context (installed by the
        runner adapter). The output has every row of the step again (dropped rows are
        zero) so that the sampler's indices stay valid; padding rows (CUDA graphs) are
        not run.

        ``adds_after[l]`` (one row per step row) is added to the hidden states after layer
        ``l``, on the rows still present (Qwen3-VL's DeepStack visual features).

        Pipeline parallelism: this rank runs decoder layers ``lm.start_layer .. lm.end_layer - 1``
        and the stages whose drop falls in ``(start_layer, end_layer]``: a stage that starts at
        the next rank's first layer is cut here, where its score's two inputs are. A rank that
        is not the last returns ``IntermediateTensors`` of the step's full row count whose first
        ``n`` rows are the rows still present (``n`` is the host plan's count for the next rank's
        first stage, so every rank knows it ahead), and :data:`ROWS_KEY` says which step rows
        they are; the next rank reads them back from ``intermediate_tensors``.
        """
        sched = self.schedule
        stage_at = {layer: s + 1 for s, layer in enumerate(sched.layers)}
        chunk = drop.chunk
        if chunk is not None and (intermediate_tensors is not None or lm.end_layer < sched.num_layers
                                  or any(layer >= sched.layers[0] for layer in (adds_after or {}))):
            raise NotImplementedError(
                "V2Drop chunked_items: an item split across steps runs on one pipeline rank, and without "
                "per-row additions after its first drop layer (Qwen3-VL's DeepStack levels must lie before it)")
        if intermediate_tensors is None:
            hidden = inputs_embeds if inputs_embeds is not None else lm.embed_input_ids(input_ids)
            num_padded, num_rows = hidden.shape[0], drop.segment.shape[0]
            hidden, positions = hidden[:num_rows], positions[..., :num_rows]
            if self.segments.backend is not None:  # views of vLLM's input buffers: their sizes would guard the graphs
                hidden, positions = hidden.clone(), positions.clone()
            residual = None
            rows = torch.arange(num_rows, device=hidden.device)
            segment, token_index = drop.segment, drop.token_index
        else:  # a later pipeline stage: the rows the previous rank kept
            n = drop.plan.num_rows(sum(1 for layer in sched.layers if layer <= lm.start_layer))
            hidden = intermediate_tensors["hidden_states"]
            num_padded = hidden.shape[0]
            rows = intermediate_tensors[ROWS_KEY][:n]
            hidden, residual = hidden[:n], intermediate_tensors["residual"][:n]
            positions = positions[..., rows]
            segment, token_index = drop.segment[rows], drop.token_index[rows]
        x_prev = None

        def cut(s):  # drop stage s's rows before layer sched.layers[s - 1]
            nonlocal hidden, residual, rows, positions, segment, token_index
            x_cur = hidden + residual
            scores = stage_scores(sched.metric, x_cur, x_prev, seed=sched.seed, stage=s, token_index=token_index)
            if s == 1 and chunk is not None:  # rows of unfinished items leave, stashed rows of completed ones come back
                hidden, residual, positions, rows, scores = chunk.exchange(hidden, residual, positions, rows, scores,
                                                                           num_padded)
                segment, token_index = chunk.segment, chunk.token_index
            keep = segmented_topk_keep(scores, segment, drop.keep[s - 1], drop.sizes[s - 1])
            idx_kept = same_on_every_rank(kept_rows(keep, drop.plan.num_rows(s)))
            hidden, residual, rows = hidden[idx_kept], residual[idx_kept], rows[idx_kept]
            positions = positions[..., idx_kept]
            segment, token_index = segment[idx_kept], token_index[idx_kept]
            drop.rows_run.append(idx_kept.shape[0])
            if sched.trace:
                drop.kept_log.append((segment, token_index))
                drop.kept_layers.append(sched.layers[s - 1])

        adds_after = adds_after or {}
        bounds = sorted({lm.start_layer, lm.end_layer, *(l for l in stage_at if lm.start_layer < l < lm.end_layer),
                         *(l + 1 for l in adds_after if lm.start_layer <= l < lm.end_layer - 1)})
        for first, last in zip(bounds, bounds[1:]):
            s = stage_at.get(first)
            if s is not None and first != lm.start_layer:  # at start_layer: cut by the previous rank
                cut(s)
                if chunk is not None and not drop.plan.num_rows(s):  # every row went to the stash
                    return hidden.new_zeros((num_padded, hidden.shape[-1]))
            hidden, residual, prev = self.segments(lm, first, last, last in stage_at, positions, hidden, residual)
            if prev is not None:
                x_prev = prev
            add = adds_after.get(last - 1)
            if add is not None:
                hidden = hidden + add[rows]
        if lm.end_layer < sched.num_layers:  # not the last pipeline rank
            if lm.end_layer in stage_at:
                cut(stage_at[lm.end_layer])
            return self._to_next_rank(hidden, residual, rows, num_padded)
        hidden, _ = lm.norm(hidden, residual)
        extra = chunk.num_rows_back if chunk is not None else 0  # stashed rows that came back: no output
        out = hidden.new_zeros((num_padded + extra, hidden.shape[-1]))
        return out.index_copy_(0, rows, hidden)[:num_padded]

    @staticmethod
    def _to_next_rank(hidden, residual, rows, num_padded: int):
        """What a pipeline rank hands on: the present rows first, in shapes of the whole step."""
        n = rows.shape[0]
        out = {"hidden_states": hidden.new_zeros((num_padded, hidden.shape[-1])),
               "residual": residual.new_zeros((num_padded, residual.shape[-1])),
               ROWS_KEY: rows.new_zeros(num_padded)}
        out["hidden_states"][:n], out["residual"][:n], out[ROWS_KEY][:n] = hidden, residual, rows
        return intermediate_tensors(out)

    # ---- observability -------------------------------------------------------------------------
    def _log_requests(self, batch: BatchView, step: StepPlan) -> None:
        """One INFO line per request, in the step that runs its last vision item."""
        sched = self.schedule
        done = {}
        for g, r in enumerate(step.seg_request.tolist()):
            done[r] = max(done.get(r, -1), int(step.seg_item[g]))
        for r, last_item in done.items():
            plan = self.planner.rows[r]
            if last_item != plan.num_items - 1 or not plan.pruned:
                continue
            per_stage = " -> ".join(str(int(n)) for n in plan.counts.sum(axis=0))
            per_layer = plan.rows_per_layer(sched.layers, sched.num_layers)
            n0 = plan.total_vision_rows
            retention = (sum(per_layer) / (len(per_layer) * n0)) if n0 else 1.0
            logger.info(
                "V2Drop request %s: %d vision rows in %d item(s); rows per stage %s (layers %s); "
                "average retention %.1f%%; KV slots not written %d",
                batch.req_ids[r], n0, plan.num_items, per_stage, list(sched.layers),
                100 * retention, plan.kv_rows_saved(sched.layers, sched.num_layers),
            )

    def encoded(self, items: int) -> None:
        """The vision encoder ran on ``items`` items in this step. With ``trace`` set, a line
        ``encoded <items>`` goes to ``v2drop-encoder-<pid>.log`` there (:func:`encoder_runs` sums
        them: an image served from the prefix cache is not encoded again)."""
        if self.schedule.trace and items:
            os.makedirs(self.schedule.trace, exist_ok=True)
            with open(os.path.join(self.schedule.trace, f"v2drop-encoder-{os.getpid()}.log"), "a") as f:
                f.write(f"encoded {items}\n")

    def _write_trace(self, drop: DropStep) -> None:
        """Append one JSON line per finished request: its items and the rows each stage kept.

        Reads the kept rows back to the host (a sync): only when ``trace`` is set. ``layers``
        are the stages this rank cut (all of them, but for a pipeline-parallel rank).
        """
        if not drop.kept_log:  # a pipeline rank without stages
            return
        plan = drop.plan
        logs = [(seg.cpu().numpy(), tok.cpu().numpy()) for seg, tok in drop.kept_log]
        batch = drop.batch
        for g in range(len(plan.seg_request)):
            r, item = int(plan.seg_request[g]), int(plan.seg_item[g])
            req, rplan = batch.describe(batch.req_ids[r]), self.planner.rows[r]
            kept = [sorted(int(t) for t in tok[seg == g]) for seg, tok in logs]
            pos = rplan.positions[item]
            entry = {"modality": self._item_modality(req, pos), "first": int(pos[0]),
                     "rows": int(len(pos)), "kept": kept}
            # by item: a request preempted between its items records them again when it resumes
            self._pending_trace.setdefault(req.req_id, {})[item] = entry
            if item == rplan.num_items - 1:
                items = [e for _, e in sorted(self._pending_trace.pop(req.req_id).items())]
                self._trace_line({"request_id": req.req_id, "layers": drop.kept_layers, "items": items})
        for gone in [k for k in self._pending_trace if k not in self.planner.plans]:  # finished or aborted
            del self._pending_trace[gone]

    def _trace_cached(self, batch: BatchView) -> None:
        """A pruned request whose vision rows all come from the prefix cache runs no drop step; its
        trace line, written when it is first scheduled, says so (``"from_prefix_cache": true``,
        ``kept`` null: the request that computed those rows has them in its own line)."""
        seen = self._seen_by_trace
        for i, rid in enumerate(batch.req_ids):  # trace mode only: a debugging aid, not a hot path
            if rid in seen:
                continue
            seen.add(rid)
            plan = self.planner.plans.get(rid)
            if plan is None or not plan.num_items or not plan.pruned or batch.num_computed[i] < plan.ends[-1]:
                continue
            req = batch.describe(rid)
            items = [{"modality": self._item_modality(req, pos), "first": int(pos[0]), "rows": int(len(pos)),
                      "kept": None} for pos in plan.positions]
            self._trace_line({"request_id": rid, "layers": list(self.schedule.layers), "items": items,
                              "from_prefix_cache": True})
        seen.intersection_update(self.planner.plans)  # finished or aborted requests leave

    def _trace_line(self, record: dict) -> None:
        os.makedirs(self.schedule.trace, exist_ok=True)
        with open(os.path.join(self.schedule.trace, f"v2drop-trace-{os.getpid()}.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")

    @staticmethod
    def _item_modality(req: RequestView, positions: np.ndarray) -> str:
        for it in req.items:
            if len(it.positions) and it.positions[0] <= positions[0] <= it.positions[-1]:
                return it.modality
        return "?"


def encoder_runs(trace_dir: str) -> int:
    """Vision items encoded so far by the engines writing to ``trace_dir`` (:meth:`V2DropRuntime.encoded`)."""
    import glob

    paths = glob.glob(os.path.join(trace_dir, "v2drop-encoder-*.log"))
    return sum(int(line.split()[1]) for p in paths for line in open(p))
