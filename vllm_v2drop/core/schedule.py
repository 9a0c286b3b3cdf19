"""An engine's V2Drop schedule, from its config (no vLLM import).

Each process resolves it once, where its seam first meets the engine's config (the config hook,
the scheduler, the model, the frontend), and hands it down; nothing below resolves it again.
"""

from __future__ import annotations

from vllm_v2drop.config import ResolvedSchedule, V2DropConfig
from vllm_v2drop.core.architectures import base_architecture

__all__ = ["resolve_schedule"]


def resolve_schedule(vllm_config) -> ResolvedSchedule:
    """The V2Drop schedule for this engine, from ``--additional-config`` and the model's depth."""
    config = V2DropConfig.from_additional_config(vllm_config.additional_config)
    model_config = vllm_config.model_config
    num_layers = model_config.hf_text_config.num_hidden_layers
    return config.resolve(num_layers, base_architecture(model_config.architecture))
