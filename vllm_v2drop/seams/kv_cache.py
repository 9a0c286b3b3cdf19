"""The KV-cache seam (engine core; the spec also in the workers): block counts in compact units.

vLLM's scheduler counts every request in ORIGINAL tokens (positions, RoPE and
the sampler stay original). Its KV-cache coordinator hands each group's manager
``num_tokens`` = the original token count a request needs slots for.
:class:`V2DropStageCoordinator` (the coordinator class vLLM would pick, with V2Drop's methods
mixed in, chosen once when the V2Drop scheduler builds its KV-cache manager, where the pool holds
:class:`V2DropStageManager` groups, vLLM's full-attention manager with a stage) converts that count once per request and call to the rows present
in every stage, ``plan.compact_lens(num_tokens)``, and gives each group its stage's
count, so a stage-``s`` group holds ``ceil(compact_len(s, n) / block_size)``
blocks of a request.

Managers only see request ids. The request's plan is built once from the
scheduler's ``Request`` when :meth:`KVCacheManager.get_computed_blocks` first sees it
(the hook below), with the same code the worker uses (:func:`vllm_v2drop.worker.runtime.plan_for`),
and dropped when the request finishes (kept across preemption: a resumed
request has the same plan). A request the registry does not know gets the
original count, a superset: never fewer blocks than the worker writes to.

Prefix caching. Layers after a drop store a request's rows compacted. Requests that drop
nothing (text-only, ``v2drop_off``) cache and hit as in stock vLLM.

* ``kv_mode: shared`` (Level 1): one block holds every layer, so it holds the same rows in
  every layer only before the request's first vision item. The coordinator caches
  (``cache_blocks``) and looks up (``find_longest_cache_hit``) a request whose plan drops
  rows only up to that item.
* ``kv_mode: per_stage`` (Level 2): a stage-``s`` group's block ``j`` holds compacted rows
  ``[j B, (j + 1) B)``. Its content is a function of the sequence up to one prompt position
  ``q_j`` (``RequestPlan.block_key_positions``: its last row's, or the end of the item that
  row lies in), so it is cached under the hash of vLLM's own block holding ``q_j``, its
  index ``j`` and the plan's ratios (``StagePlans.stage_keys``; a block before any drop keeps
  vLLM's own hash and is shared with every request). A lookup finds the hit of the stage-0
  groups (original rows, vLLM's hashes), ``N``, and of every stage in these keys, ``k_s``
  blocks; the request resumes at ``M``, the earliest of the positions where some stage runs
  out (``RequestPlan.resume_position``; never inside an item), and every group keeps the
  blocks that cover ``M``: ``ceil(compact_len(s, M) / B)``. A last block only partly
  covered is copied by vLLM's own copy-on-write of a partial prefix hit (the request
  writes its next rows into its private copy); never a block cached in the step being
  scheduled, whose rows the copy would take before they are written (``M`` moves back to
  before it; ``V2DropStageManager.cache_blocks``). A turn of a chat that re-sends an image thus
  hits through the image in every stage: the image is neither encoded nor prefilled again.
  vLLM's prefix-cache metrics count ``M``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from contextlib import contextmanager
from contextvars import ContextVar

from dataclasses import dataclass, replace
from typing import Any

from vllm.v1.core.kv_cache_coordinator import (
    HybridKVCacheCoordinator,
    KVCacheCoordinatorNoPrefixCache,
    UnitaryKVCacheCoordinator,
)
from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager, SingleTypeKVCacheManager
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheSpec

from vllm_v2drop.config import V2DropConfigError
from vllm_v2drop.engine.per_stage import FLASHINFER_BACKENDS, flashinfer_message
from vllm_v2drop.engine.plans import KeyedRequest, StagePlans
from vllm_v2drop.seams._check import CALLS, EXACT, NAMES, Seam, Touch
from vllm_v2drop.seams._patch import patch

__all__ = [
    "SEAM", "V2DropCoordinator", "V2DropStageCoordinator", "V2DropStageManager", "V2DropStageSpec", "building",
    "coordinator_class", "install", "install_stage_specs",
]

_COORD = "vllm.v1.core.kv_cache_coordinator"
_STM = "vllm.v1.core.single_type_kv_cache_manager"
_SPEC = "vllm.v1.kv_cache_interface"
_BY = "seams.kv_cache."

SEAM = Seam("KV-cache coordinator", "engine core: block counts per stage group, prefix-cache keys; the per-stage KV spec", (
    Touch(f"{_COORD}:KVCacheCoordinator.get_num_blocks_to_allocate",
          "(self, request_id, num_tokens, new_computed_blocks, num_encoder_tokens, total_computed_tokens, "
          "num_local_computed_tokens, num_tokens_main_model, apply_admission_cap=False, prefill_end=0)",
          EXACT, _BY + "V2DropCoordinator"),
    Touch(f"{_COORD}:KVCacheCoordinator.allocate_new_blocks",
          "(self, request_id, num_tokens, num_tokens_main_model, num_encoder_tokens=0)",
          EXACT, _BY + "V2DropCoordinator"),
    Touch(f"{_COORD}:KVCacheCoordinator.remove_skipped_blocks",
          "(self, request_id, processed_computed_tokens, num_prompt_tokens=None)",
          EXACT, _BY + "V2DropCoordinator"),
    Touch(f"{_COORD}:KVCacheCoordinator.free", "(self, request_id)", EXACT, _BY + "V2DropCoordinator"),
    Touch(f"{_COORD}:KVCacheCoordinator.pop_blocks_for_free", "(self, request_id)", EXACT, _BY + "V2DropCoordinator"),
    Touch(f"{_COORD}:KVCacheCoordinator.allocate_new_computed_blocks",
          "(self, request_id, new_computed_blocks, num_local_computed_tokens, num_external_computed_tokens, "
          "skip_zeroing_group_ids=())",
          EXACT, _BY + "V2DropCoordinator"),
    Touch(f"{_COORD}:KVCacheCoordinator.cache_blocks", "(self, request, num_computed_tokens)", EXACT,
          _BY + "V2DropCoordinator"),
    # coordinator_class mixes V2Drop's methods into whichever of these vLLM's factory would pick
    *(Touch(f"{_COORD}:{cls}.find_longest_cache_hit", "(self, block_hashes, max_cache_hit_length)", EXACT,
            _BY + "V2DropCoordinator")
      for cls in ("KVCacheCoordinator", "KVCacheCoordinatorNoPrefixCache", "UnitaryKVCacheCoordinator",
                  "HybridKVCacheCoordinator")),
    # vLLM 0.32 has no hook to choose the coordinator class: its factory (a global of the KV-cache
    # manager's module) is replaced by one that picks as vLLM's does and builds the V2Drop subclass
    Touch("vllm.v1.core.kv_cache_manager:get_kv_cache_coordinator",
          "(kv_cache_config, max_model_len, max_in_flight_tokens, use_eagle, enable_caching, enable_kv_cache_events, "
          "dcp_world_size, pcp_world_size, scheduler_block_size, hash_block_size, metrics_collector=None, "
          "num_prefill_lookahead=0, allow_partial_hash_hits=True)", EXACT, _BY + "_chosen_once"),
    Touch(f"{_COORD}:KVCacheCoordinatorNoPrefixCache.__init__",
          "(self, kv_cache_config, max_model_len, max_in_flight_tokens, use_eagle, enable_kv_cache_events, dcp_world_size, pcp_world_size, scheduler_block_size, hash_block_size, metrics_collector=None, num_prefill_lookahead=0)", CALLS,
          _BY + "_chosen_once"),
    Touch(f"{_COORD}:UnitaryKVCacheCoordinator.__init__",
          "(self, kv_cache_config, max_model_len, max_in_flight_tokens, use_eagle, enable_caching, enable_kv_cache_events, dcp_world_size, pcp_world_size, scheduler_block_size, hash_block_size, metrics_collector=None, num_prefill_lookahead=0)", CALLS,
          _BY + "_chosen_once"),
    Touch(f"{_COORD}:HybridKVCacheCoordinator.__init__",
          "(self, kv_cache_config, max_model_len, max_in_flight_tokens, use_eagle, enable_caching, enable_kv_cache_events, dcp_world_size, pcp_world_size, scheduler_block_size, hash_block_size, metrics_collector=None, num_prefill_lookahead=0, allow_partial_hash_hits=True)", CALLS,
          _BY + "_chosen_once"),
    Touch(f"{_STM}:FullAttentionManager.__init__", "(self, kv_cache_spec)", NAMES, _BY + "V2DropStageManager"),
    Touch(f"{_STM}:FullAttentionManager.new_step_starts", "(self)", EXACT, _BY + "V2DropStageManager"),
    Touch(f"{_STM}:FullAttentionManager.cache_blocks",
          "(self, request, num_tokens, *, retention_interval, replay_boundaries)",
          CALLS, _BY + "V2DropStageManager, " + _BY + "V2DropCoordinator.cache_blocks"),
    Touch(f"{_STM}:FullAttentionManager.allocate_external_computed_blocks",
          "(self, request_id, num_local_computed_tokens, num_external_computed_tokens, record_for_zeroing=True)",
          EXACT, _BY + "V2DropStageManager"),
    Touch(f"{_STM}:FullAttentionManager.get_num_blocks_to_allocate",
          "(self, request_id, num_tokens, new_computed_blocks, total_computed_tokens, num_local_computed_tokens, "
          "num_tokens_main_model, *, apply_admission_cap, prefill_end)",
          CALLS, _BY + "V2DropCoordinator.get_num_blocks_to_allocate"),
    Touch(f"{_STM}:FullAttentionManager.allocate_new_blocks", "(self, request_id, num_tokens, num_tokens_main_model)",
          CALLS, _BY + "V2DropCoordinator.allocate_new_blocks"),
    Touch(f"{_STM}:FullAttentionManager.add_local_computed_blocks",
          "(self, request_id, new_computed_blocks, num_local_computed_tokens, num_external_computed_tokens)",
          CALLS, _BY + "V2DropCoordinator.allocate_new_computed_blocks"),
    Touch(f"{_STM}:FullAttentionManager.find_longest_cache_hit",
          "(*, block_hashes, max_length, kv_cache_group_ids, block_pool, kv_cache_spec, drop_eagle_block, "
          "alignment_tokens)",
          CALLS, _BY + "V2DropCoordinator._v2drop_stage_hit"),
    Touch(f"{_STM}:SingleTypeKVCacheManager.remove_skipped_blocks", None, NAMES, _BY + "V2DropCoordinator._v2drop_setup"),
    Touch(f"{_STM}:SingleTypeKVCacheManager.get_num_skipped_tokens", None, NAMES, _BY + "V2DropCoordinator._v2drop_setup"),
    Touch(f"{_SPEC}:KVCacheSpec", None, NAMES, _BY + "V2DropStageSpec"),
    Touch(f"{_SPEC}:FullAttentionSpec.merge", "(specs)", CALLS, _BY + "V2DropStageSpec.merge"),
    Touch(f"{_SPEC}:FullAttentionSpec.is_uniform_with_collection", "(self, kv_cache_specs)", EXACT,
          _BY + "V2DropStageSpec"),
    Touch(f"{_SPEC}:MLAAttentionSpec", None, NAMES, _BY + "install_stage_specs"),
    Touch(f"{_SPEC}:replace_as", "(spec, target_cls, **changes)", CALLS, _BY + "install_stage_specs"),
    Touch("vllm.v1.kv_cache_spec_registry:KVCacheSpecRegistry.register",
          "(kvcache_spec_cls, manager_class, *, uniform_type_base_spec)", CALLS, _BY + "install"),
    Touch("vllm.v1.kv_cache_spec_registry:KVCacheSpecRegistry._ensure_registered", "()", CALLS, _BY + "install"),
    Touch("vllm.model_executor.layers.attention:Attention.get_kv_cache_spec", "(self, vllm_config)", EXACT,
          _BY + "install_stage_specs"),
))


class V2DropStageManager(FullAttentionManager):
    """Full-attention manager of one V2Drop stage group: counts in the stage's compact rows."""

    def __init__(self, kv_cache_spec, **kwargs) -> None:
        super().__init__(kv_cache_spec, **kwargs)
        self.stage = kv_cache_spec.stage
        self.plans = StagePlans.of(self.block_pool, kv_cache_spec.schedule)
        self.cached_this_step: set[int] = set()  # ids of the blocks this manager cached in this step

    def _compact(self, request_id: str, num_tokens: int) -> int:
        return self.plans.compact_len(request_id, self.stage, num_tokens)

    # Blocks cached in the step being scheduled hold rows the worker has not written yet (vLLM
    # caches a block when it allocates it for the tokens it schedules). A hit that uses such a
    # block whole reads it in the same forward after its owner wrote it, as in stock vLLM; a
    # hit that ends inside it would have it copied (copy-on-write) at the start of the step,
    # before it is written: the coordinator's lookup never ends inside one of these.
    def new_step_starts(self) -> None:
        super().new_step_starts()
        self.cached_this_step.clear()

    def cache_blocks(self, request, num_tokens: int, *args, **kwargs) -> None:
        rid = request.request_id
        before = self.num_cached_block.get(rid, 0)
        if num_tokens // self.block_size <= before:
            return  # no new full block (vLLM's own first answer, without its call): most steps
        super().cache_blocks(request, num_tokens, *args, **kwargs)
        after = self.num_cached_block.get(rid, 0)
        if after > before:
            self.cached_this_step.update(b.block_id for b in self.req_to_blocks[rid][before:after])

    def allocate_external_computed_blocks(
        self,
        request_id: str,
        num_local_computed_tokens: int,
        num_external_computed_tokens: int,
        record_for_zeroing: bool = True,
    ) -> None:
        c = functools.partial(self._compact, request_id)
        local = c(num_local_computed_tokens)
        external = c(num_local_computed_tokens + num_external_computed_tokens) - local
        super().allocate_external_computed_blocks(request_id, local, external, record_for_zeroing)


class V2DropCoordinator:
    """What a V2Drop engine's KV-cache coordinator does differently: the prefix-cache cap (this
    class), and in ``kv_mode: per_stage`` block counts per stage group (:class:`V2DropStageCoordinator`).
    Mixed in before the coordinator class vLLM's factory would pick (:func:`coordinator_class`),
    chosen once when the KV-cache manager is built.

    vLLM's coordinator hands every group's manager the same ORIGINAL token counts; here each
    request's counts are compacted once per call for all stages (``plan.compact_lens``) and
    every group gets its stage's. Requests without a plan (text-only, not registered yet) take
    vLLM's own path with original counts: a superset.

    Per step and running request, vLLM calls the coordinator three times (``remove_skipped_blocks``,
    ``get_num_blocks_to_allocate``, ``allocate_new_blocks``), and its coordinator calls every group's
    manager each time: with ``per_stage``'s 8-12 groups that loop dominated ``Scheduler.schedule()``
    (3x stock's at 1024 decoding requests). Here a decode step that fits in the blocks the request
    holds in every group (its "room", recorded at its last allocation) is answered with one lookup
    and no manager call; full-attention groups never skip blocks, so ``remove_skipped_blocks`` has
    nothing to do.
    """

    _v2drop_plans: StagePlans
    _v2drop_stages: tuple[int, ...]  # stage of each group (0, i.e. original counts, for a non-V2Drop group)
    _v2drop_request: object | None  # the request KVCacheManager.get_computed_blocks is looking up
    _v2drop_level2: bool  # per_stage with prefix caching: compacted blocks are cached (module docstring)
    _v2drop_stage_groups: tuple  # (stage, group ids, manager class, spec) per stage

    # Prefix caching (module docstring): requests whose plan drops rows hit and cache only before
    # their first vision item in ``shared`` mode (Level 1), per stage in compact rows in ``per_stage``.
    def find_longest_cache_hit(self, block_hashes, max_cache_hit_length: int):
        request = self._v2drop_request
        cap = None if request is None else self._v2drop_plans.cache_limit(request)
        if cap is None:
            return super().find_longest_cache_hit(block_hashes, max_cache_hit_length)
        if not self._v2drop_level2:
            return super().find_longest_cache_hit(block_hashes, min(cap, max_cache_hit_length))
        return self._v2drop_stage_hit(request, block_hashes, max_cache_hit_length)

    def _v2drop_stage_hit(self, request, block_hashes, max_length: int):
        plans, size = self._v2drop_plans, self.scheduler_block_size
        plan = plans.plans[request.request_id]
        found: dict[int, tuple[list, ...]] = {}
        hit = resume = 0
        for stage, ids, manager_cls, spec in self._v2drop_stage_groups:
            if stage == 0:
                keys, limit = block_hashes, max_length
            else:
                limit = plan.compact_len(stage, hit)
                keys = plans.stage_keys(request, stage, limit // size, size)
            blocks, length = manager_cls.find_longest_cache_hit(
                block_hashes=keys, max_length=min(limit, len(keys) * size), kv_cache_group_ids=ids,
                block_pool=self.block_pool, kv_cache_spec=spec, drop_eagle_block=False, alignment_tokens=size,
            )
            found[stage] = blocks
            if stage == 0:
                hit = length
                resume = plan.resume_position(0, hit)  # a hit ending inside an item recomputes the item
            else:
                resume = min(resume, plan.resume_position(stage, length))
            if resume == 0:
                break
        lens = plan.compact_lens(resume) if resume else ()
        while resume:  # never end inside a block cached in this step (V2DropStageManager.cache_blocks)
            unwritten = [s for s, ids, _, _ in self._v2drop_stage_groups if lens[s] % size and any(
                blocks[lens[s] // size].block_id in self.single_type_managers[gid].cached_this_step
                for gid, blocks in zip(ids, found[s]))]
            if not unwritten:
                break
            resume = min(plan.resume_position(s, lens[s] // size * size) for s in unwritten)
            lens = plan.compact_lens(resume)
        if resume == 0:
            return tuple([] for _ in self.single_type_managers), 0, 0
        out = [[] for _ in self.single_type_managers]
        for stage, ids, _, _ in self._v2drop_stage_groups:
            keep = -(-lens[stage] // size)  # a last block only partly covered: vLLM's copy-on-write
            for gid, blocks in zip(ids, found[stage]):
                out[gid] = blocks[:keep]
        return tuple(out), resume, 0

    def cache_blocks(self, request, num_computed_tokens: int) -> None:
        later = request.__dict__.get("_v2drop_cache_from")  # (preemptions, tokens): nothing new before
        if later is not None and later[0] == request.num_preemptions and num_computed_tokens < later[1]:
            return  # one dict lookup per request and step; a preempted request's blocks were freed
        cap = self._v2drop_plans.cache_limit(request)
        if cap is None:
            return super().cache_blocks(request, num_computed_tokens)
        if not self._v2drop_level2:
            if cap <= num_computed_tokens:  # every later call would repeat this one (a no-op)
                request._v2drop_cache_from = (request.num_preemptions, math.inf)
            return super().cache_blocks(request, min(cap, num_computed_tokens))
        # per_stage: each stage's full compact blocks, stage s >= 1 under its own keys
        plans, size = self._v2drop_plans, self.scheduler_block_size
        rid = request.request_id
        plan = plans.plans[rid]
        lens = plan.compact_lens(num_computed_tokens)
        boundaries = (request.num_prompt_tokens - 1,)  # vLLM's replay_boundaries without EAGLE
        for manager, s in zip(self.single_type_managers, self._v2drop_stages):
            full = lens[s] // size
            if full <= manager.num_cached_block.get(rid, 0):
                continue
            if s:
                keys = plans.stage_keys(request, s, full, size)
                if len(keys) <= manager.num_cached_block.get(rid, 0):
                    continue
                manager.cache_blocks(KeyedRequest(request, keys), len(keys) * size,
                                     retention_interval=self.retention_interval, replay_boundaries=boundaries)
            else:
                manager.cache_blocks(request, full * size, retention_interval=self.retention_interval,
                                     replay_boundaries=boundaries)
        _, last, dropped = plan.summary
        if num_computed_tokens >= last:
            # Past its items, a stage's next block j ends at prompt position q = (j+1) B - 1 + dropped;
            # it is cached once vLLM has hashed the block holding q (a stage s >= 1 block whose q
            # lies past stable_end never gets a key).
            nxt = [(q // size + 1) * size for manager, s in zip(self.single_type_managers, self._v2drop_stages)
                   for q in [(manager.num_cached_block.get(rid, 0) + 1) * size - 1 + dropped[s]]
                   if s == 0 or q < plan.stable_end]
            request._v2drop_cache_from = (request.num_preemptions, min(nxt, default=math.inf))

    def _v2drop_setup(self, schedule) -> None:
        """What the V2Drop methods read, once the managers exist (the end of construction)."""
        coordinator = self
        managers = coordinator.single_type_managers
        per_stage = any(isinstance(m, V2DropStageManager) for m in managers)
        coordinator._v2drop_plans = StagePlans.of(coordinator.block_pool, schedule)
        coordinator._v2drop_request = None
        coordinator._v2drop_room = {}  # request id -> (last item end, room, first group's blocks, their count)
        coordinator._v2drop_no_blocks = tuple(() for _ in managers)
        base_skip = (SingleTypeKVCacheManager.remove_skipped_blocks, SingleTypeKVCacheManager.get_num_skipped_tokens)
        coordinator._v2drop_full_only = all(
            (type(m).remove_skipped_blocks, type(m).get_num_skipped_tokens) == base_skip for m in managers)
        coordinator._v2drop_stages = stages = tuple(getattr(m, "stage", 0) for m in managers)
        groups = coordinator.kv_cache_config.kv_cache_groups
        coordinator._v2drop_stage_groups = tuple(
            (s, ids, type(managers[ids[0]]), groups[ids[0]].kv_cache_spec)
            for s in sorted(set(stages))
            for ids in [[i for i, t in enumerate(stages) if t == s]]
        )
        # Level 2 wants every group a full-attention group of the scheduler's block size, hashed at it
        coordinator._v2drop_level2 = (
            per_stage and coordinator.block_pool.enable_caching and not coordinator.eagle_group_ids
            and coordinator.block_pool.hash_block_size == coordinator.scheduler_block_size
            and all(isinstance(m, FullAttentionManager) and m.block_size == coordinator.scheduler_block_size
                    and m.dcp_world_size == 1 for m in managers)
        )


class V2DropStageCoordinator(V2DropCoordinator):
    """``kv_mode: per_stage``: each stage group's blocks in the stage's compact rows (see
    :class:`V2DropCoordinator`)."""

    def get_num_blocks_to_allocate(
        self,
        request_id: str,
        num_tokens: int,
        new_computed_blocks: tuple[Sequence, ...],
        num_encoder_tokens: int,
        total_computed_tokens: int,
        num_local_computed_tokens: int,
        num_tokens_main_model: int,
        apply_admission_cap: bool = False,
        prefill_end: int = 0,
    ) -> int:
        if self._v2drop_has_room(request_id, num_tokens) and not any(new_computed_blocks):
            return 0  # a decode step within the blocks every group holds (most steps)
        plan = self._v2drop_plans.plans.get(request_id)
        if plan is None or not plan.pruned:
            return super().get_num_blocks_to_allocate(
                request_id, num_tokens, new_computed_blocks, num_encoder_tokens, total_computed_tokens,
                num_local_computed_tokens, num_tokens_main_model, apply_admission_cap, prefill_end,
            )
        lens = plan.compact_lens
        n = lens(num_tokens)
        total = n if total_computed_tokens == num_tokens else lens(total_computed_tokens)
        local = total if num_local_computed_tokens == total_computed_tokens else lens(num_local_computed_tokens)
        main = n if num_tokens_main_model == num_tokens else lens(num_tokens_main_model)
        if self.retention_interval != 0:
            prefill_end = 0
        blocks = 0
        for i, (manager, s) in enumerate(zip(self.single_type_managers, self._v2drop_stages)):
            blocks += manager.get_num_blocks_to_allocate(
                request_id, n[s], new_computed_blocks[i], total[s], local[s], main[s],
                apply_admission_cap=apply_admission_cap, prefill_end=prefill_end,
            )
        return blocks

    def allocate_new_blocks(self, request_id: str, num_tokens: int, num_tokens_main_model: int,
                            num_encoder_tokens: int = 0) -> tuple[list, ...]:
        if self._v2drop_has_room(request_id, num_tokens):
            return self._v2drop_no_blocks
        plan = self._v2drop_plans.plans.get(request_id)
        if plan is None or not plan.pruned:
            return super().allocate_new_blocks(request_id, num_tokens, num_tokens_main_model, num_encoder_tokens)
        n = plan.compact_lens(num_tokens)
        main = n if num_tokens_main_model == num_tokens else plan.compact_lens(num_tokens_main_model)
        managers = self.single_type_managers
        out = tuple(manager.allocate_new_blocks(request_id, n[s], main[s])
                    for manager, s in zip(managers, self._v2drop_stages))
        _, last, dropped = plan.summary
        if num_tokens >= last:  # past its items: stage s holds num_tokens - dropped[s] rows from now on
            blocks = managers[0].req_to_blocks[request_id]
            room = min(len(m.req_to_blocks[request_id]) * m.block_size + dropped[s]
                       for m, s in zip(managers, self._v2drop_stages))
            self._v2drop_room[request_id] = (last, room, blocks, len(blocks))
        return out

    def _v2drop_has_room(self, request_id: str, num_tokens: int) -> bool:
        """Whether every group already holds the blocks ``num_tokens`` need: the request is past its
        items and below the room recorded at its last allocation (the least of ``blocks x block size
        + dropped[stage]`` over the groups), and its blocks are still those (the first group's list,
        same object and length: a freed or preempted request gets a new one).

        A decode step needs a new block in a group once every ``block_size`` tokens; the other
        steps answer here, without a call per group and request."""
        room = self._v2drop_room.get(request_id)
        if room is None or not room[0] <= num_tokens <= room[1]:
            return False
        blocks = self.single_type_managers[0].req_to_blocks.get(request_id)
        if blocks is room[2] and len(blocks) == room[3]:
            return True
        del self._v2drop_room[request_id]
        return False

    def remove_skipped_blocks(self, request_id: str, processed_computed_tokens: int,
                              num_prompt_tokens: int | None = None) -> None:
        """vLLM's loop over the groups, skipped where every manager is full attention (it never skips
        a block): one call per request and step instead of one per group."""
        if not self._v2drop_full_only:
            super().remove_skipped_blocks(request_id, processed_computed_tokens, num_prompt_tokens)

    def free(self, request_id: str) -> None:
        self._v2drop_room.pop(request_id, None)
        super().free(request_id)

    def pop_blocks_for_free(self, request_id: str) -> list:
        self._v2drop_room.pop(request_id, None)
        return super().pop_blocks_for_free(request_id)

    def allocate_new_computed_blocks(self, request_id: str, new_computed_blocks, num_local_computed_tokens: int,
                                     num_external_computed_tokens: int, skip_zeroing_group_ids=()) -> None:
        """A per_stage hit: each group takes its blocks with its stage's compact count (a partial
        last block is vLLM's copy-on-write case)."""
        self._v2drop_room.pop(request_id, None)
        plan = self._v2drop_plans.plans.get(request_id)
        managers = self.single_type_managers
        if (plan is None or not plan.pruned or num_external_computed_tokens
                or any(request_id in m.num_cached_block for m in managers)):
            return super().allocate_new_computed_blocks(
                request_id, new_computed_blocks, num_local_computed_tokens, num_external_computed_tokens,
                skip_zeroing_group_ids)
        local = plan.compact_lens(num_local_computed_tokens)
        for i, (manager, s) in enumerate(zip(managers, self._v2drop_stages)):
            manager.add_local_computed_blocks(request_id, new_computed_blocks[i], local[s], 0)


# The coordinator classes vLLM 0.32's ``get_kv_cache_coordinator`` picks from, each with V2Drop's
# methods mixed in first: with or without the per-stage counts.
_COORDINATORS: dict[tuple[type, bool], type] = {}
for _base in (KVCacheCoordinatorNoPrefixCache, UnitaryKVCacheCoordinator, HybridKVCacheCoordinator):
    for _per_stage, _mixin in ((False, V2DropCoordinator), (True, V2DropStageCoordinator)):
        _COORDINATORS[_base, _per_stage] = type(f"V2Drop{'Stage' if _per_stage else ''}{_base.__name__}", (_mixin, _base),
                                                {"__module__": __name__})


def coordinator_class(base: type, per_stage: bool) -> type:
    """The V2Drop coordinator class over ``base`` (the class vLLM's factory picks)."""
    return _COORDINATORS[base, per_stage]


_building: ContextVar = ContextVar("v2drop_building", default=None)


@contextmanager
def building(schedule):
    """KV-cache managers built inside get a V2Drop coordinator for ``schedule`` (the V2Drop
    scheduler builds its manager inside)."""
    token = _building.set(schedule)
    try:
        yield
    finally:
        _building.reset(token)


def _chosen_once(get_kv_cache_coordinator):
    """vLLM's coordinator factory, called by ``KVCacheManager.__init__``: inside :func:`building`, the
    class vLLM would pick with V2Drop's methods mixed in (the same selection and arguments as
    vLLM 0.32's factory; vLLM offers no hook to choose the coordinator class)."""

    def v2drop_get_kv_cache_coordinator(kv_cache_config, max_model_len, max_in_flight_tokens, use_eagle,
                                        enable_caching, enable_kv_cache_events, dcp_world_size, pcp_world_size,
                                        scheduler_block_size, hash_block_size, metrics_collector=None,
                                        num_prefill_lookahead=0, allow_partial_hash_hits=True):
        schedule = _building.get()
        common = dict(dcp_world_size=dcp_world_size, pcp_world_size=pcp_world_size,
                      scheduler_block_size=scheduler_block_size, hash_block_size=hash_block_size,
                      metrics_collector=metrics_collector, num_prefill_lookahead=num_prefill_lookahead)
        if schedule is None:
            return get_kv_cache_coordinator(
                kv_cache_config, max_model_len, max_in_flight_tokens, use_eagle, enable_caching,
                enable_kv_cache_events, allow_partial_hash_hits=allow_partial_hash_hits, **common)
        per_stage = any(isinstance(g.kv_cache_spec, V2DropStageSpec) for g in kv_cache_config.kv_cache_groups)
        head = (kv_cache_config, max_model_len, max_in_flight_tokens, use_eagle)
        if not enable_caching:
            cls = coordinator_class(KVCacheCoordinatorNoPrefixCache, per_stage)
            coordinator = cls(*head, enable_kv_cache_events, **common)
        elif len(kv_cache_config.kv_cache_groups) == 1:
            cls = coordinator_class(UnitaryKVCacheCoordinator, per_stage)
            coordinator = cls(*head, enable_caching, enable_kv_cache_events, **common)
        else:
            cls = coordinator_class(HybridKVCacheCoordinator, per_stage)
            coordinator = cls(*head, enable_caching, enable_kv_cache_events,
                              allow_partial_hash_hits=allow_partial_hash_hits, **common)
        coordinator._v2drop_setup(schedule)
        return coordinator

    return v2drop_get_kv_cache_coordinator




# ------------------------------------------------------------------------------------ the KV spec
#
# How vLLM 0.32 groups the stages, and what it costs:
# The specs of different stages cannot merge (:meth:`V2DropStageSpec.merge`
# raises), so ``get_kv_cache_groups`` takes the hybrid path
# (``_get_kv_cache_groups_uniform_page_size``): one bucket of layers per stage,
# then every bucket is cut into groups of ``G`` layers, ``G`` being the smallest
# bucket (or the largest, when the largest is < 1.5 x the smallest). A physical
# block holds ``G`` layer pages and every group's layers share it, so:
#
# * stage layer counts that are all multiples of the smallest one (e.g. 2/2/4/8)
#   cost nothing: every group is full;
# * otherwise the last group of a stage has fewer than ``G`` layers and vLLM
#   "pads" it: each block that group takes has ``G - g`` unused layer pages. vLLM
#   logs ``Add N padding layers, may waste at most X% KV cache memory``;
#   :func:`vllm_v2drop.core.kv_layout.group_layout` predicts the layout and
#   :func:`~vllm_v2drop.core.kv_layout.padding_waste` its cost,
#   and the config hook logs both at start-up;
# * the paper's schedules rarely divide evenly: Qwen2-VL-7B's (3, 16, 22) of 28
#   layers has stages of 3/13/6/6 layers, so ``G = 3`` and stage 1 becomes 5 groups
#   of 3,3,3,2,2 layers: 2 of every 15 pages a request holds in stage 1 are
#   padding (6.7% of its KV memory with equal blocks per stage); LLaVA-1.5's
#   (3, 17, 22) of 32 gives 3/14/5/10 layers, 12 groups, 11% padding. A stage of
#   a single layer forces ``G = 1``: one group per layer, no padding at all, but
#   one block table and one allocation per layer (8 groups for the tiny 8-layer
#   test model). vLLM's per-step work grows with the group count: its coordinator
#   calls every group's manager for every running request, the runner computes
#   every group's slot mapping and builds its attention metadata. V2Drop's
#   coordinator answers decode steps that need no new block without those calls,
#   and the runner spares the stage-only groups' slot mappings and builds.
# * the saving itself is unaffected by ``G``: a stage-``s`` group still takes
#   ``ceil(compact_len(s, n) / block_size)`` blocks.


@dataclass(frozen=True, kw_only=True)
class V2DropStageSpec(FullAttentionSpec):
    """:class:`FullAttentionSpec` of an attention layer in V2Drop stage ``stage``.

    ``schedule`` (a :class:`vllm_v2drop.config.ResolvedSchedule`) travels with the
    spec from the worker to the engine core, so the scheduler-side manager plans
    requests with exactly the worker's schedule.
    """

    stage: int = 0
    schedule: Any = None

    def _v2drop_key(self) -> tuple:
        return (self.stage, self.schedule)

    @classmethod
    def merge(cls, specs: list[Any]) -> V2DropStageSpec:
        """Merge the specs of one group; layers of different stages never share a group."""
        first = specs[0]
        if not all(isinstance(s, V2DropStageSpec) and s._v2drop_key() == first._v2drop_key() for s in specs):
            raise AssertionError("V2Drop: layers of different stages cannot share a KV cache group.")
        merged = super().merge(specs)
        return replace(merged, stage=first.stage, schedule=first.schedule)

    def is_uniform_with_collection(self, kv_cache_specs: dict[str, KVCacheSpec]) -> bool:
        """Uniform (one group for all) only when every layer is in this layer's stage."""
        return all(
            isinstance(s, V2DropStageSpec) and s._v2drop_key() == self._v2drop_key()
            for s in kv_cache_specs.values()
        )


def install() -> None:
    """Register :class:`V2DropStageSpec` with vLLM's ``KVCacheSpecRegistry`` (every process: the
    engine core unpickles the workers' specs; idempotent, as the registry accepts the same class
    and manager again).

    vLLM fills the registry with its built-in specs only while it is empty
    (``KVCacheSpecRegistry._ensure_registered``), so the built-ins go in first.
    """
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    from vllm.v1.core import kv_cache_manager

    KVCacheSpecRegistry._ensure_registered()
    KVCacheSpecRegistry.register(V2DropStageSpec, V2DropStageManager, uniform_type_base_spec=V2DropStageSpec)
    patch(kv_cache_manager, "get_kv_cache_coordinator", _chosen_once)


def refuse_flashinfer(attention_layers) -> None:
    """Stop start-up when vLLM chose a FlashInfer backend for the model's attention by itself
    (the default on some GPUs: the config hook sees only a backend the user named)."""
    for attn in attention_layers:
        name = attn.get_attn_backend().get_name()
        if name in FLASHINFER_BACKENDS:
            raise V2DropConfigError(flashinfer_message(name))


def install_stage_specs(attention_layers, stage_of_layer, schedule) -> None:
    """Make every decoder attention layer report the :class:`V2DropStageSpec` of its stage (worker).

    ``attention_layers[i]`` is vLLM's ``Attention`` module of decoder layer ``i``;
    ``stage_of_layer[i]`` its stage. Only plain full attention can be split by
    stage; anything else (sliding window, chunked local, MLA) fails here, at
    start-up, with the reason.
    """
    from vllm.v1.kv_cache_interface import MLAAttentionSpec, replace_as

    install()
    refuse_flashinfer(attention_layers)
    for attn, stage in zip(attention_layers, stage_of_layer):

        def staged(original, _stage=int(stage), _name=attn.layer_name):
            def get_kv_cache_spec(vllm_config):
                spec = original(vllm_config)
                if spec is None:
                    return None
                if (
                    not isinstance(spec, FullAttentionSpec)
                    or isinstance(spec, MLAAttentionSpec)
                    or spec.sliding_window is not None
                    or spec.attention_chunk_size is not None
                ):
                    raise V2DropConfigError(
                        f"kv_mode: per_stage needs plain full attention, but layer {_name} has "
                        f"{type(spec).__name__}; use kv_mode: shared"
                    )
                return replace_as(spec, V2DropStageSpec, stage=_stage, schedule=schedule)

            return get_kv_cache_spec

        patch(attn, "get_kv_cache_spec", staged)
