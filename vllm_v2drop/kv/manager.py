"""Scheduler side of ``kv_mode: per_stage``: block counts in compact units.

vLLM's scheduler counts every request in ORIGINAL tokens (positions, RoPE and
the sampler stay original). Its KV-cache coordinator hands each group's manager
``num_tokens`` = the original token count a request needs slots for.
:class:`V2DropCoordinator` (whose methods vLLM's own coordinator instance takes when
its pool holds :class:`V2DropStageManager` groups, vLLM's full-attention manager
with a stage) converts that count once per request and call to the rows present
in every stage, ``plan.compact_lens(num_tokens)``, and gives each group its stage's
count, so a stage-``s`` group holds ``ceil(compact_len(s, n) / block_size)``
blocks of a request.

Managers only see request ids. The request's plan is built once from the
scheduler's ``Request`` when :meth:`KVCacheManager.get_computed_blocks` first sees it
(the hook below), with the same code the worker uses (:func:`vllm_v2drop.runtime.plan_for`),
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

from vllm.v1.core.kv_cache_coordinator import KVCacheCoordinator
from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager, SingleTypeKVCacheManager

__all__ = ["StagePlans", "V2DropCoordinator", "V2DropStageManager", "install_scheduler_hooks"]


class StagePlans:
    """Request id -> :class:`RequestPlan` for the V2Drop managers of one block pool."""

    def __init__(self, schedule) -> None:
        self.schedule = schedule
        self.plans: dict = {}
        self.cache_limits: dict[str, int] = {}  # requests whose plan drops rows: their first item's start
        self.keys: dict[str, dict[int, list[bytes]]] = {}  # per_stage prefix-cache keys, per request and stage

    def register(self, request) -> None:
        if request.request_id in self.plans:
            return
        from vllm_v2drop.runtime import plan_for, request_view  # the worker's own planning code

        view = request_view(request.request_id, request.num_prompt_tokens, request.mm_features,
                            request.sampling_params)
        self.plans[view.req_id] = plan = plan_for(self.schedule, view)
        if plan.drops_anything:
            self.cache_limits[view.req_id] = plan.summary[0]

    def forget(self, request_id: str) -> None:
        self.plans.pop(request_id, None)
        self.cache_limits.pop(request_id, None)
        self.keys.pop(request_id, None)

    def stage_keys(self, request, stage: int, num_blocks: int, block_size: int) -> list[bytes]:
        """Prefix-cache keys of the request's first stage-``stage`` blocks (``kv_mode: per_stage``,
        a plan that drops rows): at most ``num_blocks``, fewer where the block's ``q_j`` lies past
        the request's hashed blocks or its ``stable_end``. Computed once per block and request.

        Block ``j`` whose rows are the original ones keeps vLLM's own hash of block ``j``; any
        other is ``hash(block of q_j) + j + digest(keep ratios, min_keep)``: two requests share it
        exactly when their sequences agree up to ``q_j`` and they keep rows alike."""
        keys = self.keys.setdefault(request.request_id, {}).setdefault(stage, [])
        if len(keys) >= num_blocks:
            return keys
        plan = self.plans[request.request_id]
        hashes = request.block_hashes
        limit = min(len(hashes) * block_size, plan.stable_end)
        digest = plan.layout_digest
        q = plan.block_key_positions(stage, num_blocks, block_size).tolist()
        for j in range(len(keys), num_blocks):
            if q[j] >= limit:
                break
            h = hashes[q[j] // block_size]
            keys.append(h if q[j] == (j + 1) * block_size - 1 else h + j.to_bytes(4, "big") + digest)
        return keys

    def cache_limit(self, request) -> int | None:
        """How far the request's KV blocks are laid out the same in every layer (prefix-cacheable):
        up to its first vision item when its plan drops rows, everywhere (None) otherwise.

        Called for every scheduled request and step (``cache_blocks``): two dict lookups once
        the request is planned (at its prefix-cache lookup, normally)."""
        if request.request_id not in self.plans:
            self.register(request)
        return self.cache_limits.get(request.request_id)

    def compact_len(self, request_id: str, stage: int, num_tokens: int) -> int:
        plan = self.plans.get(request_id)
        return num_tokens if plan is None else plan.compact_len(stage, num_tokens)

    @staticmethod
    def of(block_pool, schedule=None) -> StagePlans | None:
        """The engine's plans: one per block pool, shared by its stage managers and coordinator and
        made by the first of them to ask with the ``schedule``; None for a pool without (not a
        V2Drop engine)."""
        plans = getattr(block_pool, "_v2drop_plans", None)
        if plans is None and schedule is not None:
            plans = block_pool._v2drop_plans = StagePlans(schedule)
        return plans


class _KeyedRequest:
    """A scheduler ``Request`` seen with other block hashes (a stage group's keys) by vLLM's
    ``cache_blocks``; everything else is the request's."""

    __slots__ = ("_request", "block_hashes")

    def __init__(self, request, block_hashes: list[bytes]) -> None:
        self._request, self.block_hashes = request, block_hashes

    def __getattr__(self, name: str):
        return getattr(self._request, name)


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


class V2DropCoordinator(KVCacheCoordinator):
    """What a V2Drop engine's KV-cache coordinator does differently (:meth:`adopt` gives vLLM's
    coordinator instance these methods): the prefix-cache cap, and in ``kv_mode: per_stage`` its
    two per-step calls.

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
            return super(type(self), self).get_num_blocks_to_allocate(
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
            return super(type(self), self).allocate_new_blocks(request_id, num_tokens, num_tokens_main_model, num_encoder_tokens)
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
            super(type(self), self).remove_skipped_blocks(request_id, processed_computed_tokens, num_prompt_tokens)

    def free(self, request_id: str) -> None:
        self._v2drop_room.pop(request_id, None)
        super(type(self), self).free(request_id)

    def pop_blocks_for_free(self, request_id: str) -> list:
        self._v2drop_room.pop(request_id, None)
        return super(type(self), self).pop_blocks_for_free(request_id)

    # Prefix caching (module docstring): requests whose plan drops rows hit and cache only before
    # their first vision item in ``shared`` mode (Level 1), per stage in compact rows in ``per_stage``.
    def find_longest_cache_hit(self, block_hashes, max_cache_hit_length: int):
        request = self._v2drop_request
        cap = None if request is None else self._v2drop_plans.cache_limit(request)
        if cap is None:
            return super(type(self), self).find_longest_cache_hit(block_hashes, max_cache_hit_length)
        if not self._v2drop_level2:
            return super(type(self), self).find_longest_cache_hit(block_hashes, min(cap, max_cache_hit_length))
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

    def allocate_new_computed_blocks(self, request_id: str, new_computed_blocks, num_local_computed_tokens: int,
                                     num_external_computed_tokens: int, skip_zeroing_group_ids=()) -> None:
        """A per_stage hit: each group takes its blocks with its stage's compact count (a partial
        last block is vLLM's copy-on-write case)."""
        self._v2drop_room.pop(request_id, None)
        plan = self._v2drop_plans.plans.get(request_id)
        managers = self.single_type_managers
        if (plan is None or not plan.pruned or num_external_computed_tokens
                or any(request_id in m.num_cached_block for m in managers)):
            return super(type(self), self).allocate_new_computed_blocks(
                request_id, new_computed_blocks, num_local_computed_tokens, num_external_computed_tokens,
                skip_zeroing_group_ids)
        local = plan.compact_lens(num_local_computed_tokens)
        for i, (manager, s) in enumerate(zip(managers, self._v2drop_stages)):
            manager.add_local_computed_blocks(request_id, new_computed_blocks[i], local[s], 0)

    def cache_blocks(self, request, num_computed_tokens: int) -> None:
        later = request.__dict__.get("_v2drop_cache_from")  # (preemptions, tokens): nothing new before
        if later is not None and later[0] == request.num_preemptions and num_computed_tokens < later[1]:
            return  # one dict lookup per request and step; a preempted request's blocks were freed
        cap = self._v2drop_plans.cache_limit(request)
        if cap is None:
            return super(type(self), self).cache_blocks(request, num_computed_tokens)
        if not self._v2drop_level2:
            if cap <= num_computed_tokens:  # every later call would repeat this one (a no-op)
                request._v2drop_cache_from = (request.num_preemptions, math.inf)
            return super(type(self), self).cache_blocks(request, min(cap, num_computed_tokens))
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
                manager.cache_blocks(_KeyedRequest(request, keys), len(keys) * size,
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

    @classmethod
    def adopt(cls, coordinator, schedule) -> None:
        """Make ``coordinator`` (vLLM's, of a V2Drop engine) a V2Drop coordinator: the caching methods
        always, the compaction methods where its pool has V2Drop stage groups (``kv_mode: per_stage``).

        vLLM picks the coordinator class (with or without prefix caching, hybrid or not); the
        instance becomes a subclass of its own class with these methods (a class of the same
        object layout, which ``__class__`` assignment requires, hence no mixin).
        """
        managers = coordinator.single_type_managers
        per_stage = any(isinstance(m, V2DropStageManager) for m in managers)
        base = type(coordinator)
        if base not in _coordinator_classes.values():
            names = ["find_longest_cache_hit", "cache_blocks"]
            if per_stage:
                names += ["get_num_blocks_to_allocate", "allocate_new_blocks", "allocate_new_computed_blocks",
                          "_v2drop_stage_hit", "_v2drop_has_room", "remove_skipped_blocks", "free",
                          "pop_blocks_for_free"]
            key = (base, per_stage)
            if key not in _coordinator_classes:
                _coordinator_classes[key] = type(f"V2Drop{base.__name__}", (base,), {k: cls.__dict__[k] for k in names})
            coordinator.__class__ = _coordinator_classes[key]
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


_coordinator_classes: dict[tuple[type, bool], type] = {}


def _keep_mm_data(mm_features, num_computed_tokens: int, uses_mrope: bool = False):
    """What a V2Drop engine's scheduler sends the worker with a new request: every vision item's data.

    vLLM leaves out the data of the items its prefix-cache hit covers at admission, and its worker
    keeps a request's state from admission when the request is resumed after preemption. A resumed
    request can hit less than at its admission (evicted blocks; a ``per_stage`` stage that runs out
    earlier), and must then encode an item its first hit covered: without the data the worker skips
    the encoder and stops the engine ("Encoder cache miss")."""
    return mm_features


_hooks_installed = False


def install_scheduler_hooks() -> None:
    """Wrap vLLM's scheduler and :class:`KVCacheManager` so a V2Drop engine's KV cache knows each
    request's plan.

    ``Scheduler.__init__`` makes the KV-cache coordinator of a V2Drop engine a
    :class:`V2DropCoordinator`. ``get_computed_blocks`` is where the scheduler first hands the KV
    manager a ``Request`` it admits (new, or resumed after preemption: vLLM looks up the prefix
    cache of every request it schedules from 0): its plan is built there, once, and its
    prefix-cache lookup capped. Nothing of V2Drop runs per request on the hot path but the
    coordinator's own calls (``per_stage``) and its ``cache_blocks`` cap; ``free`` /
    ``pop_blocks_for_free`` drop the plan of a finished request. The wrappers do nothing for
    other models.
    """
    global _hooks_installed
    if _hooks_installed:
        return
    _hooks_installed = True
    from vllm.v1.core.kv_cache_manager import KVCacheManager
    from vllm.v1.core.sched.scheduler import Scheduler

    init, get_computed_blocks, free, pop_blocks_for_free = (
        Scheduler.__init__,
        KVCacheManager.get_computed_blocks,
        KVCacheManager.free,
        KVCacheManager.pop_blocks_for_free,
    )

    @functools.wraps(init)
    def _init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        from vllm_v2drop.integration import V2DROP_ARCHITECTURES, resolve_schedule

        if getattr(self.vllm_config.model_config, "architecture", None) in V2DROP_ARCHITECTURES:
            V2DropCoordinator.adopt(self.kv_cache_manager.coordinator, resolve_schedule(self.vllm_config))
            from vllm.v1.core.sched import output

            output.strip_covered_mm_data = _keep_mm_data

    @functools.wraps(get_computed_blocks)
    def _get_computed_blocks(self, request):
        plans = StagePlans.of(self.block_pool)
        if plans is None:
            return get_computed_blocks(self, request)
        plans.register(request)  # even where vLLM skips the lookup (prefix caching off, prompt logprobs)
        self.coordinator._v2drop_request = request
        try:
            return get_computed_blocks(self, request)
        finally:
            self.coordinator._v2drop_request = None

    def _forget(self, request) -> None:
        plans = StagePlans.of(self.block_pool)
        if plans is not None and request.is_finished():
            plans.forget(request.request_id)

    @functools.wraps(free)
    def _free(self, request):
        try:
            return free(self, request)
        finally:
            _forget(self, request)

    @functools.wraps(pop_blocks_for_free)
    def _pop_blocks_for_free(self, request):
        try:
            return pop_blocks_for_free(self, request)
        finally:
            _forget(self, request)

    Scheduler.__init__ = _init
    KVCacheManager.get_computed_blocks = _get_computed_blocks
    KVCacheManager.free = _free
    KVCacheManager.pop_blocks_for_free = _pop_blocks_for_free
