"""The KV-cache spec of a V2Drop stage's attention layers (``kv_mode: per_stage``).

:class:`V2DropStageSpec` is vLLM's :class:`FullAttentionSpec` (same page layout,
same attention backend) plus the layer's ``stage`` and the ``schedule``. vLLM's
KV-cache grouping (``vllm/v1/core/kv_cache_utils.py::get_kv_cache_groups``) puts
layers whose specs differ into different KV-cache groups, and every group gets
its own block table and its own :class:`SingleTypeKVCacheManager`, drawn from one
shared block pool. Registering the spec with :class:`V2DropStageManager` (vLLM's
``KVCacheSpecRegistry``, the hook for out-of-tree specs) makes the manager of a
stage-``s`` group allocate ``ceil(compact_len(s, num_tokens) / block_size)``
blocks per request instead of ``ceil(num_tokens / block_size)``.

How vLLM 0.32 groups the stages, and what it costs
--------------------------------------------------
The specs of different stages cannot merge (:meth:`V2DropStageSpec.merge`
raises), so ``get_kv_cache_groups`` takes the hybrid path
(``_get_kv_cache_groups_uniform_page_size``): one bucket of layers per stage,
then every bucket is cut into groups of ``G`` layers, ``G`` being the smallest
bucket (or the largest, when the largest is < 1.5 x the smallest). A physical
block holds ``G`` layer pages and every group's layers share it, so:

* stage layer counts that are all multiples of the smallest one (e.g. 2/2/4/8)
  cost nothing: every group is full;
* otherwise the last group of a stage has fewer than ``G`` layers and vLLM
  "pads" it: each block that group takes has ``G - g`` unused layer pages. vLLM
  logs ``Add N padding layers, may waste at most X% KV cache memory``;
  :func:`vllm_v2drop.kv.layout.group_layout` predicts the layout and
  :func:`~vllm_v2drop.kv.layout.padding_waste` its cost,
  and the config hook logs both at start-up;
* the paper's schedules rarely divide evenly: Qwen2-VL-7B's (3, 16, 22) of 28
  layers has stages of 3/13/6/6 layers, so ``G = 3`` and stage 1 becomes 5 groups
  of 3,3,3,2,2 layers: 2 of every 15 pages a request holds in stage 1 are
  padding (6.7% of its KV memory with equal blocks per stage); LLaVA-1.5's
  (3, 17, 22) of 32 gives 3/14/5/10 layers, 12 groups, 11% padding. A stage of
  a single layer forces ``G = 1``: one group per layer, no padding at all, but
  one block table and one allocation per layer (8 groups for the tiny 8-layer
  test model). vLLM's per-step work grows with the group count: its coordinator
  calls every group's manager for every running request, the runner computes
  every group's slot mapping and builds its attention metadata. V2Drop's
  coordinator answers decode steps that need no new block without those calls,
  and the runner spares the stage-only groups' slot mappings and builds.
* the saving itself is unaffected by ``G``: a stage-``s`` group still takes
  ``ceil(compact_len(s, n) / block_size)`` blocks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheSpec

__all__ = ["V2DropStageSpec", "ensure_registered"]


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
        return _replace(merged, stage=first.stage, schedule=first.schedule)

    def is_uniform_with_collection(self, kv_cache_specs: dict[str, KVCacheSpec]) -> bool:
        """Uniform (one group for all) only when every layer is in this layer's stage."""
        return all(
            isinstance(s, V2DropStageSpec) and s._v2drop_key() == self._v2drop_key()
            for s in kv_cache_specs.values()
        )


def _replace(spec, **changes):
    from dataclasses import replace

    return replace(spec, **changes)


def ensure_registered() -> None:
    """Register :class:`V2DropStageSpec` with vLLM's ``KVCacheSpecRegistry`` (idempotent).

    vLLM fills the registry with its built-in specs only while it is empty
    (``KVCacheSpecRegistry._ensure_registered``), so the built-ins go in first.
    """
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    from vllm_v2drop.kv.manager import V2DropStageManager, install_scheduler_hooks

    KVCacheSpecRegistry._ensure_registered()
    KVCacheSpecRegistry.register(V2DropStageSpec, V2DropStageManager, uniform_type_base_spec=V2DropStageSpec)
    install_scheduler_hooks()


# Importing this module (which unpickling a V2DropStageSpec in the engine core does) registers it,
# like vLLM's ``@register_kv_cache_spec`` decorator.
ensure_registered()
