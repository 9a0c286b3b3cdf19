"""The per-stage copies of the runner's attention groups build their metadata builders the way vLLM
builds its own: with the engine's config current, which builders read at construction (FlashAttention
reads ``attention_config.flash_attn_version`` through ``get_current_vllm_config``)."""

from __future__ import annotations

from types import SimpleNamespace


class _Group:
    """What ``_stage_groups`` uses of vLLM's ``AttentionGroup``."""

    def __init__(self, layer_names):
        self.layer_names, self.kernel_block_size, self.metadata_builders = layer_names, None, []

    def create_metadata_builders(self, vllm_config, device, kernel_block_size=None):
        from vllm.config import get_current_vllm_config_or_none

        self.metadata_builders = [get_current_vllm_config_or_none()]


def test_stage_builders_see_the_engine_config():
    from vllm.config import get_current_vllm_config_or_none

    from vllm_v2drop.seams.runner import _stage_groups

    config = SimpleNamespace(name="the engine's config")
    runner = SimpleNamespace(attn_groups=[[_Group(["l0", "l1", "l2"])], [_Group(["l3"])]], vllm_config=config,
                             device="cpu")
    runtime = SimpleNamespace(stage_layer_names=lambda stage: ["l1", "l2"])
    [(gid, group)] = _stage_groups(runner, runtime, 1)
    assert gid == 0 and group.layer_names == ["l1", "l2"]
    assert group.metadata_builders == [config]
    assert runner.attn_groups[0][0].layer_names == ["l0", "l1", "l2"]  # the runner's own group is untouched
    assert get_current_vllm_config_or_none() is not config  # restored afterwards
