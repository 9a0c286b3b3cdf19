"""FlashInfer: per-stage KV groups are refused at start-up; stage builders share one workspace.

FlashInfer cannot run here (no CUDA, no flashinfer package). What runs: the refusal of a FlashInfer
backend the user names, through vLLM's real config path (``EngineArgs.create_engine_config``); the
worker-side refusal of one vLLM picked by itself, on stand-in attention layers (emulated: only
``get_attn_backend().get_name()`` is read); and the workspace sharing of the stage builders, on
stand-in builders with FlashInfer's two methods (emulated).
"""

from __future__ import annotations

import pytest
import torch

from vllm_v2drop.config import V2DropConfigError
from vllm_v2drop.seams.kv_cache import refuse_flashinfer
from vllm_v2drop.seams.runner import share_workspace


def _refusal(msg: str, backend: str) -> None:
    assert f"kv_mode: per_stage cannot run on the {backend} attention backend" in msg, msg
    assert "--attention-backend FLASH_ATTN" in msg and "kv_mode: shared" in msg and "394 MiB" in msg


@pytest.mark.parametrize("backend", ["FLASHINFER", "TRITON_FLASHINFER"])
def test_named_flashinfer_is_refused_with_per_stage(tiny_models, backend):
    from vllm.engine.arg_utils import EngineArgs

    args = EngineArgs(model=str(tiny_models["qwen2-vl"]), model_impl="v2drop", attention_backend=backend,
                      additional_config={"v2drop": {"kv_mode": "per_stage"}})
    with pytest.raises(Exception) as err:  # vLLM wraps hook errors in pydantic's ValidationError
        args.create_engine_config()
    _refusal(str(err.value), backend)


def test_named_flashinfer_is_accepted_with_shared_kv(tiny_models):
    """kv_mode shared: one KV-cache group, and the stage builders share its workspace."""
    from vllm.engine.arg_utils import EngineArgs

    cfg = EngineArgs(model=str(tiny_models["qwen2-vl"]), model_impl="v2drop", attention_backend="FLASHINFER",
                     additional_config={"v2drop": {"kv_mode": "shared"}}).create_engine_config()
    assert cfg.attention_config.backend.name == "FLASHINFER"


class _Layer:  # stand-in for vLLM's Attention module: the backend it was given
    def __init__(self, name):
        self.get_attn_backend = lambda: type("Backend", (), {"get_name": staticmethod(lambda: name)})


def test_flashinfer_chosen_by_vllm_is_refused_in_the_worker():
    refuse_flashinfer([_Layer("FLASH_ATTN"), _Layer("FLASH_ATTN")])  # accepted
    with pytest.raises(V2DropConfigError) as err:
        refuse_flashinfer([_Layer("FLASH_ATTN"), _Layer("FLASHINFER")])
    _refusal(str(err.value), "FLASHINFER")


class _FlashInferBuilder:  # stand-in with FlashInfer's workspace methods (lazy allocation, as vLLM's)
    allocations = 0

    def __init__(self):
        self._workspace_buffer = None

    def _get_workspace_buffer(self):
        if self._workspace_buffer is None:
            _FlashInferBuilder.allocations += 1
            self._workspace_buffer = torch.zeros(16, dtype=torch.uint8)
        return self._workspace_buffer

    def set_workspace_buffer(self, workspace_buffer):
        self._workspace_buffer = workspace_buffer


class _PlainBuilder:  # a backend without a workspace (FlashAttention, CPU)
    pass


def test_stage_builders_share_the_source_workspace():
    _FlashInferBuilder.allocations = 0
    source = [_FlashInferBuilder(), _PlainBuilder()]
    stages = [[_FlashInferBuilder(), _PlainBuilder()] for _ in range(3)]
    for builders in stages:
        share_workspace(source, builders)
    workspace = source[0]._get_workspace_buffer()
    assert all(b[0]._get_workspace_buffer() is workspace for b in stages)
    assert _FlashInferBuilder.allocations == 1  # one workspace for the group and its three stages
    assert not any(vars(b[1]) for b in stages)
